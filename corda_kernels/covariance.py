"""The ``Covariances`` container: per-module input covariances, shared by group."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ._io import atomic_write

FORMAT = "corda_kernels.covariances/1"


def model_fingerprint(shapes: Mapping[str, tuple[int, int]]) -> str:
    """A short hash of target names and (d_out, d_in) shapes: identifies an architecture."""
    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(f"{name}:{shapes[name][0]}x{shapes[name][1]};".encode())
    return h.hexdigest()[:16]


class Covariances(Mapping[str, torch.Tensor]):
    """Module name -> (d_in, d_in) input covariance.

    Modules that read the same input tensor (q/k/v, gate/up) share one matrix:
    ``groups`` lists them, and indexing any member returns the same tensor.
    ``tokens`` is the number of counted (unmasked) token rows of the first
    group; ``token_counts`` has it per module. ``normalize`` records how the
    sums were scaled ("mean", "peft" or "sum").
    """

    def __init__(
        self,
        matrices: Sequence[torch.Tensor],
        groups: Sequence[Sequence[str]],
        *,
        token_counts: Sequence[int],
        normalize: str = "mean",
        shapes: Mapping[str, tuple[int, int]] | None = None,
        sequences: int | None = None,
        meta: Mapping[str, str] | None = None,
    ):
        if len(matrices) != len(groups) or len(groups) != len(token_counts):
            raise ValueError("matrices, groups and token_counts must have one entry per group")
        self._mats = list(matrices)
        self.groups: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in groups)
        self._index: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            for name in g:
                if name in self._index:
                    raise ValueError(f"module {name!r} appears in two covariance groups")
                self._index[name] = i
        self._group_tokens = [int(t) for t in token_counts]
        self.normalize = normalize
        self.shapes: dict[str, tuple[int, int]] = dict(shapes or {})
        self.sequences = sequences
        self.meta: dict[str, str] = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._mats[self._index[name]]
        except KeyError:
            raise KeyError(f"no covariance for module {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"Covariances({len(self)} modules in {len(self.groups)} groups, tokens={self.tokens})"

    @property
    def tokens(self) -> int:
        return self._group_tokens[0] if self._group_tokens else 0

    @property
    def token_counts(self) -> dict[str, int]:
        return {n: self._group_tokens[i] for n, i in self._index.items()}

    def group_of(self, name: str) -> tuple[str, ...]:
        return self.groups[self._index[name]]

    def matrices(self) -> list[torch.Tensor]:
        """One matrix per group, in ``groups`` order."""
        return list(self._mats)

    @property
    def fingerprint(self) -> str | None:
        return model_fingerprint(self.shapes) if self.shapes else None

    def to(self, device=None, dtype=None) -> Covariances:
        """A copy on ``device`` and/or in ``dtype`` (``covs.to(torch.float64)`` works, as for tensors)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        mats = [m.to(device=device, dtype=dtype) for m in self._mats]
        return Covariances(
            mats,
            self.groups,
            token_counts=self._group_tokens,
            normalize=self.normalize,
            shapes=self.shapes,
            sequences=self.sequences,
            meta=self.meta,
        )

    # Validation against a model
    def check_model(self, modules: Mapping[str, nn.Module]) -> None:
        """Raise ``ValueError`` naming the first module the file does not fit."""
        from ._targets import weight_shape

        for name, module in modules.items():
            d_out, d_in = weight_shape(module)
            if name not in self._index:
                hint = ""
                if self.shapes and not (set(self.shapes) & set(modules)):
                    hint = (
                        f" (the file covers {len(self.shapes)} other module(s), e.g. {next(iter(self.shapes))!r}: "
                        f"collected for other targets, or on another model, fingerprint {self.fingerprint})"
                    )
                raise ValueError(f"no covariance for module {name!r}{hint}")
            c = self[name]
            if tuple(c.shape) != (d_in, d_in):
                raise ValueError(
                    f"covariance for module {name!r} has shape {tuple(c.shape)}, but the layer has d_in={d_in}: "
                    "were the covariances collected on another model?"
                )
            if name in self.shapes and tuple(self.shapes[name]) != (d_out, d_in):
                raise ValueError(
                    f"covariance for module {name!r} was collected on a layer of shape {tuple(self.shapes[name])} "
                    f"(d_out, d_in), but this model's layer is {(d_out, d_in)}: another model?"
                )

    # Files
    def save(self, path) -> None:
        """Write a safetensors file (one tensor per group) with JSON metadata, atomically."""
        from safetensors.torch import save_file

        tensors = {f"group.{i}": m.detach().to("cpu").contiguous() for i, m in enumerate(self._mats)}
        meta = {
            "format": FORMAT,
            "groups": json.dumps([list(g) for g in self.groups]),
            "token_counts": json.dumps(self._group_tokens),
            "normalize": self.normalize,
            "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}),
            "sequences": json.dumps(self.sequences),
            "fingerprint": self.fingerprint or "",
            "meta": json.dumps(self.meta),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path, device=None) -> Covariances:
        """Read a file written by :meth:`save`.

        A missing file raises ``FileNotFoundError``; anything else that is not such a file (truncated,
        corrupt, another format) raises ``ValueError`` naming ``path``.
        """
        from safetensors import SafetensorError, safe_open

        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a corda_kernels covariance file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") == FORMAT:
                    groups = json.loads(meta["groups"])
                    mats = [f.get_tensor(f"group.{i}") for i in range(len(groups))]
        except SafetensorError as e:
            # safetensors' own error is no ValueError and does not name the file.
            raise ValueError(f"{path} is corrupt or not a corda_kernels covariance file (safetensors: {e})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file (bad metadata: {e!r})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a corda_kernels covariance file (format={meta.get('format')!r})")
        if device is not None:
            mats = [m.to(device) for m in mats]
        try:
            return cls(
                mats,
                groups,
                token_counts=json.loads(meta["token_counts"]),
                normalize=meta.get("normalize", "mean"),
                shapes={k: tuple(v) for k, v in json.loads(meta.get("shapes", "{}")).items()},
                sequences=json.loads(meta.get("sequences", "null")),
                meta=json.loads(meta.get("meta", "{}")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file (bad metadata: {e!r})") from None
