"""Which modules of a model are CorDA targets, and how to read their weights."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()  # type: ignore[assignment]

Targets = Iterable[str] | Callable[[str, nn.Module], bool] | None


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or Conv1D whose forward is the plain affine map, so CordaLinear can stand in for it."""
    return linear_class(module) is not None and own_forward(module) is None


def linear_class(module: nn.Module) -> type | None:
    """nn.Linear or Conv1D, whichever ``module`` is an instance of (a CordaLinear is neither)."""
    from .layer import CordaLinear

    if isinstance(module, CordaLinear):
        return None
    for cls in (nn.Linear, Conv1D) if Conv1D else (nn.Linear,):
        if isinstance(module, cls):
            return cls
    return None


def own_forward(module: nn.Module) -> str | None:
    """Why a linear subclass cannot be a target: its own forward is not the plain affine map (a router
    that returns a tuple, a grouped or quantized layer), and CordaLinear would silently replace it."""
    cls = linear_class(module)
    if cls is None or type(module).forward is cls.forward or _computes_the_affine_map(module):
        return None
    return (
        f"a {type(module).__name__}, a {cls.__name__} subclass whose own forward is not x·Wᵀ + b, "
        "which CordaLinear would not run"
    )


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to turn off
        return contextlib.nullcontext()


def _computes_the_affine_map(module: nn.Module) -> bool:
    """Probe a subclass's forward (Falcon's FalconLinear only writes x @ W.T + b out by hand) on three
    random rows, bypassing hooks; on the meta device only the output's shape can be checked.

    A subclass with state of its own (a learned output scale that starts at 1) is refused unprobed:
    its forward may be the plain map only until that state trains."""
    if set(module._parameters) - {"weight", "bias"} or module._buffers or module._modules:
        return False
    w = linear_weight(module)
    if not w.dtype.is_floating_point:
        return False  # a quantized weight: nothing to decompose
    bias = getattr(module, "bias", None)
    try:
        # Its own generator: probing must not move the caller's random stream (dropout, shuffling).
        g = torch.Generator(device=w.device).manual_seed(0) if w.device.type != "meta" else None
        x = torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device, generator=g)
        # Without autocast: both sides in the weight's dtype, so they differ by rounding alone.
        with torch.no_grad(), _no_autocast(w.device.type):
            y = type(module).forward(module, x)
            if not isinstance(y, torch.Tensor) or y.shape != (3, w.shape[0]) or y.dtype != w.dtype:
                return False
            if w.device.type == "meta":
                return True
            want = torch.nn.functional.linear(x, w, bias if isinstance(bias, torch.Tensor) else None)
            err = ((y.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    except Exception:  # noqa: BLE001 - a forward that needs more than x is not a plain linear
        return False
    return err < (1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2)


def _head_ids(model: nn.Module) -> set[int]:
    """The output head, and for a transformers model the output layer of each task head: the last
    linear of each top-level module outside the backbone (``model.base_model``), such as a
    classifier, a QA span layer or a CTC head, which start from scratch rather than from a
    decomposition. The heads' other layers (an MLM transform) stay targets."""
    ids = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            ids.add(id(head))
    model = unwrap_model(model)
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        inside = {id(m) for m in base.modules()}
        for child in model.children():
            if id(child) not in inside:
                last = [m for m in child.modules() if is_linear_like(m)][-1:]
                ids.update(id(m) for m in last)
    return ids


def _matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        # A bare word matches a name component ("q_proj"), anything else is a glob,
        # or a regex when prefixed with "re:".
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def built_hint(model: nn.Module) -> str:
    """Why a converted model has no targets left: its linear layers are CordaLinear now."""
    from .layer import CordaLinear

    n = sum(isinstance(m, CordaLinear) for m in model.modules())
    if not n:
        return ""
    return f" (build_corda already converted {n} of its layers to CordaLinear: merge_corda first, or use the original model)"


def _patterns(targets) -> list[str]:
    # Checked before the walk: a typo'd regex or a stray int must name targets=, not fail inside it.
    try:
        patterns = list(targets)
    except TypeError:
        raise TypeError(
            f"targets must be a list of names, globs or 're:' patterns, or a predicate (name, module) -> bool; "
            f"got {type(targets).__name__}"
        ) from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"targets entries must be strings, got {bad[:3]!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"targets pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


def find_targets(model: nn.Module, targets: Targets = None) -> dict[str, nn.Module]:
    """Map name -> module for every target, in ``named_modules`` order.

    Default: every ``nn.Linear`` and transformers ``Conv1D`` except the output
    head, a transformers task head's output layer (see :func:`_head_ids`) and
    one-output layers (scalar gates). ``targets`` is a list of names/globs/"re:" regexes, or a predicate
    ``(name, module) -> bool``; only linear-like modules are ever returned. Names are those inside
    torch.compile's and (Distributed)DataParallel's wrappers, so covariances collected through one
    fit the plain model.
    """
    model = unwrap_model(model)
    head = _head_ids(model)
    unused = unused_linears(model)
    if isinstance(targets, str):
        targets = [targets]
    patterns = None if targets is None or callable(targets) else _patterns(targets)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or linear_class(module) is None:
            continue
        if targets is None:
            # A one-output layer (Qwen2-MoE's shared_expert_gate) has rank 1: its whole weight
            # would be the adapter, leaving no principal part to keep.
            if id(module) in head or id(module) in unused or own_forward(module) or weight_shape(module)[0] == 1:
                continue
        else:
            if not (targets(name, module) if callable(targets) else _matches(name, patterns)):
                continue
            check_target(name, module, unused)  # asked for by name or predicate: refused by name
        out[name] = module
    if targets is not None and patterns is not None and not out:
        raise ValueError(f"targets {patterns} matched no nn.Linear or Conv1D module of the model{built_hint(model)}")
    return out


def unused_linears(model: nn.Module) -> dict[int, str]:
    """id -> why, for the linear layers whose forward never runs: their owner reads the weight itself."""
    # nn.MultiheadAttention passes out_proj.weight to a functional kernel: out_proj's own forward
    # never runs, so it collects nothing and an adapter there would never apply.
    unused = {
        id(m.out_proj): f"the out_proj of nn.MultiheadAttention {name!r}, which reads its weight directly"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    # transformers' Mamba mixers multiply by dt_proj.weight themselves (always on transformers 5, and
    # in the CUDA fast path on 4): an adapter there would never apply.
    unused.update(
        {
            id(m.dt_proj): f"the dt_proj of Mamba mixer {name!r}, whose weight the mixer reads directly"
            for name, m in model.named_modules()
            if "Mamba" in type(m).__name__ and isinstance(getattr(m, "dt_proj", None), nn.Linear)
        }
    )
    return unused


def check_target(name: str, module: nn.Module, unused: Mapping[int, str], where: str = "targets=") -> None:
    """Refuse, by name, a linear layer asked for as a target that CordaLinear cannot stand in for."""
    if id(module) in unused:
        raise ValueError(
            f"module {name!r} is {unused[id(module)]} (the module's forward never runs): it cannot hold "
            f"an adapter; leave it out of {where}"
        )
    why = own_forward(module)
    if why:
        raise ValueError(f"module {name!r} is {why}: it cannot hold an adapter; leave it out of {where}")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) in nn.Linear convention, whatever the layer type stores."""
    w = module.weight
    if Conv1D and isinstance(module, Conv1D):
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight as a view (Conv1D stores it transposed)."""
    w = module.weight
    if Conv1D and isinstance(module, Conv1D):
        return w.t()
    return w


def _wrapper_chain(model: nn.Module):
    """``model``, then each module inside torch.compile's and (Distributed)DataParallel's wrappers."""
    while True:
        yield model
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's, DistributedDataParallel's and DataParallel's wrappers.

    Their forwards take (*args, **kwargs) and their parameter names carry a prefix
    (``_orig_mod.``, ``module.``) that a saved adapter must not.
    """
    *_, inner = _wrapper_chain(model)
    return inner


def ddp_wrapped(model: nn.Module) -> bool:
    """Whether a DistributedDataParallel wrapper sits anywhere between ``model`` and its inner module."""
    return any(isinstance(m, nn.parallel.DistributedDataParallel) for m in _wrapper_chain(model))


#: The prefixes torch.compile's and (Distributed)DataParallel's wrappers put before every module name.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def module_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) slot that holds it, from one walk of the model."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, child_name))
    return slots


def swap_modules(
    model: nn.Module, new: Mapping[str, nn.Module], slots: dict[int, list[tuple[nn.Module, str]]] | None = None
) -> None:
    """Put ``new[name]`` in place of the module at ``name``, and in every other slot holding that same module.

    ``named_modules()`` lists a module registered twice (``self.b = self.a``) under one name
    only; replacing just that slot would untie the alias and leave the other call site on
    the old layer. ``slots`` (from :func:`module_slots`, updated here) saves a walk of the
    whole model per call when layers are swapped one at a time (quadratic on a large MoE).
    """
    if slots is not None:
        for name, layer in new.items():
            old = model.get_submodule(name)
            for parent, attr in slots.pop(id(old), ()):
                if parent._modules.get(attr) is old:
                    setattr(parent, attr, layer)
        return
    old = {id(model.get_submodule(name)): (model.get_submodule(name), layer) for name, layer in new.items()}
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            hit = old.get(id(child)) if child is not None else None
            if hit is not None and hit[0] is child:
                setattr(parent, child_name, hit[1])


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
