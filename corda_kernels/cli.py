"""Command line: ``corda-kernels <subcommand>`` (also ``python -m corda_kernels``).

Subcommands: ``collect`` (model + calibration data -> covariances file),
``build`` (model + covariances -> CorDA model, saved as residual + PEFT
adapter), ``export`` (a CorDA export -> a LoRA for the original model, or a
merged model), ``demo`` and ``bench``. Models and tokenizers are read from
local directories only; nothing is downloaded. Under ``torchrun`` the
collection is sharded across the processes (see :mod:`corda_kernels.distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ._compat import dtype_kwarg


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------- loading
def _local_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise CliError(f"{what} {path!r} is not a local directory (models are never downloaded)")
    return path


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _model_limits(path: str) -> tuple[int | None, int | None]:
    """(vocabulary size, longest sequence) from the model's config.json, without loading weights."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None, None  # the model load reports it properly
    cfg = getattr(cfg, "text_config", None) or cfg
    longest = next(
        (v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(cfg, k, None), int)), None
    )
    return getattr(cfg, "vocab_size", None), longest


def _dtype(name: str):
    if name == "auto":
        return "auto"
    dt = getattr(torch, name, None)
    if dt not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise CliError(f"--dtype {name!r}: one of float32, bfloat16, float16, float64 or auto")
    return dt


@contextlib.contextmanager
def _reading(what: str, path: str) -> Iterator[None]:
    """Name the folder when one of its weight files is truncated or corrupt (safetensors' own
    error names no file, and is neither an OSError nor a ValueError)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise CliError(f"{what} {path!r}: a .safetensors file there is truncated or corrupt ({e})") from None


def _load_model(path: str, args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    _local_dir(path, "model")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except RuntimeError as e:
            raise CliError(f"--device {args.device!r}: {e}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: this torch has no CUDA device")
    kw = {"local_files_only": True, dtype_kwarg(): _dtype(args.dtype)}
    if args.device == "auto":
        kw["device_map"] = "auto"
    with _reading("model", path):
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if args.device != "auto":
        model.to(args.device)
    return model.eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _local_dir(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CliError(f"no tokenizer could be loaded from {path!r} (pass --tokenizer DIR): {e}") from None


# ---------------------------------------------------------------------- calibration data
def _utf8_lines(path: str, f) -> Iterator[tuple[int, str]]:
    i = 0
    try:
        for i, line in enumerate(f, 1):
            yield i, line
    except UnicodeDecodeError as e:
        raise CliError(f"{path}: not UTF-8 text ({e.reason}, after line {i})") from None


def _read_texts(path: str, field: str) -> Iterator[str]:
    # A generator: with --max-batches the caller stops pulling, and the rest is never read or parsed.
    with open(path, encoding="utf-8") as f:
        for i, line in _utf8_lines(path, f):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                yield line.rstrip("\n")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise CliError(f"{path}:{i}: no string field {field!r} (choose it with --text-field)")
            yield rec[field]


def _read_tokens(path: str, vocab: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Rows of input_ids (and attention_mask if present) from a .pt or .safetensors file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip errors share no base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CliError(f"token file {path!r} could not be read ({type(e).__name__}: {first})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"input_ids": obj}
    if isinstance(obj, (list, tuple)):
        obj = {"input_ids": list(obj)}
    if not isinstance(obj, dict) or "input_ids" not in obj:
        raise CliError(f"token file {path!r} must hold 'input_ids' (a tensor, a dict or a list of 1-D tensors)")
    ids = obj["input_ids"]
    mask = obj.get("attention_mask")
    for what, t in (("input_ids", ids), ("attention_mask", mask)):
        if t is not None and not isinstance(t, (torch.Tensor, list, tuple)):
            raise CliError(f"token file {path!r}: {what} must be a tensor or a list of 1-D tensors")
    rows = list(ids) if isinstance(ids, (list, tuple)) or ids.dim() == 2 else [ids]
    masks = None if mask is None else (list(mask) if isinstance(mask, (list, tuple)) or mask.dim() == 2 else [mask])
    for r in rows:
        if not isinstance(r, torch.Tensor) or r.dim() != 1 or r.dtype.is_floating_point:
            raise CliError(f"token file {path!r}: input_ids rows must be 1-D integer tensors")
    if masks is not None:
        if len(masks) != len(rows) or any(
            not isinstance(m, torch.Tensor) or m.shape != r.shape for m, r in zip(masks, rows)
        ):
            raise CliError(f"token file {path!r}: attention_mask must have input_ids' shape")
    filled = [r for r in rows if r.numel()]
    lo, hi = min((int(r.min()) for r in filled), default=0), max((int(r.max()) for r in filled), default=0)
    if vocab is not None and (lo < 0 or hi >= vocab):
        raise CliError(
            f"token file {path!r}: ids range over [{lo}, {hi}] but the model's vocabulary has {vocab} entries "
            "(made with another tokenizer?)"
        )
    return rows, masks


def _pad(rows: list[torch.Tensor], masks: list[torch.Tensor] | None, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        att[i, : r.numel()] = 1 if masks is None else masks[i][: r.numel()].long()
    return {"input_ids": ids, "attention_mask": att}


def load_batches(
    paths: list[str], args, tokenizer_dir: str | None, model_dir: str | None = None
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches (right-padded, with attention masks) from text, jsonl or token files.

    Samples are cut to ``--max-length`` and to the model's position limit; with
    ``--max-batches`` reading stops once those batches are full.
    """
    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    tokenizer = None
    vocab, longest = _model_limits(model_dir) if model_dir else (None, None)
    max_length = args.max_length if longest is None else min(args.max_length, longest)
    limit = None if args.max_batches is None else args.max_batches * args.batch_size
    for path in paths:
        if not os.path.isfile(path):
            raise CliError(f"calibration file {path!r} does not exist")
        if not path.endswith((".pt", ".pth", ".safetensors", ".txt", ".jsonl")):
            raise CliError(f"calibration file {path!r}: expected .txt, .jsonl, .pt or .safetensors")
    for path in paths:
        if limit is not None and len(rows) >= limit:
            break
        if path.endswith((".pt", ".pth", ".safetensors")):
            r, m = _read_tokens(path, vocab)
            rows += r
            masks += m if m is not None else [torch.ones_like(x) for x in r]
            continue
        if tokenizer is None:
            tokenizer = _load_tokenizer(tokenizer_dir)
        for text in _read_texts(path, args.text_field):
            enc = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            if enc:
                rows.append(torch.tensor(enc, dtype=torch.long))
                masks.append(torch.ones(len(enc), dtype=torch.long))
            if limit is not None and len(rows) >= limit:
                break  # before the generator reads another line
    if max_length < args.max_length and any(r.numel() >= max_length for r in rows):
        _log(f"samples cut to {max_length} tokens, the model's position limit (--max-length {args.max_length})")
    rows = [r[:max_length] for r in rows]
    masks = [m[:max_length] for m in masks]
    keep = [i for i, r in enumerate(rows) if r.numel() > 0]
    rows, masks = [rows[i] for i in keep], [masks[i] for i in keep]
    if not rows:
        raise CliError("the calibration files hold no non-empty sample")
    pad_id = 0
    if tokenizer is not None:
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    bs = args.batch_size
    batches = [_pad(rows[i : i + bs], masks[i : i + bs], pad_id) for i in range(0, len(rows), bs)]
    if args.max_batches is not None:
        batches = batches[: args.max_batches]
    return batches


class TokenProgress:
    """Wraps a list of batches with a tqdm bar counted in tokens: tokens/s and an ETA from the known total.

    A batch is counted once the consumer asks for the next one, i.e. after the
    model has run on it. It has ``len()``, which CorDA++ candidate rounds need.
    """

    def __init__(self, batches: list, *, enabled: bool = True, desc: str = "collecting"):
        self.batches = batches
        self.enabled = enabled
        self.desc = desc

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            total = sum(int(b["attention_mask"].sum()) for b in self.batches)
            bar = tqdm(total=total, unit="tok", unit_scale=True, desc=self.desc, dynamic_ncols=True)
        try:
            for b in self.batches:
                yield b
                if bar is not None:
                    bar.update(int(b["attention_mask"].sum()))
        finally:
            if bar is not None:
                bar.close()


# ---------------------------------------------------------------------- distributed (torchrun)
def _maybe_init_distributed(device: str) -> tuple[int, int, bool]:
    """Join the torchrun process group if launched by torchrun; (rank, world, whether this call created it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), owned


@contextlib.contextmanager
def _distributed(device: str):
    """Yields (rank, world) inside the torchrun process group, if launched by torchrun.

    A group this call created is closed on the way out, on errors too. On success all ranks
    first meet at a barrier: a rank that tore down its connections while a peer was still
    finishing the last collective could make that peer's transport abort. Callers write
    their files after the block, so no rank waits at the barrier through a long save.
    """
    rank, world, owned = _maybe_init_distributed(device)
    ok = False
    try:
        yield rank, world
        ok = True
    finally:
        if owned:
            import torch.distributed as dist

            if ok:
                dist.barrier()
            dist.destroy_process_group()


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- subcommands
def _given(args, keys) -> dict:
    """The options among ``keys`` given on the command line (their default is None)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _flags(keys) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in keys)


# Python argument names in the library's messages, and the flags that set them here.
_ARGUMENT_FLAGS = [
    (re.compile(r"\b(min_rank|max_rank|multiple|candidates)=(\w+)"), lambda m: f"--{m[1].replace('_', '-')} {m[2]}"),
    (re.compile(r"\b(min_rank|max_rank)\b"), lambda m: "--" + m[1].replace("_", "-")),
    (re.compile(r"(?<=/)multiple\b|\bmultiple(?= must| \()"), "--multiple"),
    (re.compile(r"\btargets="), "--targets"),
    (re.compile(r"pass an int for a number of parameters"), "give --budget an int for a number of parameters"),
]


def _in_flags(e: Exception) -> CliError:
    """The library's error, its Python argument names said as this command's flags."""
    text = str(e)
    for pattern, flag in _ARGUMENT_FLAGS:
        text = pattern.sub(flag, text)
    return CliError(text)


def cmd_collect(args) -> int:
    import corda_kernels as ck

    with _distributed(args.device) as (rank, world):
        if args.candidates and world > 1:
            raise CliError("--candidates (CorDA++ selection) runs on one process: run collect without torchrun")
        rule = _given(args, ("sum_over", "rank", "mode", "group_score", "pi_from", "pi_normalize"))
        if rule and not args.candidates:
            raise CliError(f"{_flags(rule)}: these score CorDA++ candidates and apply only with --candidates N")
        if rule.get("sum_over") != "adapter" and ("rank" in rule or "mode" in rule):
            raise CliError("--rank/--mode change the CorDA++ score only with --sum-over adapter")
        if rule.get("sum_over") == "adapter" and "rank" not in rule:
            raise CliError("--sum-over adapter needs --rank (the adapter rank the build will use)")
        for path in args.data:
            if os.path.isfile(path) and os.path.exists(args.output) and os.path.samefile(path, args.output):
                raise CliError(f"-o {args.output!r} is one of the calibration files: it would be overwritten")
        _check_covariance_output(args.output)
        # Bad data fails before a model loads.
        batches = load_batches(args.data, args, args.tokenizer or args.model, args.model)
        model = _load_model(args.model, args)
        t0 = time.perf_counter()
        loader = TokenProgress(batches, enabled=not args.no_progress and rank == 0)
        accum = torch.float64 if args.accum_dtype == "float64" else torch.float32
        kw = {"targets": args.targets, "normalize": args.normalize, "accum_dtype": accum, "progress": False}
        if args.candidates:
            if not hasattr(ck, "select_covariances"):
                raise CliError("--candidates needs CorDA++ (corda_kernels.select_covariances), which is not installed")
            try:
                # keep_spectra=False: the singular vectors would serve a build in this process, and there
                # is none; at 7B they would take ~28 GiB (docs/cordapp.md).
                cands = ck.collect_cov(model, loader, candidates=args.candidates, keep_spectra=False, **rule, **kw)
            except ValueError as e:
                raise _in_flags(e) from None
            covs = ck.select_covariances(model, cands)
            _log(f"CorDA++ selection over {cands.rounds} rounds (* = chosen):\n{cands.table()}", rank)
        else:
            covs = ck.collect_cov(model, loader, **kw)
    if rank == 0:
        covs.save(args.output)
    counts = sorted(set(covs.token_counts.values()))
    # CorDA++ keeps one round per group, so groups hold different token counts.
    tokens = f"{counts[0]} tokens" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} tokens per group"
    _log(
        f"collected {len(covs)} layers in {len(covs.groups)} groups from {tokens} "
        f"({len(batches)} batch{'es' if len(batches) != 1 else ''}) in {time.perf_counter() - t0:.1f}s -> {args.output}",
        rank,
    )
    return 0


def _check_parent(flag: str, path: str) -> None:
    """Before any work: the writes create missing folders, so the nearest existing one must be a
    folder we can write in (``-o notes.txt/covs.safetensors`` would otherwise fail at the end)."""
    # A link is written through (see _io.atomic_path): its target's folder is the one that matters.
    parent = os.path.dirname(os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CliError(f"{flag} {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path!r}: no permission to write in {parent!r}")


def _check_covariance_output(path: str) -> None:
    """Only an earlier covariance file may be replaced: ``-o model/model.safetensors`` must not
    overwrite the model's weights, nor ``-o`` a tokenizer file or anything else a user keeps."""
    _check_parent("-o", path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise CliError(f"-o {path!r} is a directory; give a file name (e.g. covs.safetensors)")
    from .covariance import FORMAT

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            ours = (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any file safetensors cannot read is not one of ours
        ours = False
    if not ours:
        raise CliError(
            f"-o {path!r} exists and is not a corda_kernels covariance file: refusing to replace it "
            "(remove it or choose another name)"
        )


def _check_out_dir(path: str) -> None:
    """Before any long work: -o must be absent, empty or an earlier export (atomic_dir checks it again)."""
    from .export import check_out_dir

    _check_parent("-o", path)
    try:
        check_out_dir(path)
    except FileExistsError as e:
        raise CliError(f"-o: {e}") from None


def _check_report_path(path: str | None) -> None:
    """Before any work: a --report that cannot be drawn must not fail after the export was written."""
    if path is None:
        return
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("--report needs matplotlib: pip install 'corda_kernels[plot]'") from None
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise CliError(f"--report {path!r}: unknown image format {fmt!r} (one of {', '.join(sorted(supported))})")
    if os.path.isdir(path):
        raise CliError(f"--report {path!r} is a directory; give a file name (e.g. report.png)")
    _check_parent("--report", path)


def _parse_budget(text: str | None):
    if text is None:
        return None
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise CliError(f"--budget {text!r}: give an int (parameters) or a fraction in (0, 1]") from None
    if isinstance(value, float) and value > 1 and value.is_integer():
        return int(value)  # "1e6" parameters, not a fraction
    return value


# build's CorDA++ allocation flags: None on the command line means "not given" (an error without
# --cordapp), then these, which are allocate_ranks' own defaults.
_ALLOCATION_DEFAULTS = {
    "min_rank": 1,
    "max_rank": None,
    "multiple": 1,
    "ipm_score": "captured",
    "pi_from": "cov",
    "pi_normalize": "mean",
}


def cmd_build(args) -> int:
    import corda_kernels as ck

    from .decompose import RankTooLarge
    from .export import save_pretrained
    from .rewrite import resolve_targets

    if args.budget is not None and not args.cordapp:
        raise CliError("--budget is a CorDA++ rank allocation: add --cordapp (or use --rank for a uniform rank)")
    # Given without --cordapp these would be ignored, and the user would get uniform ranks unawares.
    alloc = _given(args, _ALLOCATION_DEFAULTS)
    if alloc and not args.cordapp:
        raise CliError(f"{_flags(alloc)}: these shape the CorDA++ rank allocation and apply only with --cordapp")
    alloc = {**_ALLOCATION_DEFAULTS, **alloc}
    if not os.path.isfile(args.covariances):
        raise CliError(f"covariances file {args.covariances!r} does not exist")
    _check_report_path(args.report)
    from .export import check_not_source

    _check_out_dir(args.output)  # before loading and decomposing, not at save time

    # -o replaces an earlier export wholesale: it must not hold this run's own inputs.
    for what, src in (("covariances file", args.covariances), ("--tokenizer", args.tokenizer)):
        if src and os.path.exists(src) and os.path.lexists(args.output):
            out, real = os.path.realpath(args.output), os.path.realpath(src)
            if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
                raise CliError(f"-o {args.output!r} holds the {what} {src!r}: replacing it would delete that input")
    if os.path.isdir(args.model):  # a local model directory must survive; anything else fails to load later
        check_not_source(args.output, args.model, inside_ok=True)
    with _distributed(args.device) as (rank_, world):
        covs = ck.Covariances.load(args.covariances)
        if args.other_weights:
            covs.signatures.clear()
        model = _load_model(args.model, args)
        tokenizer = None
        try:
            tokenizer = _load_tokenizer(args.tokenizer or args.model)
        except CliError:
            if args.tokenizer:
                raise
        t0 = time.perf_counter()
        ranks = None
        if args.cordapp:
            if not hasattr(ck, "allocate_ranks"):
                raise CliError("--cordapp needs CorDA++ (corda_kernels.allocate_ranks), which is not installed")
            budget = _parse_budget(args.budget)
            try:
                ranks = ck.allocate_ranks(
                    model,
                    covs,
                    budget=1.0 if budget is None else budget,  # what uniform --rank would cost
                    mode=args.mode,
                    rank=args.rank,
                    targets=args.targets,
                    damping=args.damping,
                    **alloc,
                    progress=not args.no_progress and rank_ == 0,
                    distributed=world > 1,
                    keep_spectra=not args.no_keep_spectra,
                )
            except ValueError as e:
                raise _in_flags(e) from None
            _log(f"CorDA++ allocation: {sum(ranks.values())} ranks, {ranks.used} of {ranks.budget} parameters", rank_)
        values = {}
        if args.report:
            from .compactness import analyse_layers

            # Cached on covs (and reused by build_corda); under torchrun each rank computes its share.
            modules = resolve_targets(model, covs, args.targets)
            infos = analyse_layers(
                modules,
                covs,
                damping=args.damping,
                need_stats=False,
                distributed=world > 1,
                keep_vectors=not args.no_keep_spectra,
            )
            values = {n: torch.as_tensor(info.values) for n, info in infos.items()}
        try:
            ck.build_corda(
                model,
                covs,
                rank=args.rank,
                mode=args.mode,
                ranks=ranks,
                alpha=args.alpha,
                targets=args.targets,
                damping=args.damping,
                dropout=args.dropout,
                progress=not args.no_progress and rank_ == 0,
                distributed=world > 1,
            )
        except RankTooLarge as e:  # its hint names Python arguments: say it in flags
            raise CliError(
                f"--rank {e.rank} exceeds min(d_out, d_in) = {e.limit} of module {e.name!r}: give a smaller "
                "--rank, or leave the module out with --targets"
            ) from None
    layers = ck.corda_layers(model)
    if rank_ == 0:
        save_pretrained(model, args.output, tokenizer=tokenizer)
        if args.report:
            from .report import plot_report

            plot_report(values, {n: m.rank for n, m in layers.items()}, args.mode, args.report)
            _log(f"report -> {args.report}")
    _log(
        f"built {len(layers)} CorDA layers ({args.mode}), {ck.trainable_parameters(model):,} trainable parameters, "
        f"in {time.perf_counter() - t0:.1f}s -> {args.output}/residual + {args.output}/adapter",
        rank_,
    )
    return 0


def cmd_export(args) -> int:
    from .export import atomic_dir, check_not_source, load_pretrained, to_lora
    from .rewrite import merge_corda

    # Which output is wanted is settled before anything loads.
    if args.merged and args.base:
        raise CliError("--merged writes one merged model, which needs no --base: give one of the two")
    if not args.merged and not args.base:
        raise CliError("export needs --base ORIGINAL_MODEL_DIR (for a LoRA on the original weights) or --merged")
    _local_dir(args.source, "source")
    if args.base:
        _local_dir(args.base, "--base")
    _check_out_dir(args.output)
    # An earlier export at --output is replaced, and the source is one: `export SRC -o SRC` would delete it.
    check_not_source(args.output, args.source)
    if args.base:  # nor may -o replace the original model the LoRA is meant for
        check_not_source(args.output, args.base, inside_ok=True)
    with _reading("source", args.source):
        # Nothing is run, only merged or converted: keep fp32 adapters over a 16-bit base unrounded.
        model = load_pretrained(args.source, dtype=_dtype(args.dtype), adapter_dtype="widest")
    if args.merged:
        merge_corda(model)
        with atomic_dir(args.output) as tmp:
            model.save_pretrained(tmp)
            tok = os.path.join(args.source, "residual", "tokenizer_config.json")
            if os.path.exists(tok):
                _load_tokenizer(os.path.join(args.source, "residual")).save_pretrained(tmp)
            with open(os.path.join(tmp, "corda_export.json"), "w", encoding="utf-8") as f:
                json.dump({"format": "corda_kernels.export/1", "kind": "merged"}, f)
        _log(f"merged model -> {args.output}")
        return 0
    from transformers import AutoModelForCausalLM

    with _reading("--base", args.base):
        original = AutoModelForCausalLM.from_pretrained(
            _local_dir(args.base, "--base"), local_files_only=True, **{dtype_kwarg(): _dtype(args.dtype)}
        )
    to_lora(model, original.state_dict(), args.output, base_model_name_or_path=os.path.abspath(args.base))
    _log(f"LoRA (rank 2r) for the original model {args.base} -> {args.output}")
    return 0


def cmd_demo(args, rest: list[str]) -> int:
    try:
        from .demo import main as demo_main
    except ImportError as e:
        raise CliError(f"the demo is not available in this installation ({e})") from None
    return int(demo_main(rest) or 0)


BENCH = {"collect": "bench_collect.py", "ops": "bench_ops.py"}


def cmd_bench(args, rest: list[str]) -> int:
    root = Path(args.bench_dir) if args.bench_dir else Path(__file__).resolve().parents[1] / "bench"
    which = list(BENCH) if args.which == "all" else [args.which]
    scripts = [root / BENCH[w] for w in which]
    missing = [str(s) for s in scripts if not s.is_file()]
    if missing:
        raise CliError(
            f"benchmark script(s) {missing} not found: benchmarks ship with the source checkout "
            "(run from it, or pass --bench-dir)"
        )
    for s in scripts:
        rc = subprocess.call([sys.executable, str(s), *rest])
        if rc:
            return rc
    return 0


# ---------------------------------------------------------------------- parser
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (device_map='auto')")
    p.add_argument(
        "--dtype", default="auto", help="model dtype: auto (checkpoint's), float32, bfloat16, float16, float64"
    )
    p.add_argument("--targets", nargs="+", default=None, help="module names/globs (default: every linear but the head)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="corda-kernels", description="Fast CorDA / CorDA++ adapter initialization.")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="model + calibration data -> covariances file")
    p.add_argument("model", help="local model directory (transformers save_pretrained)")
    p.add_argument("data", nargs="+", help=".txt (one sample a line), .jsonl, or token files (.pt/.safetensors)")
    p.add_argument("-o", "--output", required=True, help="covariances file (.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument(
        "--max-length", type=_positive, default=512, help="truncate samples to this many tokens (and the model's limit)"
    )
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--max-batches", type=_positive, default=None, help="use (and read) only this many batches")
    p.add_argument("--normalize", choices=("mean", "peft", "sum"), default="mean")
    p.add_argument("--accum-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--candidates", type=_positive, default=None, help="CorDA++: N candidate rounds, keep the best per group"
    )
    p.add_argument(
        "--sum-over",
        choices=("all", "adapter"),
        default=None,
        help="CorDA++ selection score over all singular values (default) or the adapter's r (needs --rank)",
    )
    p.add_argument("--rank", type=_positive, default=None, help="CorDA++ adapter rank (with --sum-over adapter)")
    p.add_argument(
        "--mode", choices=("kpm", "ipm"), default=None, help="CorDA++ adapter mode (with --sum-over adapter)"
    )
    p.add_argument("--group-score", choices=("sum", "max"), default=None, help="CorDA++: how q/k/v-like groups combine")
    p.add_argument("--pi-from", choices=("cov", "wc"), default=None, help="CorDA++ π from C's eigenvalues or W·C's σ")
    p.add_argument("--pi-normalize", choices=("mean", "none"), default=None, help="CorDA++ π normalization")
    _model_options(p)

    p = sub.add_parser("build", help="model + covariances -> CorDA model (residual + PEFT adapter)")
    p.add_argument("model", help="local model directory")
    p.add_argument("covariances", help="file written by `collect`")
    p.add_argument("-o", "--output", required=True, help="output directory (residual/ and adapter/)")
    p.add_argument("--tokenizer", help="tokenizer to save with the residual model (default: the model's, if any)")
    p.add_argument("--mode", choices=("kpm", "ipm"), default="kpm")
    p.add_argument("--rank", type=int, default=16, help="uniform rank (CorDA++: the reference rank of a fraction)")
    p.add_argument(
        "--budget",
        default=None,
        help="CorDA++ budget: int parameters, or a fraction of what uniform --rank would cost (default with "
        "--cordapp: 1.0, that cost)",
    )
    p.add_argument("--cordapp", action="store_true", help="CorDA++ rank allocation (allocate_ranks)")
    p.add_argument("--min-rank", type=_positive, default=None, help="CorDA++: smallest rank per layer (default 1)")
    p.add_argument("--max-rank", type=_positive, default=None, help="CorDA++: largest rank per layer (default: none)")
    p.add_argument("--multiple", type=_positive, default=None, help="CorDA++ ranks are multiples of this (default 1)")
    p.add_argument(
        "--ipm-score",
        choices=("captured", "boundary"),
        default=None,
        help="CorDA++ IPM allocation score (default captured)",
    )
    p.add_argument(
        "--pi-from", choices=("cov", "wc"), default=None, help="CorDA++ allocation: π from C or W·C (default cov)"
    )
    p.add_argument(
        "--pi-normalize",
        choices=("mean", "none"),
        default=None,
        help="CorDA++ allocation: π normalization (default mean)",
    )
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: each layer's rank)")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--report", default=None, help="draw spectra and ranks to this image (needs matplotlib)")
    p.add_argument(
        "--no-keep-spectra",
        action="store_true",
        help="with --cordapp or --report: keep only singular values between the scoring and the build, which "
        "then computes each adapter's components itself (less memory: ~28 GiB less at 7B; ~16%% more time)",
    )
    p.add_argument(
        "--other-weights",
        action="store_true",
        help="build although the covariances were collected on other weights (e.g. the base of a fine-tune)",
    )
    _model_options(p)

    p = sub.add_parser("export", help="CorDA export -> LoRA on the original model (--base), or a merged model")
    p.add_argument("source", help="directory written by `build` / corda_kernels.save_pretrained")
    p.add_argument("-o", "--output", required=True, help="output directory (replaced if an earlier export)")
    p.add_argument("--base", help="the original model directory: write a rank-2r PEFT LoRA for it")
    p.add_argument("--merged", action="store_true", help="write one merged transformers model instead")
    p.add_argument(
        "--dtype", default="auto", help="model dtype: auto (the export's), float32, bfloat16, float16, float64"
    )
    p.add_argument("--no-progress", action="store_true", help="no loading or saving bars")

    p = sub.add_parser("demo", help="the README's end-to-end demo (options: corda-kernels demo --help)", add_help=False)
    p = sub.add_parser("bench", help="run the benchmarks in bench/ (extra arguments go to the scripts)")
    p.add_argument("which", nargs="?", choices=("collect", "ops", "all"), default="all")
    p.add_argument("--bench-dir", default=None)
    for name, p in sub.choices.items():
        if name not in ("demo", "bench"):  # those pass unknown options on to their scripts
            # SUPPRESS: absent here, the top-level --debug (before the command) still counts.
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return ap


def _quiet_loading_bars() -> None:
    """--no-progress also silences transformers' and the hub's loading and saving bars."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``corda-kernels``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.command not in ("demo", "bench"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if "--debug" in rest:  # demo and bench pass their other options on, but --debug is ours anywhere
        rest = [a for a in rest if a != "--debug"]
        args.debug = True
    if getattr(args, "no_progress", False):
        _quiet_loading_bars()
    try:
        if args.command == "collect":
            return cmd_collect(args)
        if args.command == "build":
            return cmd_build(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "demo":
            return cmd_demo(args, rest)
        return cmd_bench(args, rest)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"corda-kernels {args.command}: interrupted (outputs are written atomically: none was left half-written)",
            file=sys.stderr,
        )
        return 130
    except (CliError, ValueError, TypeError, KeyError, OSError, RuntimeError, re.error) as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"corda-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 1
