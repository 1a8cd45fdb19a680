"""Rewriting a model: targets -> ``CordaLinear`` (build) and back (merge).

Pipeline stage 3. ``build_corda`` validates everything, then decomposes every
layer, and only then swaps modules, so an error leaves the model untouched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._targets import (
    WRAPPER_PREFIXES,
    Targets,
    check_target,
    ddp_wrapped,
    find_targets,
    linear_class,
    linear_weight,
    module_slots,
    swap_modules,
    unused_linears,
    unwrap_model,
)
from .covariance import Covariances
from .decompose import (
    DampedCovariance,
    Spectrum,
    adapter_factors,
    check_damping,
    damp_covariance,
    residual_weight,
    selected_spectrum,
    validate,
)
from .layer import CordaLinear


@dataclass
class BuildPlan:
    """What ``build_corda`` will do: per module rank and alpha, grouped by shared covariance."""

    ranks: dict[str, int]
    alphas: dict[str, float]
    groups: list[list[str]]
    timings: dict[str, float] = field(default_factory=dict)


def resolve_targets(model: nn.Module, covs: Mapping[str, torch.Tensor], targets: Targets) -> dict[str, nn.Module]:
    """Target modules: those named in ``covs`` by default; every one must exist and be linear-like."""
    if not isinstance(covs, Mapping):
        hint = (
            ": CorDA++ candidates need select_covariances(model, cands) first"
            if type(covs).__name__ == "CovarianceCandidates"
            else ""
        )
        raise TypeError(
            f"covs must be the Covariances from collect_cov (a name -> matrix mapping), got {type(covs).__name__}{hint}"
        )
    if targets is not None:
        return find_targets(model, targets)
    named = dict(unwrap_model(model).named_modules())  # the names find_targets gives, without wrapper prefixes
    unused = unused_linears(unwrap_model(model))
    out = {}
    for name in covs:
        module = named.get(name)
        if module is None:
            hint = "were they collected on another model?"
            if name.startswith(WRAPPER_PREFIXES):
                # Until 2026-11-29, collect_cov kept torch.compile's/DDP's prefix in the names.
                hint = (
                    "the name carries a torch.compile or DDP wrapper's prefix, which this version leaves out: "
                    "collect the covariances again"
                )
            raise ValueError(f"the covariances name module {name!r}, which this model does not have: {hint}")
        if isinstance(module, CordaLinear):
            raise ValueError(
                f"module {name!r} is already a CordaLinear (build_corda ran on this model): merge_corda first, "
                "or use the original model"
            )
        if linear_class(module) is None:
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
        check_target(name, module, unused, where="the covariances (or pass targets=)")
        out[name] = module
    return out


def plan(
    model: nn.Module,
    covs: Mapping[str, torch.Tensor],
    rank: int = 16,
    mode: str = "kpm",
    *,
    ranks: Mapping[str, int] | None = None,
    alpha: float | Mapping[str, float] | None = None,
    targets: Targets = None,
) -> tuple[dict[str, nn.Module], BuildPlan]:
    """Check every argument against the model and return the targets and the plan. Touches nothing."""
    modules = resolve_targets(model, covs, targets)
    if not modules:
        raise ValueError("no target module to rewrite")
    for name in modules:  # replacing the outer layer would drop the inner one (a linear layer with a linear child)
        outer = next((p for p in _prefixes(name) if p in modules), None)
        if outer is not None:
            raise ValueError(f"target {name!r} lies inside target {outer!r}: leave one of them out (targets=)")
    if isinstance(covs, Covariances):
        covs.check_model(modules)
    from .allocate import RankAllocation  # allocate imports this module

    if isinstance(ranks, RankAllocation):
        # An allocation sets ranks within a budget: targets outside it would silently take rank= on top.
        extra = [n for n in modules if n not in ranks]
        if extra:
            raise ValueError(
                f"ranks is an allocation over {len(ranks)} module(s) within a budget of {ranks.budget} "
                f"parameters, but this build also targets {len(extra)} other(s) (e.g. {extra[0]!r}), which "
                f"would take rank={rank} outside it: pass targets=list(ranks), or allocate over every target"
            )
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - set(modules))
    if unknown:
        raise ValueError(f"ranks names module(s) {unknown[:3]} that are not targets of this build")
    if isinstance(alpha, Mapping):
        unknown = sorted(set(alpha) - set(modules))
        if unknown:
            raise ValueError(f"alpha names module(s) {unknown[:3]} that are not targets of this build")
    per_rank, per_alpha = {}, {}
    for name, module in modules.items():
        if name not in covs:
            raise ValueError(f"no covariance for module {name!r}")
        if linear_weight(module).device.type == "meta":
            raise ValueError(
                f"the weight of module {name!r} is on the meta device (offloaded, e.g. by accelerate's "
                "device_map): build_corda needs the weights themselves; load the model without offloading"
            )
        r = validate(linear_weight(module), covs[name], ranks.get(name, rank), mode, name=name)
        a = alpha.get(name) if isinstance(alpha, Mapping) else alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, numbers.Real)):
            raise TypeError(f"alpha for module {name!r} must be a number, got {a!r}")
        if a is not None and not 0 < a < math.inf:
            raise ValueError(f"alpha for module {name!r} must be > 0 and finite, got {a}")
        per_rank[name] = r
        per_alpha[name] = float(r if a is None else a)
    # One damped covariance (and Cholesky) per shared tensor.
    by_cov: dict[int, list[str]] = {}
    for name in modules:
        by_cov.setdefault(id(covs[name]), []).append(name)
    groups = list(by_cov.values())
    # Before any decomposition, and all of them named: a layer no token reached (an MoE expert no token
    # was routed to) has a zero covariance and nothing to decompose.
    sums = [covs[g[0]].diagonal().sum().double() for g in groups]
    traces = torch.stack([t.to(sums[0].device) for t in sums]).tolist()  # one host read, not one per group
    empty = [n for g, t in zip(groups, traces) if t <= 0 for n in g]  # NaN fails later, named as such
    if empty:
        raise ValueError(
            f"the covariance of {len(empty)} module(s) is zero or has a non-positive trace (no token reached them? "
            f"e.g. an MoE expert no token was routed to): {empty[:5]}{' ...' if len(empty) > 5 else ''}; leave "
            "them out (targets=) or collect on more data"
        )
    return modules, BuildPlan(per_rank, per_alpha, groups)


def decompose_all(
    modules: Mapping[str, nn.Module],
    covs: Mapping[str, torch.Tensor],
    p: BuildPlan,
    mode: str,
    *,
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    spectra: Mapping[str, Spectrum] | None = None,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for every module; nothing in the model changes."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(modules), desc="decomposing", unit="layer", leave=False)
    out = {}
    dead: dict[str, tuple[int, int]] = {}
    raised: dict[str, float] = {}
    try:
        for group in p.groups:
            first = modules[group[0]]
            w0 = linear_weight(first)
            damped: DampedCovariance = damp_covariance(
                covs[group[0]].to(w0.device), damping, dtype=compute_dtype, name=group[0]
            )
            for name in group:
                w = linear_weight(modules[name]).detach()
                if not torch.isfinite(w).all():
                    raise ValueError(f"weight of module {name!r} contains NaN or Inf")
                if w.device != damped.matrix.device:  # device_map split this group: work on the member's device
                    damped = damp_covariance(covs[name].to(w.device), damping, dtype=compute_dtype, name=name)
                if damped.damping != damping:
                    raised[name] = damped.damping
                spec = spectra.get(name) if spectra is not None else None
                if spec is not None:
                    _check_spectrum(spec, w, damped, name)
                else:
                    # Building needs only the adapter's r components, not the whole spectrum.
                    spec = selected_spectrum(w, damped, p.ranks[name], mode, name=name)
                scaling = p.alphas[name] / p.ranks[name]
                A, B, _ = adapter_factors(w, damped, spec, p.ranks[name], mode, scaling, name=name)
                out[name] = (A, B)
                sig = spec.take(p.ranks[name], mode)[0]
                zero = int((sig <= _ZERO_SIGMA * (spec.scale or float(spec.singular_values.max()))).sum())
                if zero:
                    dead[name] = (zero, p.ranks[name])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if raised:
        first, used = next(iter(raised.items()))
        warnings.warn(
            f"the damping of {len(raised)} layer(s) was raised above {damping:g} to make C_d positive definite "
            f"(e.g. {first!r}: {used:g}); their covariance is (nearly) singular, e.g. from fewer tokens than "
            "features",
            stacklevel=3,
        )
    if dead:
        first, (k, r) = next(iter(dead.items()))
        warnings.warn(
            f"{sum(k for k, _ in dead.values())} adapter component(s) in {len(dead)} layer(s) (e.g. {first!r}: "
            f"{k} of {r}) have a singular value of W·C_d of zero to the solver's accuracy (at most 1e-7 of its "
            "norm: W or C is (nearly) rank-deficient there): they start with "
            "B ≈ 0 and will hardly train; give those layers a smaller rank, or use mode='ipm'",
            stacklevel=3,
        )
    return out


def _check_spectrum(spec: Spectrum, w: torch.Tensor, damped: DampedCovariance, name: str) -> None:
    """A spectrum given to the build must be of this weight and this damped covariance."""
    d_out, d_in = w.shape
    side = "left" if d_out <= d_in else "right"
    rows = d_out if side == "left" else d_in
    if spec.damping != damped.damping or spec.side != side or spec.vectors.shape[0] != rows:
        raise ValueError(
            f"spectra[{name!r}] does not belong to this build: it was computed with damping {spec.damping:g} "
            f"({spec.side} side, {spec.vectors.shape[0]} rows), this build uses damping {damped.damping:g} on a "
            f"{tuple(w.shape)} weight; pass the same damping, or leave spectra out"
        )


#: σ at or below this fraction of ‖W·C_d‖_F is zero to the float64 Gram solver's accuracy
#: (σ² is resolved to ~1e-16 of σ_max², so σ to ~1e-8 of σ_max): such a component is dead.
_ZERO_SIGMA = 1e-7


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def apply_factors(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    p: BuildPlan,
    mode: str,
    dropout: float = 0.0,
) -> nn.Module:
    """Swap each target for a CordaLinear holding its residual, then freeze everything but the adapters.

    ``modules`` is emptied as the layers are swapped: holding every replaced layer (or every new
    residual) until the end would keep a second copy of all target weights alive at once.
    """

    def residual(name: str) -> torch.Tensor:
        A, B = factors[name]
        with torch.no_grad():
            return residual_weight(linear_weight(modules[name]).detach(), A, B, p.alphas[name] / p.ranks[name])

    # Every residual is checked before the first swap (nothing half-applied), one at a time, then
    # computed again as it is swapped in: a second small GEMM per layer instead of a model-sized peak.
    for name in modules:
        if not torch.isfinite(residual(name)).all():
            raise ValueError(f"the residual weight of module {name!r} overflows {linear_weight(modules[name]).dtype}")
    _untie_targets(model, modules)
    slots = module_slots(model)
    for name in list(modules):
        A, B = factors[name]
        layer = CordaLinear.from_factors(
            modules[name], residual(name), A, B, alpha=p.alphas[name], dropout=dropout, mode=mode
        )
        swap_modules(model, {name: layer}, slots)
        del modules[name], layer
    no_fused_transformer_paths(model)
    checkpointing_ready(model)
    for n, param in model.named_parameters():
        param.requires_grad_(n.endswith(".lora_A") or n.endswith(".lora_B"))
    return model


def _forward_reads_tie(module: nn.Module) -> bool:
    # SwitchTransformers and UDOP (and T5, mT5, UMT5, LongT5 on transformers 4) scale the decoder
    # output by d_model**-0.5 only while the config says the embeddings are tied.
    try:
        return "tie_word_embeddings" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def _untie_targets(model: nn.Module, modules: Mapping[str, nn.Module]) -> set[str]:
    """A target whose weight is tied to another parameter (an LM head tied to the input embedding) gets
    its own residual weight; the other keeps W. transformers' ``tie_weights()`` (called by
    ``resize_token_embeddings``, among others) would tie the residual back to W and silently change
    the outputs, so the config stops asking for the tie, and the user is told. Returns the tied targets."""
    targets = {id(m.weight): name for name, m in modules.items()}
    tied = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owner = targets.get(id(param))
        # The same module registered in two slots (self.b = self.a) is swapped in both: not a tie.
        if owner is not None and model.get_submodule(pname.rpartition(".")[0]) is not modules[owner]:
            tied.setdefault(owner, pname)
    if not tied:
        return set()
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(Exception):
            emb = getattr(model, getter)()
            if emb is not None and getattr(emb, "weight", None) is not None:
                embeddings.add(id(emb.weight))
    # Only a tie to the word embeddings is the config's to make again; other shared weights (an
    # encoder-decoder tie between two targets) just stop being shared.
    word = {owner for owner in tied if id(modules[owner].weight) in embeddings}
    for m in model.modules() if word else ():
        if getattr(getattr(m, "config", None), "tie_word_embeddings", False) is True and _forward_reads_tie(m):
            raise ValueError(
                f"module {sorted(word)[0]!r} shares its weight with the input embeddings, and "
                f"{type(m).__name__}.forward reads config.tie_word_embeddings (it rescales the output when "
                "the weights are tied): an adapter there would need the tie undone and would change the "
                "outputs; leave that module out of the targets"
            )
    untied = False
    for m in model.modules() if word else ():
        configs = [getattr(m, "config", None)]
        text = getattr(configs[0], "get_text_config", None)
        if callable(text):
            with contextlib.suppress(Exception):
                configs.append(text())
        for cfg in configs:
            if getattr(cfg, "tie_word_embeddings", False) is True:
                cfg.tie_word_embeddings = False
                untied = True
        keys = getattr(m, "all_tied_weights_keys", None)
        if isinstance(keys, dict):  # transformers 5 keeps the mapping it ties by
            for k, v in list(keys.items()):
                if any(k.startswith(t + ".") or v.startswith(t + ".") for t in word):
                    del keys[k]
    owner, other = next(iter(tied.items()))
    warnings.warn(
        f"{len(tied)} target(s) shared their weight with another parameter (e.g. {owner!r} with {other!r}); "
        "each target now holds its own residual, and the weights are no longer shared"
        + (
            "; config.tie_word_embeddings was set to False so that tie_weights() cannot re-tie the embeddings"
            if untied
            else ""
        ),
        stacklevel=4,
    )
    return set(tied)


def _no_fused_fast_path(module, args):
    """A no-op pre-hook: its presence turns off nn.TransformerEncoderLayer's fused inference path."""
    return None


def no_fused_transformer_paths(model: nn.Module) -> None:
    """Keep torch.nn's fused transformer inference paths away from CordaLinear layers.

    ``nn.TransformerEncoderLayer``'s eval/no-grad fast path reads linear1/linear2.weight (the
    residual) in one fused kernel and skips the adapter; it stands down whenever a submodule
    has a hook. ``nn.TransformerEncoder`` would still pack padded batches into nested
    tensors for its layers' slow path, which CordaLinear does not take.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in module.children():
                if isinstance(child, CordaLinear) and _no_fused_fast_path not in child._forward_pre_hooks.values():
                    child.register_forward_pre_hook(_no_fused_fast_path)
        elif isinstance(module, nn.TransformerEncoder) and any(isinstance(m, CordaLinear) for m in module.modules()):
            module.use_nested_tensor = False


def _inputs_need_grad_when_checkpointing(model: nn.Module, args) -> None:
    # Reentrant checkpointing (transformers 4's default) hands a block's adapters no gradient unless
    # the block's input requires one, and with every other weight frozen the embeddings' output does
    # not. transformers 5, and PEFT, call enable_input_require_grads(); a CorDA model needs the same
    # whenever reentrant checkpointing is switched on (the HF Trainer does it after the build).
    if not (model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return  # (a hook cannot be registered inside a compiled graph; compile once it is set, or go non-reentrant)
    # Already set, or switched off on purpose (transformers 4 keeps the removed handle, 5 an empty list).
    if getattr(model, "_require_grads_hook", None) is not None or hasattr(model, "_require_grads_hooks"):
        return
    switches = model.__dict__.get(_SWITCHES, ())  # set with the hook by checkpointing_ready
    if any(getattr(m, "gradient_checkpointing", False) is True and _reentrant(m) for m in switches):
        with contextlib.suppress(NotImplementedError, AttributeError):  # no input embeddings to hook
            model.enable_input_require_grads()


def _reentrant(module: nn.Module) -> bool:
    # transformers keeps the checkpoint function as a partial of its kwargs; anything else may be reentrant.
    func = getattr(module, "_gradient_checkpointing_func", None)
    return not (isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False)


_SWITCHES = "_corda_checkpoint_switches"


def checkpointing_ready(model: nn.Module) -> None:
    """Let a transformers model's adapters train under reentrant gradient checkpointing, enabled
    before or after the conversion (see :func:`_inputs_need_grad_when_checkpointing`)."""
    hook = _inputs_need_grad_when_checkpointing
    # The modules that carry the flag, found once here: a walk over every module per step cost ~1%
    # of a CPU training step at 32 layers.
    if not hasattr(model, "enable_input_require_grads"):
        return
    model.__dict__[_SWITCHES] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(hook)


def build_corda(
    model: nn.Module,
    covs: Mapping[str, torch.Tensor],
    rank: int = 16,
    mode: str = "kpm",
    *,
    ranks: Mapping[str, int] | None = None,
    alpha: float | Mapping[str, float] | None = None,
    targets: Targets = None,
    damping: float = 0.01,
    dropout: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
    spectra: Mapping[str, Spectrum] | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> nn.Module:
    """Replace every target of ``model`` by a :class:`CordaLinear`, in place; returns the model.

    ``ranks`` overrides ``rank`` per module (CorDA++ fills it); ``alpha``
    defaults to each layer's rank (scaling 1). Everything is validated and
    decomposed before the first module is swapped: on error the model is
    untouched. Afterwards only ``lora_A``/``lora_B`` are trainable.
    ``spectra`` reuses decompositions computed earlier (CorDA++); by default
    those cached on ``covs.spectrum_cache`` are used while they still match.
    ``distributed=True`` (under torch.distributed) splits the decompositions
    across ranks and broadcasts the factors: see :mod:`corda_kernels.distributed`.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    check_damping(damping)
    if ddp_wrapped(model):
        raise ValueError(
            "build_corda got a DistributedDataParallel-wrapped model: DDP keeps the parameters it was built "
            "with, so the new adapters would never be synchronized across ranks. Build the plain model, then "
            "wrap it in DDP"
        )
    wrapper, model = model, unwrap_model(model)  # layers are named and swapped inside torch.compile
    cache = getattr(covs, "spectrum_cache", None)

    def checks():
        modules, p = plan(model, covs, rank, mode, ranks=ranks, alpha=alpha, targets=targets)
        # CorDA++ selection/allocation decomposed these layers already; stale entries are skipped by the cache.
        found = cache.lookup(modules, covs, damping, compute_dtype) if spectra is None and cache is not None else None
        return modules, p, found

    from .distributed import checked_on_every_rank

    modules, p, served = checked_on_every_rank("build_corda's checks", checks, enabled=distributed)
    decompose = decompose_all
    if distributed:
        from .distributed import decompose_all_distributed as decompose
    spectra = spectra if served is None else served
    factors = decompose(
        modules, covs, p, mode, damping=damping, compute_dtype=compute_dtype, spectra=spectra, progress=progress
    )
    apply_factors(model, modules, factors, p, mode, dropout=dropout)
    if served:
        # The singular vectors that served this build (d×d float64 per layer, on the weights' device) are
        # keyed to weights that were just replaced: free them. The singular values stay.
        cache.drop_vectors(served)
    return wrapper


def merge_corda(model: nn.Module) -> nn.Module:
    """Replace every CordaLinear by a plain layer of its original type holding W + scaling·B@A.

    The merged layers are frozen, like the residual weights they replace and like every
    other parameter ``build_corda`` froze; ``model.requires_grad_(True)`` unfreezes all.
    """
    # One layer at a time: merging them all before swapping would hold a second copy of every weight.
    inner = unwrap_model(model)
    slots = module_slots(inner)
    for name in list(corda_layers(inner)):
        swap_modules(inner, {name: inner.get_submodule(name).merge()}, slots)
    return model


def corda_layers(model: nn.Module) -> dict[str, CordaLinear]:
    """Name -> CordaLinear for every adapter layer of ``model`` (named inside torch.compile/DDP wrappers)."""
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, CordaLinear)}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (after :func:`build_corda`: the adapters')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
