"""One pass over many transformers architectures, each built tiny from its config with random weights.

For each: collect covariances on padded batches (checked against float64 hooks), build CorDA
(outputs unchanged), take a training step (every adapter gets a gradient, in-place writes into
linear outputs included), and merge back (outputs unchanged). Architectures differ where the
package has to cope: fused or parallel projections, flattened MLP inputs, scalar gates, MoE
blocks, Conv1D, task heads.
"""

import warnings

import pytest
import torch
import transformers
from tiny import padded_batches, rel

import corda_kernels as ck

V, H, L = 128, 64, 2
BASE = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=64)


def _llama_like(model_cls, cfg_cls, **extra):
    return model_cls, cfg_cls, {**BASE, "intermediate_size": 96, **extra}


ARCHS = {
    "mistral": _llama_like("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "qwen2": _llama_like("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "qwen3": _llama_like("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=16),
    "gemma2": _llama_like("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16),
    "phi": _llama_like("PhiForCausalLM", "PhiConfig"),  # parallel attention and MLP: one shared input
    "phi3": _llama_like("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0),  # fused qkv
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4),
    ),
    "opt": (  # flattens, then normalizes, before fc1: token order follows through the norm
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=4,
            ffn_dim=96,
            word_embed_proj_dim=H,
            max_position_embeddings=64,
        ),
    ),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=V, hidden_size=H, n_layer=L, n_head=4)),
    "gpt_neox": _llama_like("GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "gptj": (
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(vocab_size=V, n_embd=H, n_layer=L, n_head=4, rotary_dim=8, n_positions=64),
    ),
    "mamba": (  # the mixers read dt_proj.weight themselves: never a default target
        "MambaForCausalLM",
        "MambaConfig",
        dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, state_size=8, expand=2, time_step_rank=8),
    ),
    "mixtral": _llama_like("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4),
    "qwen2_moe": _llama_like(  # shared_expert_gate: a one-output linear, not a default target
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    "starcoder2": _llama_like("Starcoder2ForCausalLM", "Starcoder2Config", num_key_value_heads=2),
    # The routers are nn.Linear subclasses whose forward returns a tuple: never a default target.
    "llama4": _llama_like(
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        intermediate_size=64,
        intermediate_size_mlp=96,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    ),
    "phimoe": _llama_like(
        "PhimoeForCausalLM", "PhimoeConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    ),
    "roberta_cls": (  # the classifier's output layer (num_labels logits, outside base_model): not a target
        "RobertaForSequenceClassification",
        "RobertaConfig",
        {**BASE, "intermediate_size": 96, "max_position_embeddings": 80, "num_labels": 3},
    ),
}


# Layers whose input has batch·seq rows without being a view of the tokens: the mask cannot be trusted
# there (another order would look the same), so every row counts and a warning names them.
WHOLE = {"qwen2_moe": ("shared_expert.down_proj",), "llama4": ("shared_expert.down_proj",)}


# Architectures whose router can pass no gradient back in a training step (PhiMoE's sparsemixer on
# transformers 4, at these sizes): its adapter then gets none either, in the plain model as in ours.
GRADLESS_ROUTERS = {"phimoe"}


def _build(arch):
    model_name, cfg_name, kwargs = ARCHS[arch]
    model_cls, cfg_cls = getattr(transformers, model_name, None), getattr(transformers, cfg_name, None)
    if model_cls is None or cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kwargs)).eval()


def _outputs(model, batches, grad=False):
    with torch.set_grad_enabled(grad):
        return [model(**b).logits for b in batches]


def _reference(model, batches, names, whole=()):
    """Float64 Σxxᵀ / rows from plain hooks: a token-shaped input (batch, seq, d), or flattened
    (batch·seq, d), counts its unpadded rows; any other (tokens routed to an MoE expert, as in
    transformers 4's Mixtral), and the layers named in ``whole``, count every row. Also returns
    the names of the latter."""
    sums, counts, current, routed = {}, {}, {}, set()
    modules = dict(model.named_modules())

    def make(name):
        def hook(mod, args):
            mask = current["mask"]
            x = args[0].detach().double()
            if x.shape[:-1].numel() == mask.numel() and not name.endswith(whole):
                kept = x.reshape(*mask.shape, x.shape[-1])[mask]
            else:
                if x.shape[:-1] != mask.shape[:1]:  # one row per sequence (a pooler, a [CLS] head) is no surprise
                    routed.add(name)
                kept = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + kept.T @ kept
            counts[name] = counts.get(name, 0) + kept.shape[0]

        return hook

    hooks = [modules[n].register_forward_pre_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"].bool()
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}, routed


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_end_to_end(arch):
    model = _build(arch)
    batches = padded_batches(V, n_batches=2, left=arch in ("mistral", "bloom", "falcon"))
    before = _outputs(model, batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covs = ck.collect_cov(model, batches, progress=False)
    assert covs, arch
    linears = {n: m for n, m in model.named_modules() if n in covs}
    assert all(m.weight.shape[0] > 1 for m in linears.values())  # no scalar gate among the defaults
    # The LM head, or a classification head's output layer (its dense layer stays a target).
    heads = [model.get_output_embeddings(), getattr(getattr(model, "classifier", None), "out_proj", None)]
    heads = {id(h) for h in heads if h is not None}
    assert heads and not any(id(m) in heads for m in linears.values())
    ref, routed = _reference(model, batches, list(covs), WHOLE.get(arch, ()))
    for name in covs:
        assert rel(covs[name], ref[name]) < 1e-5, name
    # Only inputs that are not the batch's tokens are counted whole, and said to be.
    said = " ".join(str(w.message) for w in caught if "did not match" in str(w.message))
    assert all(f"'{n}'" in said for n in routed) and (said == "") == (not routed), said

    # Which targets a training step reaches at all: a router whose routing passes no gradient back
    # (PhiMoE's sparsemixer on transformers 4) gives its adapter none either.
    model.train()
    _outputs(model, batches[:1], grad=True)[0].float().square().mean().backward()
    reached = {n for n, m in linears.items() if m.weight.grad is not None and m.weight.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    model.eval()
    unreached = set(linears) - reached
    assert not unreached or (arch in GRADLESS_ROUTERS and all(n.endswith(".gate") for n in unreached)), unreached
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "adapter component", UserWarning)  # random square weights
        ck.build_corda(model, covs, rank=4, mode="kpm")
    for a, b in zip(_outputs(model, batches), before):
        assert rel(a, b) < 1e-5

    model.train()
    logits = _outputs(model, batches[:1], grad=True)[0]
    logits.float().square().mean().backward()  # Falcon writes into its linear outputs in place
    layers = ck.corda_layers(model)
    assert set(layers) == set(covs)
    for name in reached:
        for p in (layers[name].lora_A, layers[name].lora_B):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    ck.merge_corda(model)
    assert not ck.corda_layers(model)
    for a, b in zip(_outputs(model, batches), before):
        assert rel(a, b) < 1e-5


def test_mamba_dt_proj_is_never_a_target():
    model = _build("mamba")
    batches = padded_batches(V, n_batches=1)
    covs = ck.collect_cov(model, batches, progress=False)
    assert covs and not any(n.endswith("dt_proj") for n in covs)
    with pytest.raises(ValueError, match=r"dt_proj' is the dt_proj of Mamba mixer .* leave it out of targets="):
        ck.collect_cov(model, batches, progress=False, targets=["dt_proj"])
