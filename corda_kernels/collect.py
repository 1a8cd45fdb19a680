"""Covariance collection: forward pre-hooks that stream C += XᵀX per input group.

Pipeline stage 1: model + loader -> :class:`Covariances`.

Why pre-hooks and grouping by tensor identity: q/k/v (and gate/up) receive the
*same* input tensor object, so one accumulator serves them all. The tensor is
identified by the object (its ``id``, whose entry is dropped the moment the
tensor dies), never by ``data_ptr()``: a freed activation's storage is reused
by the next layer.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import numbers
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import ops
from ._targets import Conv1D, Targets, built_hint, find_targets, is_linear_like, unwrap_model, weight_shape
from .covariance import Covariances, weight_signatures

if TYPE_CHECKING:
    from .candidates import CovarianceCandidates

NORMALIZE = ("mean", "peft", "sum")


class _StopForward(Exception):
    """Raised from a hook once every target has seen this batch: the rest of the forward is wasted work."""


@dataclass
class _Group:
    names: list[str]
    d: int
    acc: torch.Tensor
    count: torch.Tensor  # counted rows (device scalar, no sync)
    seqs: torch.Tensor  # counted sequences, for normalize="peft"
    first_batch: int
    batch_log: list[int] = field(default_factory=list)  # inputs accumulated this batch (Collector._seen serials)
    # A side accumulator (see Collector._side) keeps what its rows were ("masked", "unmasked",
    # "decoder_unmasked") until it is known which members it belongs to.
    marks: set[str] | None = None


class Collector:
    """Accumulates input covariances of ``modules`` while the model runs.

    Use :func:`collect_cov`; this class is the engine underneath, so later stages
    (candidate rounds, distributed reduction) can drive it. One collection per
    instance: :meth:`finish` turns the accumulators themselves into the result.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        normalize: str = "mean",
        accum_dtype: torch.dtype = torch.float32,
        device=None,
        backend: str = "auto",
    ):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if accum_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype}")
        self.modules = dict(modules)
        self.normalize = normalize
        self.accum_dtype = accum_dtype
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a torch device: {e}") from None
        self.backend = backend
        self.groups: list[_Group] = []
        self.group_of: dict[str, int] = {}
        self.unmasked: set[str] = set()
        self.masked: set[str] = set()  # targets whose rows an attention mask selected at least once
        # Encoder-decoder models: targets in the decoder take decoder_attention_mask, except when
        # they read the encoder's output (cross-attention keys and values), which the encoder's mask
        # describes. Decoder targets with no decoder mask count every position (listed here).
        self.decoder_names: set[str] = set()
        self.decoder_unmasked: set[str] = set()
        self._encoder_out: tuple[int, int] | None = None
        self.batch = -1
        self.stop_early = False
        # Early stop (opt-in: collect_cov(early_stop=True)): every target's call count in the first
        # batch; a later batch may stop once each of them has been called that often again (only if each was called once). A module the first
        # batch never called means the call pattern depends on the data (e.g. image and text-only
        # batches): then it never stops early. The stop itself waits for the module the first batch
        # called right after its last target call (``stop_module``), so that a target the batch calls
        # again before it (a loop running longer than in the first batch) is still collected; with no
        # such module, nothing can be skipped and every batch runs whole.
        self.first_counts: dict[str, int] | None = None
        self.layout_changed = False
        self.stop_module: nn.Module | None = None
        self._counts: dict[str, int] = {}
        self._pending = 0
        self._stop_armed = False
        self._after_target = False
        self._watch_handles: list = []
        self._finished = False
        self._masks: dict[str, torch.Tensor | None] = {}
        self._any_pad: torch.Tensor | None = None  # did any batch's attention mask drop a token?
        self.signatures: dict[str, tuple[float, float]] | None = None  # set by a distributed reduction
        self._kept: dict[tuple[str, torch.device], tuple[ops.KeptRows, torch.Tensor]] = {}
        # Tensor read this batch -> (weak ref, groups that accumulated it, serial). The logs below name
        # inputs by serial, never by _input_key: a freed tensor's id comes back for the next tensor made,
        # and a fresh tensor's version is 0 again, so two different inputs could log the same key.
        self._seen: dict[tuple[int, int], tuple[weakref.ref, set[int], int]] = {}
        self._serial = itertools.count()
        # Flattened (batch·seq, d) tensors that a row-wise module (norm, activation, linear) made from
        # the batch's tokens in token order, and which masks ("input"/"decoder") describe them.
        self._token_rows: dict[tuple[int, int], tuple[weakref.ref, frozenset[str]]] = {}
        self._member_log: dict[str, list[int]] = {}
        # In a group's first batch, a tensor only some of its members may read (DeBERTa-v3's query and
        # key projections also read the relative position embeddings; its value projection does not):
        # accumulated apart, keyed (group, tensor), until every member has read it or the batch ends.
        self._side: dict[tuple[int, tuple[int, int]], tuple[weakref.ref, _Group]] = {}
        self._closed_sides: list[tuple[int, _Group]] = []
        self._handles: list = []

    # ------------------------------------------------------------------ hooks
    def attach(
        self,
        stop_at: nn.Module | None = None,
        encoder: nn.Module | None = None,
        model: nn.Module | None = None,
        row_root: nn.Module | None = None,
    ) -> None:
        """Hook the targets; ``stop_at`` (the output head) ends every forward; ``model``'s other modules
        are watched during the first batch to find :attr:`stop_module`. The row-wise modules of ``model``
        (or of ``row_root``) pass token order on, so that a layer reading a normalized copy of flattened
        tokens still gets the attention mask."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        if stop_at is not None and not _scripted(stop_at):  # a scripted head takes no hook: it just runs
            self._handles.append(stop_at.register_forward_pre_hook(self._stop_hook))
        if encoder is not None:
            self._handles.append(encoder.register_forward_hook(self._encoder_hook))
        root = model if model is not None else row_root
        if root is not None:
            for m in root.modules():
                if _row_wise(m) and not _scripted(m):
                    self._handles.append(m.register_forward_hook(self._rows_hook))
        if model is not None:
            targets = {id(m) for m in self.modules.values()}
            for m in model.modules():
                if id(m) not in targets and not _scripted(m):  # unwatched: the stop can only come later
                    self._watch_handles.append(m.register_forward_pre_hook(self._watch_hook))

    def _watch_hook(self, module, args):
        # First batch only: the first module called after a target call; the last such is kept.
        if self._after_target:
            self._after_target = False
            self.stop_module = module

    def _rows_hook(self, module, args, out):
        # Only flattened rows need this: a (batch, seq, ...) input matches the mask by its shape.
        if not self._masks or not args or not isinstance(out, torch.Tensor):
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0]:
            return
        entry = self._token_rows.get(_input_key(x))
        which = entry[1] if entry is not None and entry[0]() is x else None
        if which is None:
            which = frozenset(k for k, m in self._masks.items() if m is not None and _mask_applies(m, x))
        if which:
            key = _input_key(out)
            ref = weakref.ref(out, lambda _, k=key, rows=self._token_rows: rows.pop(k, None))
            self._token_rows[key] = (ref, which)

    def _stop_module_hook(self, module, args):
        if self._stop_armed:
            raise _StopForward

    def _encoder_hook(self, module, args, out):
        first = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        if isinstance(first, torch.Tensor):
            self._encoder_out = _input_key(first)

    def detach(self) -> None:
        for h in self._handles + self._watch_handles:
            h.remove()
        self._handles.clear()
        self._watch_handles.clear()

    def encoder_output(self, hidden: torch.Tensor) -> None:
        """This batch's encoder output, when the batch brings it precomputed (``encoder_outputs``):
        the cross-attention keys and values that read it take the encoder's mask."""
        self._encoder_out = _input_key(hidden)

    def _stop_hook(self, module, args):
        raise _StopForward

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"module {name!r} was called without a tensor input")
            if x.is_nested:
                raise TypeError(f"module {name!r} was called with a nested tensor: give padded batches and a mask")
            self._on_input(name, x)
            c = self._counts[name] = self._counts.get(name, 0) + 1
            if self.batch == 0:
                self._after_target, self.stop_module = True, None
            if self.stop_early:
                target = self.first_counts.get(name)
                if target is None:
                    self.layout_changed = True
                    self.stop_early = self._stop_armed = False
                elif c == target:
                    self._pending -= 1
                    self._stop_armed = self._pending == 0

        return hook

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        key = _input_key(x)
        entry = self._seen.get(key)
        if entry is None:
            # A weak reference whose callback drops the entry the moment x dies, before its id can be
            # reused: peak memory stays that of a plain no-grad forward, and a later tensor with the
            # same id starts a fresh entry. (Holding a batch's inputs to its end measured no faster on
            # the CPU, bench_collect config, 2026-11-29 12:30 UTC: 2.760 s vs 2.764 s, medians of 7.)
            ref = weakref.ref(x, lambda _, k=key, seen=self._seen: seen.pop(k, None))
            entry = self._seen[key] = (ref, set(), next(self._serial))
        tag = entry[2]
        self._member_log.setdefault(name, []).append(tag)
        gi = self.group_of.get(name)
        if gi is None:
            # First sighting: join a group created this batch for the very same tensor, else start one.
            gi = next((g for g in entry[1] if self.groups[g].first_batch == self.batch), None)
            if gi is None:
                gi = self._new_group(name, x)
            else:
                self.groups[gi].names.append(name)
            self.group_of[name] = gi
        if gi in entry[1]:
            return
        g = self.groups[gi]
        found = self._side.get((gi, key))
        side = None
        if found is not None:
            if found[0]() is x:
                side = found[1]
            else:  # that tensor was freed and its id reused: its side is complete, settled at the end
                self._closed_sides.append((gi, found[1]))
                del self._side[(gi, key)]
        if side is None and g.first_batch == self.batch and g.batch_log and len(g.names) > 1:
            side = self._new_side(g, name)
            self._side[(gi, key)] = (weakref.ref(x), side)
            self._accumulate(side, name, x, key, tag)
        if side is not None:
            if name not in side.names:
                side.names.append(name)
            if set(side.names) == set(g.names):  # every member read it: the group's after all
                del self._side[(gi, key)]
                self._merge(g, side)
                entry[1].add(gi)
            return
        entry[1].add(gi)
        self._accumulate(g, name, x, key, tag)

    def _zero_group(self, names: list[str], d: int, dev: torch.device, first_batch: int, **kw) -> _Group:
        acc = torch.zeros(d, d, dtype=self.accum_dtype, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        return _Group(names, d, acc, zero, zero.clone(), first_batch, **kw)

    def _new_side(self, g: _Group, name: str) -> _Group:
        return self._zero_group([name], g.d, g.acc.device, g.first_batch, marks=set())

    def _mark(self, g: _Group, kind: str) -> None:
        if g.marks is not None:
            g.marks.add(kind)
        else:
            getattr(self, kind).update(g.names)

    def _merge(self, g: _Group, side: _Group) -> None:
        g.acc += side.acc
        g.count += side.count
        g.seqs += side.seqs
        g.batch_log.extend(side.batch_log)
        for kind in side.marks:
            getattr(self, kind).update(g.names)

    def _split_sides(self) -> None:
        """End of a batch: the members of a group that read different tensors become one group per
        set of tensors read (each starting from the tensors they all read)."""
        by_group: dict[int, list[_Group]] = {}
        for gi, side in self._closed_sides + [(gi, side) for (gi, _), (_, side) in self._side.items()]:
            by_group.setdefault(gi, []).append(side)
        self._side, self._closed_sides = {}, []
        for gi, sides in by_group.items():
            g = self.groups[gi]
            classes: dict[tuple[bool, ...], list[str]] = {}
            for name in g.names:
                classes.setdefault(tuple(name in s.names for s in sides), []).append(name)
            # Members that read none of the side tensors keep the group (else the first class does);
            # every other class starts from a copy of what all of them read, taken before any merge.
            made = []
            for i, sig in enumerate(sorted(classes, key=any)):
                if i == 0:
                    target = g
                else:
                    target = _Group(
                        [], g.d, g.acc.clone(), g.count.clone(), g.seqs.clone(), g.first_batch, list(g.batch_log)
                    )
                    self.groups.append(target)
                    for name in classes[sig]:
                        self.group_of[name] = len(self.groups) - 1
                target.names = classes[sig]
                made.append((target, sig))
            for target, sig in made:
                for side, read in zip(sides, sig):
                    if read:
                        self._merge(target, side)

    def _new_group(self, name: str, x: torch.Tensor) -> int:
        self.groups.append(self._zero_group([name], x.shape[-1], self.device or x.device, self.batch))
        return len(self.groups) - 1

    def add_unreached(self, names: list[str]) -> None:
        """Zero-row groups for targets that never ran (transformers 4's MoE blocks skip an expert no token
        was routed to): their zero covariance is then refused at build, listed with every such layer."""
        for name in names:
            d = weight_shape(self.modules[name])[1]
            self.groups.append(self._zero_group([name], d, self.accumulator_device(name), self.batch))
            self.group_of[name] = len(self.groups) - 1

    def accumulator_device(self, name: str) -> torch.device:
        """Where a zero accumulator for a module that read nothing goes: collect_cov's ``device``, else its
        weight's, unless that is offloaded to the meta device (then the CPU)."""
        w = getattr(self.modules[name], "weight", None)
        return self.device or (w.device if w is not None and w.device.type != "meta" else torch.device("cpu"))

    def _accumulate(self, g: _Group, name: str, x: torch.Tensor, key: tuple[int, int], tag: int) -> None:
        g.batch_log.append(tag)
        which = "decoder" if name in self.decoder_names and key != self._encoder_out else "input"
        mask = self._masks.get(which)
        if which == "decoder" and mask is None and self._masks.get("input") is not None:
            self._mark(g, "decoder_unmasked")
        # Asked before any copy to the accumulator's device: a copy of a flattened view has no _base.
        applies = mask is not None and (_mask_applies(mask, x) or self._in_token_order(which, x, mask))
        if x.device != g.acc.device:
            x = x.to(g.acc.device, non_blocking=_async_copy(g.acc.device))
        kept = n_kept = None
        if mask is not None:
            if applies:
                self._mark(g, "masked")
                kept, n_kept = self._batch_mask(which, x.device)
                if x.shape[:-1] != mask.shape:
                    # A flattened view: back to (batch, seq, d), so that normalize="peft" scales
                    # each sequence by its own max, as it does for unflattened inputs.
                    x = x.reshape(*mask.shape, x.shape[-1])
                mask = kept.mask.reshape(mask.shape) if self.normalize == "peft" else None
            else:
                # Rows that are not the text tokens (image patches, routed or pooled tokens): count them all.
                # One row per sequence (a pooler reading [CLS]) is the expected case: no warning for it.
                if x.shape[:-1] != mask.shape[:1]:
                    self._mark(g, "unmasked")
                mask = None
        scale = None
        if self.normalize == "peft":
            scale, nseq = _peft_scale(x, mask, g.acc.dtype)
            g.seqs += nseq
        ops.covariance_update(g.acc, x, kept, scale=scale, backend=self.backend)
        g.count += n_kept if kept is not None else x.shape[:-1].numel()

    def _in_token_order(self, which: str, x: torch.Tensor, mask: torch.Tensor) -> bool:
        entry = self._token_rows.get(_input_key(x))
        return entry is not None and entry[0]() is x and which in entry[1] and x.shape[:-1].numel() == mask.numel()

    def _batch_mask(self, which: str, device: torch.device) -> tuple[ops.KeptRows, torch.Tensor]:
        # Once per batch, mask and device, not once per accumulator: the kernel's list of kept
        # rows and the kept-token count (both stay on the device).
        entry = self._kept.get((which, device))
        if entry is None:
            kept = ops.KeptRows(self._masks[which].to(device))
            entry = self._kept[(which, device)] = (kept, kept.mask.sum())
        return entry

    # ------------------------------------------------------------------ batches
    def begin_batch(
        self,
        mask: torch.Tensor | None,
        *,
        decoder_mask: torch.Tensor | None = None,
        early_stop: bool = False,
    ) -> None:
        """Start a batch. ``decoder_mask``: an encoder-decoder batch's ``decoder_attention_mask``.
        ``early_stop``: stop the forward once every target has run as often as in the first batch
        (ignored for the first batch itself, and once the call pattern changed)."""
        self.batch += 1
        self._counts = {}
        # Only when every target ran once in the first batch: a module called several times per
        # forward (a cell looped over time steps) may run more often in a later batch, and stopping
        # at the first batch's count would silently drop its later rows.
        self.stop_early = (
            early_stop
            and self.first_counts is not None
            and self.stop_module is not None
            and not self.layout_changed
            and all(c == 1 for c in self.first_counts.values())
        )
        self._stop_armed = self._after_target = False
        self._pending = len(self.first_counts) if self.stop_early else 0
        self._masks = {k: None if m is None else (m != 0) for k, m in (("input", mask), ("decoder", decoder_mask))}
        if self._masks["input"] is not None:  # read once, by warn_unmasked: no sync per batch
            pad = (~self._masks["input"]).any()
            self._any_pad = pad if self._any_pad is None else self._any_pad | pad.to(self._any_pad.device)
        self._encoder_out = None
        self._kept = {}
        self._seen.clear()
        self._token_rows.clear()
        self._member_log.clear()
        self._side, self._closed_sides = {}, []
        for g in self.groups:
            g.batch_log.clear()

    def end_batch(self, completed: bool) -> None:
        if self._side or self._closed_sides:
            self._split_sides()
        # Every member of a group must have read exactly the tensors the group accumulated.
        for g in self.groups:
            for name in g.names:
                seen = self._member_log.get(name, [])
                if set(seen) != set(g.batch_log) and (completed or seen):
                    when = (
                        "before all of them had read the input they share"
                        if g.first_batch == self.batch
                        else f"in batch {self.batch} (they shared inputs in batch {g.first_batch})"
                    )
                    raise RuntimeError(
                        f"modules {g.names} share an input tensor, but module {name!r} read other inputs than "
                        f"the rest, {when}; collect these modules separately (targets=...)"
                    )
        if self.batch == 0:
            self.first_counts = dict(self._counts)
            for h in self._watch_handles:
                h.remove()
            self._watch_handles.clear()
            if self.stop_module is not None:
                self._handles.append(self.stop_module.register_forward_pre_hook(self._stop_module_hook))
        self._seen.clear()
        self._token_rows.clear()
        self._masks = {}
        self._encoder_out = None
        self._kept = {}

    def warn_unmasked(self, stacklevel: int = 2) -> None:
        """Warn about targets whose rows were all counted although the batches had an attention mask."""
        # Only when some token was padding: with all-ones masks, counting every row counted no padding.
        if self.unmasked and self._any_pad is not None and bool(self._any_pad):
            # Every member of such a group (one may have joined it after the group's first update).
            names = sorted({n for g in self.groups if self.unmasked.intersection(g.names) for n in g.names})
            shown = f"{names[:40]}" + (f" and {len(names) - 40} more" if len(names) > 40 else "")
            warnings.warn(
                f"attention_mask did not match the token layout of {len(names)} module(s), {shown}; all their rows "
                "were counted (image patches, routed MoE tokens: padding positions among them too)",
                stacklevel=stacklevel,
            )
        if self.decoder_unmasked:
            names = sorted(self.decoder_unmasked)
            warnings.warn(
                f"the batches have no decoder_attention_mask: decoder module(s) {names[:3]}"
                + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                + " counted every decoder position, padding included; add decoder_attention_mask to the batches",
                stacklevel=stacklevel,
            )

    def finish(self, meta: Mapping[str, str] | None = None) -> Covariances:
        """The normalized covariances. Once only: the results are the accumulators, mirrored in place."""
        if self._finished:
            raise RuntimeError("Collector.finish() was already called: its accumulators became that result")
        if not self.groups:
            raise ValueError("no target module was called during collection: is the loader feeding this model?")
        # One host read of (finite, count, sequences) for every group, not three per group.
        home = self.groups[0].acc.device
        stats = torch.stack(
            [torch.stack([torch.isfinite(g.acc).all().double(), g.count, g.seqs]).to(home) for g in self.groups]
        ).tolist()
        counts = [int(c) for _, c, _ in stats]
        # Zero rows without a mask is legitimate (an MoE expert no token was routed to): its zero
        # covariance fails later, at build, only if it is a target there. Zero rows *after* a mask
        # means the masks dropped everything, which is never what was meant.
        empty = [g.names for g, c in zip(self.groups, counts) if c == 0 and self.masked.intersection(g.names)]
        if empty:
            raise ValueError(
                f"no token was counted for module(s) {empty[0]}"
                + (f" and {len(empty) - 1} other group(s)" if len(empty) > 1 else "")
                + ": every row they read was masked out (is attention_mask all zeros?)"
            )
        seqs = [int(q) for _, _, q in stats]
        bad = [g.names for g, (ok, _, _) in zip(self.groups, stats) if not ok]
        if bad:
            raise ValueError(
                f"non-finite activations (NaN/Inf) reached module(s) {bad[0]}"
                + (f" and {len(bad) - 1} other group(s)" if len(bad) > 1 else "")
                + "; check the model's dtype and the calibration data"
                + (
                    ", or use accum_dtype=torch.float64 if the sums overflowed"
                    if self.accum_dtype != torch.float64
                    else ""
                )
            )
        self.warn_unmasked(stacklevel=4)
        mats = []
        for g, n, s in zip(self.groups, counts, seqs):
            self._finished = True
            c = ops.covariance_result(g.acc, inplace=True)  # the collector is done with its accumulators
            if self.normalize == "mean" and n > 0:
                c /= n
            elif self.normalize == "peft" and s > 0:
                c /= s
            mats.append(c)
        shapes = {name: weight_shape(self.modules[name]) for g in self.groups for name in g.names}
        # A distributed reduction computed them already, to check that every rank held the same weights.
        sigs = self.signatures if self.signatures is not None else weight_signatures(self.modules)
        return Covariances(
            mats,
            [g.names for g in self.groups],
            token_counts=counts,
            normalize=self.normalize,
            shapes=shapes,
            sequences=seqs[0] if self.normalize == "peft" else None,  # counted only for "peft"
            meta=meta,
            signatures={n: sigs[n] for n in shapes if n in sigs},
        )


def _input_key(x: torch.Tensor) -> tuple[int, int]:
    """Which input a module read: the tensor object and its version, so that a tensor written in
    place between two reads (``a = l1(h); h += a; l2(h)``) counts as two different inputs."""
    try:
        version = x._version
    except RuntimeError:  # an inference-mode tensor has no version counter: identity alone
        version = 0
    return id(x), version


def _peft_scale(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype = torch.float32):
    """PEFT divides each sequence by |max(x)| over its tokens (signed max, then abs); in fp64 for an fp64
    accumulator (the max itself is exact in any dtype)."""
    if x.dim() < 3:
        x3, m2 = x.reshape(1, -1, x.shape[-1]), None if mask is None else mask.reshape(1, -1)
    else:
        x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
        m2 = None if mask is None else mask.reshape(x3.shape[:2])
    if m2 is None:
        mx = x3.amax(dim=(1, 2))
        nseq = x3.shape[0]
    else:
        mx = torch.where(m2.unsqueeze(-1), x3, x3.new_full((), float("-inf"))).amax(dim=(1, 2))
        nseq = m2.any(dim=1).sum()
    mx = mx.to(torch.float64 if dtype == torch.float64 else torch.float32).abs()
    # A sequence with no kept token (or all zeros) contributes nothing rather than NaN.
    scale = torch.where(torch.isfinite(mx) & (mx > 0), 1.0 / mx, torch.zeros_like(mx))
    scale = scale.reshape(x.shape[:-2] if x.dim() >= 3 else (1,))
    if x.dim() < 3:
        scale = scale.expand(x.shape[:-1]) if x.dim() == 2 else scale.reshape(())
    return scale, nseq


def _async_copy(dst) -> bool:
    """non_blocking only towards a GPU: a non-blocking copy *to* the CPU may still be in flight
    when the CPU reads it, since nothing on the CPU side waits for the GPU's stream."""
    return torch.device(dst).type != "cpu"


# ---------------------------------------------------------------------- driving the model
def _input_device(model: nn.Module) -> torch.device | None:
    """Where the batches go: the input embedding's device. With accelerate's offload the weights sit on
    ``meta`` and its hook names the execution device; with none known, batches stay where they are."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    with contextlib.suppress(NotImplementedError, AttributeError):
        emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        dev = emb.weight.device
    else:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else None
    if dev is not None and dev.type == "meta":
        hooked = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
        return torch.device(hooked) if hooked is not None else None
    return dev


def _to(obj, device):
    """``obj`` with its tensors on ``device``, containers keeping their types (a ModelOutput given as
    ``encoder_outputs`` must stay one); tensors already there are not copied."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=_async_copy(device))
    if isinstance(obj, Mapping):
        items = {k: _to(v, device) for k, v in obj.items()}
        if type(obj) is not dict:
            with contextlib.suppress(Exception):  # a mapping whose constructor takes its fields (ModelOutput)
                return type(obj)(**items)
        return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _unwrap_once(model: nn.Module) -> nn.Module:
    """One level inside torch.compile, DDP, DataParallel or PEFT (``model`` itself if none)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        return inner
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if callable(getattr(model, "get_base_model", None)) and isinstance(getattr(model, "base_model", None), nn.Module):
        return model.get_base_model()
    return model


def _forward_params(model: nn.Module) -> tuple[list[str], set[str], bool]:
    """The positional parameter names a tuple batch's elements map to, every parameter name seen, and
    whether the forward takes only *args.

    The tuple goes to ``model``'s own forward, so its named parameters decide (PEFT's seq2seq forward
    has its own order); only a forward taking just (*args, **kwargs), as the wrappers' do, defers to
    the model inside it."""
    names: set[str] = set()
    star = False
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for _ in range(8):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        names.update(params)
        positional = list(itertools.takewhile(lambda p: p.kind not in var, params.values()))
        if positional:
            return [p.name for p in positional], names, False
        star = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params.values())
        inner = _unwrap_once(model)
        if inner is model:
            break
        model = inner
    return [], names, star


def _once(said: set[str], message: str, key: str | None = None) -> None:
    """Warn once per collection for ``key`` (default: the message itself)."""
    key = message if key is None else key
    if key not in said:
        said.add(key)
        warnings.warn(message, stacklevel=4)


def _out_of_inference_mode(model: nn.Module, said: set[str]):
    """Out of inference mode even when the caller is in it: inference tensors have no version counter
    (which tells an input written in place from the one read before) and their views no _base (which
    tells a flattened view of the tokens, whose padding the mask drops). A model made inside inference
    mode must stay there, though: outside it, its forward could not update its own buffers."""
    if not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    if any(t.is_inference() for t in itertools.chain(model.parameters(), model.buffers())):
        _once(
            said,
            "the model was made under torch.inference_mode(), so collection stays in it: there an input "
            "written in place between two reads looks like the one read before, and a flattened view of the "
            "tokens is not recognized (its padding is counted, with a warning); make the model outside "
            "inference mode to avoid both",
        )
        return contextlib.nullcontext()
    return torch.inference_mode(False)


# What transformers' forwards call their KV cache parameter, across models and releases (exact names:
# "past_values" and "past_observed_mask" of time-series models are data).
_CACHE_PARAMETERS = frozenset({"past_key_values", "cache", "layer_past", "past", "mems"})


def split_batch(batch, params: list[str] | None = None):
    """(args, kwargs, attention_mask) for a batch of any supported form.

    A tuple batch is passed positionally; its attention mask is the element in
    the position of the forward's ``attention_mask`` parameter (``params``: the
    forward's parameter names), as in ``TensorDataset(input_ids, attention_mask)``.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        return (), kwargs, kwargs.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        if batch and all(isinstance(b, Mapping) for b in batch):
            raise TypeError(
                "a batch is a list of dicts (one per example): collate it into one dict of tensors first, "
                "e.g. with a transformers DataCollator or torch's default_collate"
            )
        args = tuple(batch)
        mask = None
        for i, a in enumerate(args[1 : len(params or ())], 1):
            # TensorDataset(ids, mask) fits a forward whose second parameter is attention_mask (Llama,
            # BERT), not GPT-2's, whose second is the KV cache: the model would fail deep inside.
            if (
                params[i] in _CACHE_PARAMETERS
                and isinstance(a, torch.Tensor)
                and isinstance(args[0], torch.Tensor)
                and a.shape == args[0].shape
            ):
                raise ValueError(
                    f"element {i} of a tuple batch is shaped like input_ids but would go to the forward's "
                    f"parameter {params[i]!r}: tuple batches are passed positionally; give dict batches "
                    "such as {'input_ids': ids, 'attention_mask': mask}"
                )
        if params and "attention_mask" in params[: len(args)]:
            mask = args[params.index("attention_mask")]
            mask = mask if isinstance(mask, torch.Tensor) else None
        return args, {}, mask
    raise TypeError(f"a batch must be a tensor, a dict/BatchEncoding, or a tuple/list; got {type(batch).__name__}")


def _mask_for_ids(mask, ids, n: int, said: set[str]):
    """The mask, or None when its 2-D shape is not input_ids' (a causal (seq, seq) mask, or a batch
    built wrong): it would describe no layer's rows. Said once, with the shapes."""
    if (
        isinstance(mask, torch.Tensor)
        and isinstance(ids, torch.Tensor)
        and mask.dim() == 2
        and ids.dim() == 2
        and not ids.is_floating_point()
        and mask.shape != ids.shape
    ):
        _once(
            said,
            f"batch {n}: attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}, so it is "
            "not read as a (batch, seq) padding mask: every position was counted, padding included",
            key="mask shape",
        )
        return None
    return mask


def _mask_applies(mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the (batch, seq) attention mask describes x's rows.

    Yes when x's leading dims are (batch, seq); also when x is a flattened view
    of a (batch, seq, ...) tensor (an MoE router's ``hidden.view(-1, d)``): same
    tokens, same order. A mere equal row count is not enough: a vision tower's
    patch rows can match batch·seq by coincidence, and rows of a text-only model
    can too in another order (seq-first, or every token routed to an MoE expert
    in routing order). A normalized copy of flattened tokens (OPT's MLP) is
    recognized through the row-wise modules that made it (``_rows_hook``).
    """
    lead, base = x.shape[:-1], x._base
    batch, seq = mask.shape
    from_tokens = base is not None and base.dim() >= 3 and tuple(base.shape[:2]) == (batch, seq)
    if lead == mask.shape:
        # A square batch read seq-first (x = hidden.transpose(0, 1), Longformer) has the mask's shape
        # but not its order: its first two strides are the base's, swapped.
        swapped = (
            from_tokens
            and x.dim() >= 3
            and base.stride(0) != base.stride(1)
            and (x.stride(0), x.stride(1)) == (base.stride(1), base.stride(0))
        )
        return not swapped
    if not from_tokens or x.dim() != 2 or x.shape[0] != batch * seq:
        return False
    # Rows in the base's token order: row b·seq + s is token (b, s) (hidden.view(-1, d), or a slice of
    # its features); a transposed view flattened would hold the same rows in another order.
    sb0, sb1, sx0 = base.stride(0), base.stride(1), x.stride(0)
    off = x.storage_offset() - base.storage_offset()
    return (seq == 1 or sx0 == sb1) and (batch == 1 or sb0 == seq * sx0) and 0 <= off < max(sb1, 1)


# Elementwise modules: output row i is a function of input row i alone.
_ELEMENTWISE = (
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Softplus,
)


def _scripted(m: nn.Module) -> bool:
    # TorchScript modules refuse Python hooks.
    return isinstance(m, torch.jit.ScriptModule)


def _row_wise(m: nn.Module) -> bool:
    """Whether ``m`` maps each row of a 2-D input to the same row of its output (so token order
    survives it): linear layers, norms over the last dim, elementwise activations."""
    from .layer import CordaLinear

    if isinstance(m, (nn.Linear, CordaLinear, _ELEMENTWISE)) or (Conv1D and isinstance(m, Conv1D)):
        return True
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return len(m.normalized_shape) == 1
    cls = type(m)
    # transformers' activations are all elementwise; its RMSNorm/LayerNorm variants (LlamaRMSNorm,
    # T5LayerNorm, ...) normalize each row over the hidden size.
    return cls.__module__ == "transformers.activations" or (
        cls.__module__.startswith("transformers.models.") and cls.__name__.endswith(("RMSNorm", "LayerNorm"))
    )


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    with contextlib.suppress(NotImplementedError, AttributeError):
        return get() if callable(get) else None
    return None


def _encoder_decoder(model: nn.Module, collector: Collector) -> nn.Module | None:
    """For an encoder-decoder model: mark the targets inside its decoder and return its encoder."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    try:
        encoder, decoder = model.get_encoder(), model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        return None
    inside = {id(m) for m in decoder.modules()}
    head = _output_head(model)
    if isinstance(head, nn.Module):  # the head reads decoder states
        inside.add(id(head))
    collector.decoder_names = {name for name, m in collector.modules.items() if id(m) in inside}
    return encoder


def _loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # e.g. a DataLoader over an IterableDataset defines __len__ but cannot answer
        return None


def run_batches(
    model,
    loader,
    collector: Collector,
    *,
    max_batches=None,
    progress=True,
    desc="collecting",
    on_batch=None,
    early_stop=False,
):
    """Feed ``loader`` through ``model`` with the collector's hooks attached. Returns the number of batches.

    The output head (when not a target) always ends the forward; ``early_stop`` also ends it, from
    the second batch on, where the first batch's last target call was followed (see :class:`Collector`)."""
    dev = _input_device(model)
    params, named, star_args = _forward_params(model)
    no_cache = "use_cache" in named
    # A forward that takes use_cache only through **kwargs (LLaVA, PEFT) reads it from its config:
    # with it on, every layer's keys and values would be kept for nothing until the forward ends.
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    caching = [c for c in configs.values() if getattr(c, "use_cache", None) is True]
    said: set[str] = set()
    head = _output_head(model)
    # Only a linear head ends the forward: FSMT's get_output_embeddings() is the decoder's input
    # embedding, which runs before every decoder layer.
    stop_at = head if is_linear_like(head) and head not in collector.modules.values() else None
    encoder = _encoder_decoder(model, collector)
    states = {m: m.training for m in model.modules()}
    # nn.TransformerEncoder packs a padded batch into nested tensors, which have no rows to count;
    # unpacked, its padding rows are the mask's to drop.
    nested = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = _loader_len(loader)
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        bar = tqdm(desc=desc, unit="batch", total=total, dynamic_ncols=True, leave=False)  # total gives the ETA
    n = 0
    tokens = 0
    try:  # the set-up too: whatever of it ran is undone below
        model.eval()
        for c in caching:
            c.use_cache = False
        for m in nested:
            m.use_nested_tensor = False
        collector.attach(stop_at=stop_at, encoder=encoder, model=model if early_stop else None, row_root=model)
        with _out_of_inference_mode(model, said), torch.no_grad():
            # islice: with max_batches, never pull one batch more than is used (a generator may tokenize).
            for batch in loader if max_batches is None else itertools.islice(loader, max_batches):
                args, kwargs, mask = split_batch(batch, params)
                mask = _mask_for_ids(mask, kwargs.get("input_ids", args[0] if args else None), n, said)
                if mask is not None and mask.dim() != 2:
                    # A 4-D additive mask carries no per-token padding flag we can trust.
                    _once(
                        said,
                        f"attention_mask is {mask.dim()}-D, not (batch, seq): every position was counted, "
                        "padding included; give the 2-D padding mask to exclude padding",
                    )
                    mask = None
                if mask is None and star_args and len(args) > 1:
                    _once(
                        said,
                        "the model's forward takes *args, so a tuple batch cannot say which element is the "
                        "attention_mask: every position was counted; use dict batches",
                    )
                args, kwargs = _to(args, dev), _to(kwargs, dev)
                if no_cache and kwargs is not None and "use_cache" not in kwargs:
                    kwargs["use_cache"] = False
                dec_mask = None
                if encoder is not None:
                    dec_mask = kwargs.get("decoder_attention_mask")
                    if dec_mask is None and "decoder_attention_mask" in params[: len(args)]:
                        dec_mask = args[params.index("decoder_attention_mask")]
                if not isinstance(dec_mask, torch.Tensor) or dec_mask.dim() != 2:
                    dec_mask = None
                collector.begin_batch(
                    _to(mask, dev),
                    decoder_mask=dec_mask,
                    early_stop=early_stop and n > 0,
                )
                enc = kwargs.get("encoder_outputs") if encoder is not None else None
                if enc is not None:  # precomputed: the encoder will not run, and its hook cannot see them
                    collector.encoder_output(enc if isinstance(enc, torch.Tensor) else enc[0])
                completed = True
                try:
                    model(*args, **kwargs)
                except _StopForward:
                    completed = False
                collector.end_batch(completed)
                n += 1
                if on_batch is not None:  # first: work it does (CorDA++ scoring) belongs to this batch's step
                    on_batch(n)
                if bar is not None:
                    ids = kwargs.get("input_ids", args[0] if args else None)
                    counted = None
                    if mask is not None and not mask.is_cuda:  # reading a GPU mask would sync
                        counted = int(mask.sum())
                    elif mask is None and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
                        counted = ids.numel()
                    if counted is not None:
                        tokens += counted
                        rate = tokens / max(bar.format_dict["elapsed"], 1e-9)
                        bar.set_postfix(tokens=tokens, tok_s=f"{rate:,.0f}", refresh=False)
                    bar.update(1)
    finally:
        collector.detach()
        for c in caching:
            c.use_cache = True
        for m in nested:
            m.use_nested_tensor = True
        # train(), not .training =: a module may act on the switch (a LoRA layer merging on eval()).
        for m, t in states.items():  # parents first: a parent's train() also sets its children
            if m.training != t:
                m.train(t)
        for m, t in states.items():  # a child shared by two parents was set by both: the flag as it was
            m.training = t
        if bar is not None:
            bar.close()
    return n


def collect_cov(
    model: nn.Module,
    loader: Iterable,
    *,
    targets: Targets = None,
    normalize: str = "mean",
    accum_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    backend: str = "auto",
    distributed: bool | str | None = None,
    early_stop: bool = False,
    candidates: int | None = None,
    **candidate_options,
) -> Covariances | CovarianceCandidates:
    """Run ``loader`` through ``model`` and return each target's input covariance.

    Batches may be tensors (``model(t)``), dicts/BatchEncodings (``model(**b)``)
    or tuples (``model(*b)``); tokens whose ``attention_mask`` is 0 are skipped.
    ``normalize="mean"`` divides by counted tokens; ``"peft"`` reproduces PEFT's
    per-sequence max-scaling and divides by sequences; ``"sum"`` leaves raw sums.
    ``candidates=N`` (CorDA++) splits the batches into N rounds and returns
    :class:`CovarianceCandidates`; ``candidate_options`` go to
    :func:`corda_kernels.candidates.collect_candidates`.
    ``distributed`` (default: on when a torch.distributed group is initialized):
    see :mod:`corda_kernels.distributed`; ``"presharded"`` for loaders that
    already shard, ``False`` to collect locally only.
    The forward always stops at the output head when it is not a target. ``early_stop=True`` also
    skips, from the second batch on, whatever the first batch ran after its last target call (for
    targets in the first layers only): only for models whose modules run the same number of times
    in every batch. A loop whose length depends on the batch, around a target and a module (BERT's
    chunked feed-forward), would lose its later rounds.
    """
    if candidates is not None and early_stop:
        raise NotImplementedError("collect_cov(candidates=N) does not support early_stop=True")
    if candidates is not None and distributed:
        raise NotImplementedError("collect_cov(candidates=N) does not support distributed=; collect on one process")
    if candidates is not None:
        from .candidates import collect_candidates
        from .distributed import Shard

        if Shard.resolve(distributed, loader) is not None:
            # Under a process group each rank would pick its rounds from its own shard, and different
            # covariances per rank would then feed one distributed build.
            raise NotImplementedError(
                "collect_cov(candidates=N) runs on one process, but a torch.distributed group is active: "
                "pass distributed=False to collect candidates from this rank's loader alone"
            )

        return collect_candidates(
            model, loader, candidates, targets=targets, normalize=normalize, accum_dtype=accum_dtype,
            device=device, max_batches=max_batches, progress=progress, backend=backend, **candidate_options,
        )  # fmt: skip
    if candidate_options:
        raise TypeError(f"collect_cov got option(s) {sorted(candidate_options)}, which apply only with candidates=N")
    modules = find_targets(model, targets)
    if not modules:
        raise ValueError(f"the model has no nn.Linear or Conv1D target to collect covariances for{built_hint(model)}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    collector = Collector(modules, normalize=normalize, accum_dtype=accum_dtype, device=device, backend=backend)
    from .distributed import Shard

    shard = Shard.resolve(distributed, loader)  # None unless a process group is in use
    if shard is not None:
        loader, max_batches = shard.split(loader, max_batches)
        progress = progress and shard.rank == 0
    try:
        n = run_batches(model, loader, collector, max_batches=max_batches, progress=progress, early_stop=early_stop)
    except Exception as error:
        if shard is None:
            raise
        # The other ranks are headed for the reduction's collective: tell them, rather than leave
        # them waiting there until the process group times out.
        shard.reduce(collector, 0, error=error)
        raise
    if shard is not None:
        n = shard.reduce(collector, n)  # the one all-reduce, before finish() normalizes
    if n == 0:
        raise ValueError("the calibration loader yielded no batch: collect_cov needs at least one")
    missing = [name for name in modules if name not in collector.group_of]
    if missing and collector.groups:
        warnings.warn(
            f"{len(missing)} target module(s) never ran during collection (e.g. {missing[:3]}; MoE experts no "
            "token was routed to are skipped by some models): their covariance is zero, and build_corda will "
            "refuse them unless they are left out (targets=)",
            stacklevel=2,
        )
        collector.add_unreached(missing)
    return collector.finish(meta={"batches": str(n)})
