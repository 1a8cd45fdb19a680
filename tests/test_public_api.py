"""The public API documents itself: every exported function, class and public method has a docstring,
and every parameter of an exported function or method carries a type hint."""

import inspect

import pytest

import corda_kernels as ck
from corda_kernels import ops

OPS = ["covariance_update", "covariance_result", "lora_linear", "KeptRows"]


def _public():
    for name in ck.__all__:
        if name not in ("__version__", "ops"):
            yield name, getattr(ck, name)
    for name in OPS:
        yield f"ops.{name}", getattr(ops, name)


def _callables(name, obj):
    """(qualified name, function) for a function, or a class's own public methods and properties."""
    if inspect.isclass(obj):
        yield name, obj  # its docstring
        for attr, member in vars(obj).items():
            if attr.startswith("_") and attr not in ("__init__",):
                continue
            if isinstance(member, property):
                yield f"{name}.{attr}", member.fget
            elif isinstance(member, (classmethod, staticmethod)):
                yield f"{name}.{attr}", member.__func__
            elif inspect.isfunction(member):
                yield f"{name}.{attr}", member
    else:
        yield name, obj


CASES = [c for n, o in _public() for c in _callables(n, o)]


@pytest.mark.parametrize("qualname, fn", CASES, ids=[c[0] for c in CASES])
def test_documented_and_typed(qualname, fn):
    if qualname.endswith(".__init__"):
        if fn is object.__init__:
            return
    else:
        assert (fn.__doc__ or "").strip(), f"{qualname} has no docstring"
    if inspect.isclass(fn) or not callable(fn):
        return
    sig = inspect.signature(fn)
    untyped = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.annotation is inspect.Parameter.empty
    ]
    assert not untyped, f"{qualname}: parameters without a type hint: {untyped}"
    if not qualname.endswith(".__init__"):
        assert sig.return_annotation is not inspect.Signature.empty, f"{qualname} has no return annotation"
