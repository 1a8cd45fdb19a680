"""The ``Covariances`` container: per-module input covariances, shared by group."""

from __future__ import annotations

import functools
import hashlib
import json
import math
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


#: Relative to ‖W‖_F: how far a layer's weight signature may move before the weights count as
#: another model's. bf16/fp16 rounding moves it by ~1e-3; independently trained (or initialized)
#: weights by O(1) in the projection.
SIGNATURE_TOLERANCE = 1e-2
_NORMALIZE = ("mean", "peft", "sum")


@functools.lru_cache(maxsize=64)
def _signs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED + n)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


def weight_signatures(modules: Mapping[str, nn.Module]) -> dict[str, tuple[float, float]]:
    """name -> (‖W‖_F, uᵀWv) with fixed ±1 vectors u, v: which weights a covariance was collected on.

    One matrix-vector product per layer and one host read per device; the projection tells apart
    weights of equal norm (two random initializations of one architecture).
    """
    from ._targets import linear_weight

    if not modules:
        return {}
    names, sigs, by_device = [], [], {}
    for name, module in modules.items():
        w = linear_weight(module).detach()
        if w.device.type == "meta":  # offloaded (accelerate): no values to sign; left unchecked
            continue
        d_out, d_in = w.shape
        v, u = _signs(d_in).to(w.device), _signs(d_out).to(w.device, torch.float64)
        sq = proj = torch.zeros((), dtype=torch.float64, device=w.device)
        step = max(1, (1 << 22) // max(d_in, 1))  # rows a chunk: a few MiB in fp32, never a full copy
        for r in range(0, d_out, step):
            chunk = w[r : r + step].float()  # also float8 and other storage types
            sq = sq + chunk.square().sum(dtype=torch.float64)
            proj = proj + (torch.mv(chunk, v).double() * u[r : r + step]).sum()
        by_device.setdefault(w.device, []).append(len(sigs))
        names.append(name)
        sigs.append(torch.stack([sq.sqrt(), proj]))
    values: list = [None] * len(sigs)
    for idx in by_device.values():  # one host read per device (a device_map model spans several)
        for i, row in zip(idx, torch.stack([sigs[i] for i in idx]).tolist()):
            values[i] = tuple(row)
    # A non-finite weight has no signature to compare (NaN and inf pass any tolerance test): left
    # unchecked, like an offloaded one; building on such a weight fails on its own.
    return {n: v for n, v in zip(names, values) if all(math.isfinite(x) for x in v)}


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
        signatures: Mapping[str, tuple[float, float]] | None = None,
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
        #: name -> :func:`weight_signatures` of the layer the covariance was collected on; checked by
        #: :meth:`check_model`. Clear it to build on other weights on purpose (a fine-tuned variant).
        self.signatures: dict[str, tuple[float, float]] = {k: tuple(v) for k, v in (signatures or {}).items()}

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

    def __eq__(self, other) -> bool:
        """Same groups, counts, normalization and matrices (exactly, wherever they live)."""
        if not isinstance(other, Covariances):
            return NotImplemented
        return (
            self.groups == other.groups
            and self._group_tokens == other._group_tokens
            and self.normalize == other.normalize
            and all(a.shape == b.shape and torch.equal(a.cpu(), b.cpu()) for a, b in zip(self._mats, other._mats))
        )

    __hash__ = None  # a mutable mapping of tensors, like a dict

    def __getstate__(self):
        # A spectrum cache is keyed by the weights' storage: it can never match after unpickling.
        state = dict(self.__dict__)
        state.pop("spectrum_cache", None)
        return state

    @property
    def tokens(self) -> int:
        """Counted (unmasked) tokens of the first group; groups can differ (see ``token_counts``)."""
        return self._group_tokens[0] if self._group_tokens else 0

    @property
    def token_counts(self) -> dict[str, int]:
        """Module name -> the tokens counted into its covariance."""
        return {n: self._group_tokens[i] for n, i in self._index.items()}

    def group_of(self, name: str) -> tuple[str, ...]:
        """The modules that share ``name``'s matrix (``name`` included)."""
        return self.groups[self._index[name]]

    def matrices(self) -> list[torch.Tensor]:
        """One matrix per group, in ``groups`` order."""
        return list(self._mats)

    @property
    def fingerprint(self) -> str | None:
        """A hash of the collected model's target names and shapes (None when not recorded)."""
        return model_fingerprint(self.shapes) if self.shapes else None

    def to(
        self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> Covariances:
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
            signatures=self.signatures,
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
        # Other dtypes (float8) are refused by the decomposition's own dtype check, with a clearer message.
        floats = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        known = {n: m for n, m in modules.items() if n in self.signatures and m.weight.dtype in floats}
        for name, (norm, proj) in weight_signatures(known).items():
            norm0, proj0 = self.signatures[name]
            tol = SIGNATURE_TOLERANCE * max(norm0, norm, 1e-30)
            if abs(norm - norm0) > tol or abs(proj - proj0) > tol:
                raise ValueError(
                    f"covariance for module {name!r} was collected on other weights (‖W‖ {norm0:.6g}, projection "
                    f"{proj0:.6g}; this model's: {norm:.6g}, {proj:.6g}): a covariance file from another model? "
                    "To use it on these weights on purpose (e.g. a fine-tuned variant), clear covs.signatures "
                    "(CLI: build --other-weights)"
                )

    # Files
    def save(self, path: str | os.PathLike) -> None:
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
            "signatures": json.dumps({k: list(v) for k, v in self.signatures.items()}),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> Covariances:
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
                n_tensors = len(f.keys())
                if meta.get("format") == FORMAT:
                    groups = json.loads(meta["groups"])
                    mats = [f.get_tensor(f"group.{i}") for i in range(len(groups))]
        except SafetensorError as e:
            # safetensors' own error is no ValueError and does not name the file.
            raise ValueError(f"{path} is corrupt or not a corda_kernels covariance file (safetensors: {e})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file (bad metadata: {e!r})") from None
        fmt = meta.get("format")
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith(FORMAT.rsplit("/", 1)[0] + "/"):
                raise ValueError(f"{path} has covariance file format {fmt!r}; this corda_kernels reads {FORMAT!r}")
            raise ValueError(f"{path} is not a corda_kernels covariance file (format={fmt!r})")
        try:
            signatures = json.loads(meta.get("signatures", "{}"))
            counts = json.loads(meta["token_counts"])
            if not isinstance(counts, list) or any(type(t) is not int or t < 0 for t in counts):
                raise ValueError(f"{path} is a corrupt corda_kernels covariance file: token counts {counts!r}")
            covs = cls(
                mats,
                groups,
                token_counts=counts,
                normalize=meta.get("normalize", "mean"),
                shapes={k: tuple(v) for k, v in json.loads(meta.get("shapes", "{}")).items()},
                sequences=json.loads(meta.get("sequences", "null")),
                meta=json.loads(meta.get("meta", "{}")),
                signatures=signatures if isinstance(signatures, dict) else {},
            )
            problem = covs._file_problem(n_tensors)
            # `[]` or `null` would pass as "no signatures", which switches the other-model check off.
            if not isinstance(signatures, dict):
                problem = problem or "signatures must be a JSON object"
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file (bad metadata: {e!r})") from None
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file (bad metadata: {e!r})") from None
        if problem:
            raise ValueError(f"{path} is a corrupt corda_kernels covariance file: {problem}")
        return covs.to(device) if device is not None else covs

    def _file_problem(self, n_tensors: int) -> str | None:
        """What makes a loaded file unusable, or None; a collection never writes such a file."""
        if n_tensors != len(self._mats):
            return f"{n_tensors} tensors for {len(self._mats)} groups"
        if self.normalize not in _NORMALIZE:
            return f"normalize={self.normalize!r} (one of {_NORMALIZE})"
        if self.sequences is not None and (not isinstance(self.sequences, int) or self.sequences < 0):
            return f"sequences={self.sequences!r}"
        if not isinstance(self.meta, dict) or not isinstance(self.signatures, dict):
            return "meta and signatures must be JSON objects"
        for g, m in zip(self.groups, self._mats):
            if m.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                return f"group {list(g)} is {m.dtype} (covariances are floating point)"
            if m.dim() != 2 or m.shape[0] != m.shape[1]:
                return f"group {list(g)} has shape {tuple(m.shape)}, not a square matrix"
            lo, hi = m.aminmax() if m.numel() else (torch.zeros(()), torch.zeros(()))
            scale = max(abs(float(lo)), abs(float(hi)))
            if not math.isfinite(scale):
                return f"group {list(g)} has non-finite entries"
            # A strided sub-matrix: a corrupt file is wrong throughout, and d×d temporaries are large.
            idx = torch.arange(0, m.shape[0], max(1, m.shape[0] // 256))
            sub = m[idx][:, idx]
            if float((sub - sub.T).abs().max()) > 1e-5 * scale:
                return f"group {list(g)} is not symmetric"
        for name, sig in self.signatures.items():
            # NaN would compare unequal to nothing, and so pass any model.
            if len(sig) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in sig):
                return f"signature of {name!r} is {sig!r}"
        return None
