"""Interop with transformers and PEFT: export, conversion to a plain LoRA, import.

Pipeline stage 4. A CorDA model is a *residual* base plus a low-rank adapter,
which is exactly what PEFT's LoRA format can carry:

- :func:`save_pretrained` writes ``out_dir/residual`` (a normal transformers
  checkpoint whose target layers hold the residual weights) and
  ``out_dir/adapter`` (a PEFT LoRA adapter), so
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir/"residual"), out_dir/"adapter")``
  is our model;
- :func:`to_lora` turns the trained adapter into a rank-2r LoRA on the
  *original* weights (what PEFT does for PiSSA/CorDA), to serve on the
  unmodified base model;
- :func:`from_peft` and :func:`load_pretrained` go the other way, into
  ``CordaLinear`` layers.

Every directory is written into a hidden temporary sibling and renamed into
place at the end, so an interrupted write never leaves a loadable-looking
directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._compat import from_pretrained_kwargs as _for_this_transformers
from ._io import current_umask
from ._targets import Conv1D, get_submodule_parent, linear_weight, swap_modules, unwrap_model
from .layer import CordaLinear
from .rewrite import _untie_targets, checkpointing_ready, corda_layers, no_fused_transformer_paths

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

EXPORT_FORMAT = "corda_kernels.export/1"
#: Written last into every export directory; an existing directory is only ever replaced if it holds this file.
MARKER = "corda_export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's key prefix for a LoRA adapter saved from a ``PeftModel`` (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------- atomic directories
def check_out_dir(path: str | os.PathLike, *, replace: bool = True) -> None:
    """Raise ``FileExistsError`` unless ``path`` is absent, empty, or (with ``replace``) an earlier export.
    :func:`atomic_dir` checks this itself; the CLI asks first, before any long work."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"out_dir {path!r} exists and is not a directory")
        if os.listdir(path) and not (replace and os.path.exists(os.path.join(path, MARKER))):
            raise FileExistsError(
                f"out_dir {path!r} exists and is not an earlier corda_kernels export (no {MARKER}): "
                "refusing to replace it; remove it or choose another directory"
            )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[str]:
    """Yield a fresh hidden temporary directory next to ``path``; rename it to ``path`` on success.

    An existing ``path`` is replaced only if it is empty or is an earlier
    export (holds :data:`MARKER`); anything else raises ``FileExistsError``
    before any work is done, so a typo never deletes a user's directory.
    """
    # Through links, as file writes go (_io.atomic_path): renaming a link to an earlier export would
    # move the link itself and leave the export it points to stale.
    path = os.path.realpath(os.fspath(path))
    parent, base = os.path.split(path)
    check_out_dir(path, replace=replace)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        # mkdtemp creates the directory 0700 and the rename keeps that: give it the mode mkdir() would have.
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if os.path.lexists(path):
            # Two renames: the old export is never half-overwritten, and is only deleted once the new one is in place.
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, "x"), path)  # put the earlier export back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _within(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip(os.sep) + os.sep)


def check_not_source(out_dir: str | os.PathLike, source: str | os.PathLike, *, inside_ok: bool = False) -> None:
    """Raise ``ValueError`` naming both paths if writing ``out_dir`` would replace ``source`` or write into it.

    Paths are compared resolved (``os.path.realpath``), so links and ``..`` do not hide a match. An
    ``out_dir`` that holds ``source`` is refused too: replacing an earlier export deletes everything in it.
    ``inside_ok`` allows an ``out_dir`` inside ``source``.
    """
    out, src = os.path.realpath(out_dir), os.path.realpath(source)
    if out == src:
        how = "is"
    elif _within(src, out):
        how = "contains"
    elif _within(out, src) and not inside_ok:
        how = "lies inside"
    else:
        return
    raise ValueError(
        f"output directory {os.fspath(out_dir)!r} {how} the source directory {os.fspath(source)!r} "
        f"({out} vs {src}): writing there would replace or change the source; choose a directory outside it"
    )


def _check_not_model_source(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Refuse to replace the local directory ``model`` was loaded from (e.g. by :func:`load_pretrained`)."""
    src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(src, (str, os.PathLike)) and os.fspath(src) and os.path.isdir(src):
        # transformers memory-maps the checkpoint it loads, so the model's weights are still read from there.
        # Writing next to those files is harmless, hence inside_ok.
        check_not_source(out_dir, src, inside_ok=True)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _num(x: float) -> int | float:
    """JSON-friendly alpha: PEFT configs usually hold ints."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------- the adapter
@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory: ``state_dict`` with PEFT's key names and the ``adapter_config.json`` dict."""

    state_dict: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``path``, atomically."""
        with atomic_dir(path) as tmp:
            self._write(tmp)
            _write_json(os.path.join(tmp, MARKER), {"format": EXPORT_FORMAT, "kind": "adapter"})

    def _write(self, directory: str) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict.items()}
        save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(os.path.join(directory, ADAPTER_CONFIG), self.config)

    def peft_config(self) -> LoraConfig:
        """The config as a ``peft.LoraConfig`` (needs peft)."""
        from peft import LoraConfig

        keys = set(LoraConfig.__dataclass_fields__)
        return LoraConfig(**{k: v for k, v in self.config.items() if k in keys and k != "peft_type"})


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith("ForCausalLM") or name.endswith("LMHeadModel") else None


def _lora_config(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    *,
    conv1d: bool,
    dropout: float,
    task_type: str | None,
    base_model_name_or_path: str | None,
) -> dict:
    """adapter_config.json for a LoRA with per-module ranks/alphas (most common value + patterns)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # PEFT matches a pattern key k against a module name with re.match(r"(.*\.)?(k)$"): full names match only themselves.
    rank_pattern = {n: v for n, v in ranks.items() if v != r}
    alpha_pattern = {n: _num(v) for n, v in alphas.items() if v != alpha}
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _num(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # Full module names: PEFT's list matching is `name == t or name.endswith("." + t)`.
        "target_modules": sorted(ranks),
        "lora_dropout": float(dropout),
        # transformers' Conv1D stores W transposed; PEFT needs to be told (A and B keep the usual layouts).
        "fan_in_fan_out": bool(conv1d),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    try:
        import peft
        from peft import LoraConfig

        # Round-trip through LoraConfig so the file has every field this peft version writes.
        full = LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"}).to_dict()
        full = {k: (sorted(v) if isinstance(v, set) else v) for k, v in full.items()}
        full["peft_type"] = "LORA"
        full["peft_version"] = peft.__version__
        for k in ("rank_pattern", "alpha_pattern", "target_modules"):
            full[k] = cfg[k]
        return json.loads(json.dumps(full, default=str))
    except ImportError:
        return cfg


def _warn_if_peft_rewrites(cfg: dict, model: nn.Module) -> None:
    """PEFT's loader rewrites the LoRA targets of some MoE models for transformers 5 (their v4 names
    ``gate_proj``/``up_proj``/``down_proj`` become fused-expert parameters), also for dense MLPs and
    shared experts that keep those names: PeftModel.from_pretrained would then drop their adapters."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return
    try:
        fields = LoraConfig.__dataclass_fields__
        probe = LoraConfig(**{k: v for k, v in cfg.items() if k in fields and k != "peft_type"})
        before = set(probe.target_modules or ())
        convert_peft_config_for_transformers(probe, model, conversions=None)
        lost = sorted(before - set(probe.target_modules or ()))
    except Exception:  # noqa: BLE001 - a probe of PEFT internals must never break an export
        return
    if lost:
        warnings.warn(
            f"PEFT will rewrite {len(lost)} of this adapter's targets when loading it on this "
            f"{getattr(model.config, 'model_type', '')} model (e.g. {lost[:3]}: its transformers-v5 MoE "
            "conversion), so PeftModel.from_pretrained would drop those adapters; load the export with "
            "corda_kernels.load_pretrained instead",
            stacklevel=3,
        )


def _one_dropout(layers: Mapping[str, CordaLinear]) -> float:
    """PEFT's config holds one dropout for every layer: the largest, with a warning where they differ."""
    values = {float(m.dropout) for m in layers.values()}
    if len(values) > 1:
        warnings.warn(
            f"the layers' adapter dropouts differ ({sorted(values)}); a PEFT adapter config holds one, so the "
            f"PEFT adapter takes {max(values)} for every layer (corda_kernels' own export keeps each layer's)",
            stacklevel=3,
        )
    return max(values)


def _require_layers(model: nn.Module, what: str) -> dict[str, CordaLinear]:
    layers = corda_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no CordaLinear layer (run build_corda first)")
    return layers


def adapter_state(model: nn.Module, *, base_model_name_or_path: str | None = None) -> LoraAdapter:
    """The model's CorDA adapters as a PEFT LoRA adapter for the *residual* base model."""
    model = unwrap_model(model)
    layers = _require_layers(model, "adapter_state")
    sd = {}
    for name, layer in layers.items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    dropout = _one_dropout(layers)
    cfg = _lora_config(
        {n: m.rank for n, m in layers.items()},
        {n: m.alpha for n, m in layers.items()},
        conv1d=any(m.base_type == "conv1d" for m in layers.values()),
        dropout=dropout,
        task_type=_task_type(model),
        base_model_name_or_path=base_model_name_or_path,
    )
    _warn_if_peft_rewrites(cfg, model)
    return LoraAdapter(sd, cfg)


# ---------------------------------------------------------------------- residual model
def _plain_layer(layer: CordaLinear) -> nn.Module:
    """A plain layer of the original type holding the residual; shares storage with ``layer`` where the layout allows."""
    with torch.device("meta"):
        # Built on the meta device so no throwaway random init is computed for large layers.
        plain = (
            Conv1D(layer.out_features, layer.in_features)
            if layer.base_type == "conv1d"
            else nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        )
    w = layer.weight.detach()
    plain.weight = nn.Parameter(w.t().contiguous() if layer.base_type == "conv1d" else w, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    elif layer.base_type == "conv1d":
        plain.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device), requires_grad=False)
    return plain


@contextlib.contextmanager
def residual_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every CordaLinear for a plain layer holding its residual; restored on exit, even on error."""
    model = unwrap_model(model)
    layers = corda_layers(model)
    swap_modules(model, {name: _plain_layer(layer) for name, layer in layers.items()})
    try:
        yield model
    finally:
        swap_modules(model, layers)


# ---------------------------------------------------------------------- save
def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    format: str = "peft",
    tokenizer: PreTrainedTokenizerBase | ProcessorMixin | None = None,
    **save_kwargs,
) -> str:
    """Write ``out_dir/residual`` (transformers checkpoint) and ``out_dir/adapter`` (PEFT LoRA); returns
    ``out_dir`` as an absolute path. ``format``: ``"peft"``, the one format so far.

    The residual checkpoint holds plain layers of the original types with the
    residual weights, so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir/"residual"),
    out_dir/"adapter")`` reproduces ``model``. ``model`` itself is left
    unchanged. The whole directory appears atomically; an existing
    ``out_dir`` is replaced only if it is an earlier export. A ``tokenizer``
    is saved with the residual model; ``save_kwargs`` go to the model's own
    ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    if format != "peft":
        raise ValueError(f"format must be 'peft', got {format!r}")
    model = unwrap_model(model)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with save_pretrained), got {type(model).__name__}"
        )
    layers = _require_layers(model, "save_pretrained")
    final = os.path.abspath(os.fspath(out_dir))
    _check_not_model_source(model, final)
    with atomic_dir(final) as tmp:
        with residual_view(model):
            model.save_pretrained(os.path.join(tmp, "residual"), **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "residual"))
        adapter = adapter_state(model, base_model_name_or_path=os.path.join(final, "residual"))
        adapter._write(_mkdir(os.path.join(tmp, "adapter")))
        meta = {
            "format": EXPORT_FORMAT,
            "kind": "corda",
            "residual": "residual",
            "adapter": "adapter",
            "model_class": type(model).__name__,
            "layers": {
                n: {"rank": m.rank, "alpha": m.alpha, "mode": m.mode, "base_type": m.base_type, "dropout": m.dropout}
                for n, m in layers.items()
            },
        }
        _write_json(os.path.join(tmp, MARKER), meta)
    return final


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ---------------------------------------------------------------------- to a LoRA on the original weights
def _rank_r_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U·√S, √S·Vᵀ) of the best rank-r approximation of ``delta`` (float64), and the Frobenius norm of the rest."""
    m, n = delta.shape
    q = r + 8
    if q >= min(m, n):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        # delta is rank r up to rounding, so a randomized range finder with oversampling recovers it
        # at O(m·n·q) cost instead of a full SVD of a (d_out, d_in) matrix per layer.
        g = torch.Generator(device=delta.device).manual_seed(0) if delta.device.type == "cpu" else None
        omega = torch.randn(n, q, dtype=delta.dtype, device=delta.device, generator=g)
        y = delta @ omega
        for _ in range(2):
            y, _ = torch.linalg.qr(y)
            y = delta @ (delta.T @ y)
        qm, _ = torch.linalg.qr(y)
        ub, s, vh = torch.linalg.svd(qm.T @ delta, full_matrices=False)
        u = qm @ ub
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    b, a = u * root, root.unsqueeze(1) * vh
    # Measured, not sqrt(|delta|² − Σs²): that difference of two nearly equal squares leaves ~1e-8·|delta|
    # of cancellation noise even in float64, above the rounding a float64 residual is checked against.
    tail = float(torch.addmm(delta, b, a, alpha=-1).norm())
    return b, a, tail


def _rounding_eps(t: torch.Tensor) -> float:
    """eps of the narrowest float dtype that holds every value of ``t`` exactly.

    A residual rounded to bf16 at build time and upcast afterwards (``model.float()``, ``--dtype``)
    still carries bf16's rounding, which its current dtype's eps would wrongly call too large."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if torch.finfo(dt).bits < torch.finfo(t.dtype).bits and torch.equal(t.to(dt).to(t.dtype), t):
            return torch.finfo(dt).eps
    return torch.finfo(t.dtype).eps


def _original_weight(original: Mapping[str, torch.Tensor], name: str, layer: CordaLinear) -> torch.Tensor:
    for key in (f"{name}.weight", f"{PEFT_PREFIX}{name}.weight", f"{PEFT_PREFIX}{name}.base_layer.weight"):
        if key in original:
            w = original[key]
            break
    else:
        raise KeyError(f"original_state_dict has no weight for module {name!r} (looked for '{name}.weight')")
    shape = (layer.out_features, layer.in_features)
    if layer.base_type == "conv1d" and tuple(w.shape) == shape[::-1]:
        w = w.t()
    if tuple(w.shape) != shape:
        raise ValueError(
            f"original weight of module {name!r} has shape {tuple(w.shape)}, but the layer is (d_out, d_in) = {shape}"
        )
    return w


@torch.no_grad()
def to_lora(
    model: nn.Module,
    original_state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> LoraAdapter:
    """The trained CorDA adapters as a plain rank-2r LoRA on the *original* weights (PEFT's PiSSA/CorDA conversion).

    With init factors (A₀, B₀) and trained (A, B), the original layer plus
    s·[B, −B₀]·[A; A₀] equals residual + s·B·A, because the residual is
    W − s·B₀A₀. The init factors are not stored anywhere, so they are
    recovered from ``original_state_dict``: W − residual = s·B₀A₀ has rank r,
    and its rank-r SVD gives factors with the same product (exact up to the
    rounding of the stored residual: fp32 models match to ~1e-6, bf16/fp16
    ones to their own rounding, also after the model was cast to a wider dtype). Alpha is doubled with the rank, so the scaling
    is unchanged. Returns a :class:`LoraAdapter`; with ``out_dir`` it is also
    written there (load it with ``PeftModel.from_pretrained(original_model, out_dir)``).
    ``base_model_name_or_path`` is recorded in its ``adapter_config.json``.
    """
    model = unwrap_model(model)
    layers = _require_layers(model, "to_lora")
    if out_dir is not None:
        _check_not_model_source(model, out_dir)
    sd: dict[str, torch.Tensor] = {}
    own = [n for n in layers if f"{n}.lora_A" in original_state_dict]
    if own:
        raise ValueError(
            f"module {own[0]!r}: original_state_dict holds its adapter ('{own[0]}.lora_A'); it looks like this "
            "CorDA model's own state dict, not the model it was built from"
        )
    unchanged = []
    for name, layer in layers.items():
        res = layer.weight.detach()
        w0 = _original_weight(original_state_dict, name, layer).to(device=res.device, dtype=torch.float64)
        delta = w0 - res.double()
        # The residual's own values give exactly 0 here (both are cast from the same dtype, so the float64
        # difference is exact), and then B0 = A0 = 0. That is right for a layer whose initial adapter was
        # exactly zero (KPM on a rank-deficient weight, such as pruned rows), but not for every layer: then
        # original_state_dict holds the residuals, and the LoRA would silently drop -s*B0A0 everywhere.
        # A genuine original differs by s*B0A0, which can be a few ulps of W (KPM's smallest components),
        # so only what is zero up to float64 noise counts. Strict <: an all-zero W has B0A0 = 0 too.
        if float(delta.norm()) < 1e-12 * float(w0.norm()):
            unchanged.append(name)
        s = layer.scaling
        b0, a0, tail = _rank_r_factors(delta / s, layer.rank)
        eps = _rounding_eps(res)
        # tail is of delta/s: the residual's rounding is scaled by 1/s in it too. That rounding is at most
        # eps/2 of each element of the residual (typically ~0.3·eps·|residual| in norm): 2·eps leaves a 4x
        # margin, and a wrong original a few percent off in bf16 is still refused (16·eps let 10% through).
        bound = 2 * eps * max(float(w0.norm()), float(res.double().norm()))
        if s * tail > bound + 1e-12:
            raise ValueError(
                f"module {name!r}: the original weight minus the residual is not a rank-{layer.rank} matrix "
                f"(remainder {s * tail:.3g} vs |W| {float(w0.norm()):.3g}); is original_state_dict the model this "
                "CorDA model was built from?"
            )
        dt = layer.lora_A.dtype
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([layer.lora_A.detach(), a0.to(dt)], dim=0)
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat([layer.lora_B.detach(), -b0.to(dt)], dim=1)
    if len(unchanged) == len(layers) and any(float(m.weight.detach().norm()) > 0 for m in layers.values()):
        raise ValueError(
            f"module {unchanged[0]!r}: the original weight equals the residual in every layer; "
            "original_state_dict looks like this CorDA model's residual weights, not the model it was built from"
        )
    cfg = _lora_config(
        {n: 2 * m.rank for n, m in layers.items()},
        {n: 2 * m.alpha for n, m in layers.items()},
        conv1d=any(m.base_type == "conv1d" for m in layers.values()),
        dropout=_one_dropout(layers),
        task_type=_task_type(model),
        base_model_name_or_path=base_model_name_or_path,
    )
    _warn_if_peft_rewrites(cfg, model)
    adapter = LoraAdapter(sd, cfg)
    if out_dir is not None:
        adapter.save(out_dir)
    return adapter


# ---------------------------------------------------------------------- import
_ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    """``a`` holds values that ``b`` would round (bf16 and fp16 each hold values the other rounds)."""
    return a != b and torch.promote_types(a, b) != b


def _adapter_dtype(choice, saved: torch.dtype, base: torch.dtype) -> torch.dtype:
    if choice is None or not saved.is_floating_point:
        return base
    if choice == "widest":
        wide = torch.promote_types(saved, base)
        # autocast runs fp32 operands over a 16-bit base, not fp64: fp64 adapters stop at fp32 there.
        return torch.float32 if wide == torch.float64 and base != torch.float64 else wide
    return choice


def _swap_in(
    model: nn.Module, name: str, base: nn.Module, A, B, *, alpha: float, dropout: float, mode: str, tied: bool
) -> None:
    """``tied``: ``base`` was tied to another parameter (see :func:`_untie_targets`, which the callers run
    once for all layers): its weight becomes its own copy, since storage shared with the embedding would
    be saved once, as a tie."""
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise TypeError(f"module {name!r}: a LoRA on a {type(base).__name__} cannot become a CordaLinear")
    w = linear_weight(base).detach()
    if tied:
        w = w.clone()
    # PEFT keeps adapters in fp32 over a 16-bit base (autocast_adapter_dtype); a CordaLinear holds one dtype.
    A, B = A.detach().to(w.dtype), B.detach().to(w.dtype)
    layer = CordaLinear.from_factors(base, w, A, B, alpha=alpha, dropout=dropout, mode=mode)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    swap_modules(model, {name: layer})


@torch.no_grad()
def from_peft(peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Turn a PEFT LoRA (or PEFT-CorDA) model into the underlying transformers model with CordaLinear layers.

    Works in place on the wrapped model and returns it; the PEFT wrapper must
    not be used afterwards. Outputs are unchanged: each ``CordaLinear`` holds
    the LoRA layer's base weight, A, B and scaling (alpha is set to
    scaling·r, so rsLoRA carries over). Only ``adapter_name`` (default: the
    active adapter) is kept. DoRA, LoRA biases and LoRA on non-linear layers
    raise, naming the layer. Adapters PEFT keeps in fp32 over a bf16/fp16 base
    are cast to the base's dtype (a CordaLinear holds one dtype), so outputs then
    match PEFT's to that dtype's rounding.
    """
    from peft.tuners.lora import LoraLayer

    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older peft
        ModulesToSaveWrapper = ()  # type: ignore[assignment]

    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(peft_model, PeftModel):
        lora_model = peft_model.base_model
    elif isinstance(peft_model, BaseTuner):
        lora_model = peft_model
    else:
        raise TypeError(f"peft_model must be a peft PeftModel or LoraModel, got {type(peft_model).__name__}")
    inner = lora_model.model
    if adapter_name is None:
        active = getattr(lora_model, "active_adapter", "default")
        if isinstance(active, (list, tuple)):
            if len(active) != 1:
                raise ValueError(f"several adapters are active ({list(active)}): pass adapter_name=")
            active = active[0]
        adapter_name = active
    cfg = lora_model.peft_config.get(adapter_name)
    if cfg is None:
        raise ValueError(f"adapter_name {adapter_name!r} is not one of {sorted(lora_model.peft_config)}")
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    if peft_type != "LORA":
        raise ValueError(f"from_peft converts LoRA adapters; adapter {adapter_name!r} is {peft_type}")
    corda_cfg = getattr(cfg, "corda_config", None)
    mode = getattr(corda_cfg, "corda_method", None) or "lora"

    # Everything is checked before the first layer is swapped: an error leaves the PEFT model as it was.
    convert, wrapped = [], set()
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) or (ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper)):
            wrapped.update(id(m) for m in module.modules())
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"module {name!r} holds an embedding LoRA, which a CordaLinear cannot hold")
        if adapter_name not in module.lora_A:
            convert.append((name, module, base, False))
            continue
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"module {name!r}: a LoRA on a {type(base).__name__} cannot become a CordaLinear")
        if module.use_dora.get(adapter_name, False):
            raise ValueError(f"module {name!r} uses DoRA, which CordaLinear does not implement")
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise ValueError(f"module {name!r} has a LoRA bias (lora_bias=True), which CordaLinear does not hold")
        convert.append((name, module, base, True))
    for name, module in inner.named_modules():
        if type(module).__module__.startswith("peft.") and id(module) not in wrapped:
            raise ValueError(f"module {name!r} is a PEFT {type(module).__name__}: not convertible")

    # A tied head (PEFT's LoRA on lm_head over tied embeddings) stops being tied, as build_corda does:
    # else tie_weights() after a merge would put the embedding back over the merged head.
    tied = _untie_targets(inner, {name: base for name, _, base, has_adapter in convert if has_adapter})
    for name, module, base, has_adapter in convert:
        if not has_adapter:  # a LoRA layer of another adapter only
            parent, child = get_submodule_parent(inner, name)
            setattr(parent, child, base)
            continue
        if getattr(module, "merged", False):
            module.unmerge()
        drop = module.lora_dropout[adapter_name]
        r = module.r[adapter_name]
        _swap_in(
            inner,
            name,
            base,
            module.lora_A[adapter_name].weight,
            module.lora_B[adapter_name].weight,
            alpha=float(module.scaling[adapter_name]) * r,
            dropout=float(getattr(drop, "p", 0.0)),
            mode=mode,
            tied=name in tied,
        )
    no_fused_transformer_paths(inner)
    checkpointing_ready(inner)
    for name, module in list(inner.named_modules()):
        if ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            keep = module.modules_to_save[adapter_name] if adapter_name in module.modules_to_save else None
            parent, child = get_submodule_parent(inner, name)
            setattr(parent, child, keep if keep is not None else module.original_module)
    left = [n for n, m in inner.named_modules() if type(m).__module__.startswith("peft.")]
    if left:  # pragma: no cover - every PEFT module was checked above
        raise ValueError(f"module {left[0]!r} is a PEFT {type(inner.get_submodule(left[0])).__name__}: not convertible")
    return inner


def _saved_model_class(name: str | None):
    """The transformers class an export was saved from (exports before it was recorded: a causal LM)."""
    import transformers

    cls = getattr(transformers, name, None) if name else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM


def load_pretrained(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    adapter_dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a :func:`save_pretrained` directory back as a transformers model with CordaLinear layers (no peft needed).

    ``model_class`` defaults to the transformers class the export was saved from
    (``AutoModelForCausalLM`` for exports that did not record it); files are read from
    ``path`` only (``local_files_only=True``). Only ``lora_A``/``lora_B`` are
    trainable afterwards, as after :func:`build_corda`.

    ``adapter_dtype``: None (default) casts A and B to the base weight's dtype, with a
    warning when that rounds them (fp32 adapters trained over a bf16 base); a dtype
    casts them to it; ``"widest"`` keeps, per layer, the wider of the saved and the
    base dtype (at most float32 over a 16-bit base), so nothing is rounded. Adapters wider
    than the base run under ``torch.autocast`` (or are merged or exported), as they were trained.
    """
    from safetensors.torch import load_file

    if not (adapter_dtype is None or adapter_dtype == "widest" or adapter_dtype in _ADAPTER_DTYPES):
        raise ValueError(f"adapter_dtype must be None, 'widest' or a floating-point torch.dtype, got {adapter_dtype!r}")
    path = os.fspath(path)
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        raise FileNotFoundError(f"{path!r} is not a corda_kernels export (no {MARKER})")
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker} is corrupt (not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or meta.get("kind") != "corda":
        what = (meta.get("kind"), meta.get("format")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{path!r} holds {what[0]!r} export format {what[1]!r}, not a CorDA model")
    residual, adir = os.path.join(path, meta["residual"]), os.path.join(path, meta["adapter"])
    # Checked first: from_pretrained on a directory without config.json would build the class's default
    # configuration (for Llama, 7B parameters) before failing.
    for need in (
        os.path.join(residual, "config.json"),
        os.path.join(adir, ADAPTER_CONFIG),
        os.path.join(adir, ADAPTER_WEIGHTS),
    ):
        if not os.path.isfile(need):
            raise FileNotFoundError(f"export {path!r} is incomplete: {need} is missing")
    if model_class is None:
        model_class = _saved_model_class(meta.get("model_class"))
    from_pretrained_kwargs.setdefault("local_files_only", True)
    model = model_class.from_pretrained(residual, **_for_this_transformers(from_pretrained_kwargs))
    with open(os.path.join(adir, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    sd = load_file(os.path.join(adir, ADAPTER_WEIGHTS))
    bases = {}
    for name in meta["layers"]:
        try:
            bases[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the residual model ({type(model).__name__}) has no module {name!r} named by the adapter; "
                "pass model_class= the class the export was saved from"
            ) from None
    tied = _untie_targets(model, bases)  # an export from before heads were untied may still say so
    narrowed: list[tuple[str, torch.dtype, torch.dtype]] = []  # (layer, saved dtype, base dtype)
    for name, info in meta["layers"].items():
        base = bases[name]
        w = linear_weight(base)
        keys = [f"{PEFT_PREFIX}{name}.lora_{x}.weight" for x in "AB"]
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"export {path!r}: the adapter has no tensor {missing[0]!r} for layer {name!r}")
        saved = [sd[k] for k in keys]
        A, B = (t.to(device=w.device, dtype=w.dtype) for t in saved)
        r = int(info["rank"])
        if tuple(A.shape) != (r, w.shape[1]) or tuple(B.shape) != (w.shape[0], r):
            raise ValueError(
                f"export {path!r}: layer {name!r} of rank {r} and weight {tuple(w.shape)} needs lora_A "
                f"{(r, w.shape[1])} and lora_B {(w.shape[0], r)}, the adapter holds {tuple(A.shape)} and {tuple(B.shape)}"
            )
        _swap_in(
            model,
            name,
            base,
            A,
            B,
            alpha=float(info["alpha"]),
            dropout=float(info.get("dropout", cfg.get("lora_dropout", 0.0))),  # per layer since 2026-11-30
            mode=info.get("mode", "kpm"),
            tied=name in tied,
        )
        want = _adapter_dtype(adapter_dtype, saved[0].dtype, w.dtype)
        if want != w.dtype:
            layer = model.get_submodule(name)
            layer.lora_A = nn.Parameter(saved[0].to(device=w.device, dtype=want))
            layer.lora_B = nn.Parameter(saved[1].to(device=w.device, dtype=want))
        elif adapter_dtype is None and _wider(saved[0].dtype, w.dtype):
            narrowed.append((name, saved[0].dtype, w.dtype))
    if narrowed:
        names = ", ".join(n for n, _, _ in narrowed[:3]) + (", ..." if len(narrowed) > 3 else "")
        _, saved_dtype, base_dtype = narrowed[0]
        warnings.warn(
            f"load_pretrained: the adapters of {len(narrowed)} layers ({names}) were saved in {saved_dtype} "
            f"and are rounded to the base's {base_dtype}; pass adapter_dtype='widest' "
            "to keep them (and run the model under torch.autocast)",
            stacklevel=2,
        )
    no_fused_transformer_paths(model)
    checkpointing_ready(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".lora_A") or n.endswith(".lora_B"))
    return model
