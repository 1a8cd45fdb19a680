"""Fine-tune the demo's tiny Llama with CorDA adapters, checking what a training setup relies on.

    python examples/finetune.py                       # CPU, ~half a minute
    python examples/finetune.py --compile inductor    # real kernels (needs a C++ compiler; ~1 min extra on CPU)

Steps and checks, in order:

1. covariances on synthetic calibration batches, then ``build_corda`` (KPM):
   the model's outputs do not change;
2. gradient checkpointing (non-reentrant): adapter gradients equal those
   without checkpointing;
3. ``torch.compile`` of every ``CordaLinear`` (``fullgraph=True``, so a graph
   break fails loudly): outputs and gradients equal eager. ``aot_eager`` (the
   default here) traces through Dynamo and AOTAutograd without generating
   code; ``inductor`` generates C++ on CPU, which takes ~40 s per new shape on
   a small CPU, so CI does not use it;
4. a few AdamW steps (a plain loop, gradient checkpointing on), then a
   checkpoint: the model through ``corda_kernels.save_pretrained`` and the
   optimizer state through ``torch.save``; both are reloaded into a fresh
   model and optimizer, and two more steps on each give identical losses and
   adapters;
5. the PEFT export of the trained model gives the same logits (if peft is
   installed).

Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import corda_kernels as ck
from corda_kernels._io import atomic_write
from corda_kernels.demo import demo_model, synthetic_batches


def lm_loss(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


def adapter_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def adapter_grads(model, batch):
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()
    grads = [p.grad.detach().clone() for p in adapter_params(model)]
    model.zero_grad(set_to_none=True)
    return grads


def close(a, b, tol):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


def compile_layers(model, backend: str) -> int:
    """torch.compile each CordaLinear's forward in place (fullgraph: a graph break raises)."""
    layers = ck.corda_layers(model)
    for layer in layers.values():
        layer.compile(backend=backend, fullgraph=True)
    return len(layers)


def enable_checkpointing(model) -> None:
    # Non-reentrant: works although no input of a checkpointed block requires grad (only adapters do).
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def train(model, opt, batches, steps, start=0):
    losses = []
    model.train()
    for i in range(start, start + steps):
        loss = lm_loss(model, batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter_params(model), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--compile", choices=("none", "eager", "aot_eager", "inductor"), default="aot_eager")
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            failures.append(what)

    t0 = time.perf_counter()
    model = demo_model(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    batches = synthetic_batches(args.vocab, n=16, seq=args.seq_len, batch=4)
    with torch.no_grad():
        before = model(**batches[0]).logits
    covs = ck.collect_cov(model, batches, progress=False)
    ck.build_corda(model, covs, rank=args.rank, mode="kpm")
    with torch.no_grad():
        after = model(**batches[0]).logits
    print(f"CorDA: {len(ck.corda_layers(model))} layers, {ck.trainable_parameters(model):,} trainable parameters")
    check(torch.allclose(after, before, rtol=1e-4, atol=1e-4), "build_corda keeps the outputs")

    # 2. Gradient checkpointing: same adapter gradients. Dropout is 0, so the recomputation is exact.
    model.train()
    plain = adapter_grads(model, batches[1])
    enable_checkpointing(model)
    probe = next(iter(ck.corda_layers(model).values()))
    calls = []
    handle = probe.register_forward_pre_hook(lambda m, a: calls.append(1))
    ckpt = adapter_grads(model, batches[1])
    handle.remove()
    # Checkpointing really is on only if the backward pass re-ran the layer's forward.
    check(len(calls) == 2, f"gradient checkpointing recomputes forwards ({len(calls)} calls of one layer per step)")
    check(close(plain, ckpt, 1e-5), "gradient checkpointing: equal adapter gradients")

    # 3. torch.compile of the CordaLinear forward (and its backward, through AOTAutograd).
    if args.compile != "none":
        from torch._dynamo.utils import counters

        t = time.perf_counter()
        n = compile_layers(model, args.compile)
        compiled = adapter_grads(model, batches[1])
        graphs = counters["stats"]["unique_graphs"]
        # One graph per distinct layer shape, shared by the instances: more would mean per-layer recompiles.
        check(0 < graphs <= n, f"Dynamo captured {graphs} graph(s) for {n} CordaLinear layers")
        check(close(plain, compiled, 1e-4), f"torch.compile({args.compile}, fullgraph) of {n} CordaLinear: equal grads")
        print(f"    compile + first step: {time.perf_counter() - t:.1f}s")

    # 4. Train, checkpoint (model + optimizer), reload, and continue identically.
    opt = torch.optim.AdamW(adapter_params(model), lr=args.lr, weight_decay=0.01)
    first = train(model, opt, batches, args.steps)
    check(first[-1] < first[0], f"loss goes down: {first[0]:.4f} -> {first[-1]:.4f}")
    out = args.out or tempfile.mkdtemp(prefix="corda_finetune_")
    ck.save_pretrained(model, os.path.join(out, "model"))
    atomic_write(os.path.join(out, "optimizer.pt"), lambda p: torch.save(opt.state_dict(), p))

    resumed = ck.load_pretrained(os.path.join(out, "model"))
    enable_checkpointing(resumed)
    if args.compile != "none":
        compile_layers(resumed, args.compile)
    opt2 = torch.optim.AdamW(adapter_params(resumed), lr=args.lr, weight_decay=0.01)
    opt2.load_state_dict(torch.load(os.path.join(out, "optimizer.pt"), weights_only=True))
    state = opt.state_dict()["state"]
    check(
        all(torch.equal(state[k]["exp_avg_sq"], v["exp_avg_sq"]) for k, v in opt2.state_dict()["state"].items()),
        "optimizer state reloaded",
    )
    cont = train(model, opt, batches, 2, start=args.steps)
    cont2 = train(resumed, opt2, batches, 2, start=args.steps)
    check(
        all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(cont, cont2))
        and close(adapter_params(model), adapter_params(resumed), 1e-5),
        f"resumed training matches: losses {[round(x, 5) for x in cont]} vs {[round(x, 5) for x in cont2]}",
    )

    # 5. The PEFT export of the trained model.
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("  [skip] peft is not installed")
    else:
        ck.save_pretrained(model, os.path.join(out, "model"))
        base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model", "residual"), local_files_only=True)
        pm = PeftModel.from_pretrained(base, os.path.join(out, "model", "adapter")).eval()
        model.eval()
        with torch.no_grad():
            ok = torch.allclose(pm(**batches[2]).logits, model(**batches[2]).logits, rtol=1e-4, atol=1e-4)
        check(ok, "PEFT loads the trained export with equal logits")

    print(f"checkpoint in {out}; total {time.perf_counter() - t0:.1f}s")
    if failures:
        print(f"FAILED: {len(failures)} check(s)")
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
