"""Tiny random-weight models and padded batches shared by the tests."""

import torch
from torch import nn


def tiny_llama(hidden=64, layers=2, vocab=128, inter=96, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(hidden=48, layers=2, vocab=100, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def padded_batches(vocab, n_batches=3, batch=3, seq=12, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        lengths = torch.randint(seq // 3, seq + 1, (batch,), generator=g)
        pos = torch.arange(seq).unsqueeze(0)
        mask = (pos >= seq - lengths.unsqueeze(1)) if left else (pos < lengths.unsqueeze(1))
        out.append({"input_ids": ids, "attention_mask": mask.long()})
    return out


def reference_covariances(model: nn.Module, batches, names, normalize="mean", masked=None):
    """Float64 per-module covariances from plain hooks: no sharing, no kernels, boolean row selection.

    ``masked(name)`` (default: always) says whether the attention mask selects a module's rows;
    for the others (a vision tower's patches) every row counts.
    """
    sums = {n: 0 for n in names}
    counts = {n: 0 for n in names}
    current = {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(mod, args):
            x = args[0].detach().double()
            if masked is not None and not masked(name):
                x = x.reshape(-1, x.shape[-1])
                sums[name] = sums[name] + x.T @ x
                counts[name] += x.shape[0]
                return
            mask = current["mask"].bool()
            for b in range(x.shape[0]):
                xb = x[b][mask[b]]
                if normalize == "peft":
                    if xb.shape[0] == 0:
                        continue
                    xb = xb / xb.max().abs()
                    counts[name] += 1
                else:
                    counts[name] += xb.shape[0]
                sums[name] = sums[name] + xb.T @ xb

        return hook

    hs = [modules[n].register_forward_pre_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"]
                model(**b)
    finally:
        for h in hs:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}, counts


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
