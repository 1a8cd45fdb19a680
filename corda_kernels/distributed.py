"""torch.distributed support: sharded covariance collection and split decompositions.

Collection: under an initialized process group each rank feeds only its share
of the loader (global batch i goes to rank i % world) through its own
:class:`~corda_kernels.collect.Collector`; the raw sums and token counts are
all-reduced once, after the last batch and before normalization, so every
rank ends up holding identical :class:`Covariances`. A loader that is already
sharded (``DistributedSampler``) is detected and only reduced.

Decomposition: ``build_corda(..., distributed=True)`` assigns whole
covariance groups to ranks (largest first, to the least loaded rank), each
rank decomposes its share, and every (A, B) is broadcast from its owner.

Tensors travel through the backend's device (CUDA for NCCL, CPU otherwise)
and are copied back to where they live, so accumulators and factors stay on
their module's device (``device_map`` models).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .covariance import SIGNATURE_TOLERANCE, weight_signatures

Distributed = bool | str | None
_MODES = (None, True, False, "presharded")


def is_active() -> bool:
    """True when a torch.distributed process group is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not is_active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_(t: torch.Tensor) -> None:
    """In-place SUM all-reduce of ``t``, staging through the backend's device if ``t`` lives elsewhere."""
    dev = _comm_device()
    if t.device == dev:
        torch.distributed.all_reduce(t)
        return
    buf = t.to(dev)
    torch.distributed.all_reduce(buf)
    t.copy_(buf)


def _broadcast_(t: torch.Tensor, src: int) -> None:
    dev = _comm_device()
    if t.device == dev:
        torch.distributed.broadcast(t, src)
        return
    buf = t.to(dev)
    torch.distributed.broadcast(buf, src)
    t.copy_(buf)


def _uneven(shard, dataset) -> bool:
    """Whether accelerate's padding to equal shards will repeat samples (unknown sizes count as yes).

    A ``BatchSamplerShard`` repeats when the batches do not divide among the processes (unless each
    batch is split across them) or the last batch is short; an ``IterableDatasetShard`` when the data
    does not fill its last round of batch_size (times processes, unless split) samples."""
    split = bool(getattr(shard, "split_batches", False))
    inner = getattr(shard, "batch_sampler", None)
    try:
        if inner is not None:
            size = getattr(inner, "batch_size", None)
            short = size is not None and not getattr(inner, "drop_last", False) and len(dataset) % size != 0
            return short or (not split and len(inner) % shard.num_processes != 0)
        size = shard.batch_size
        return len(shard.dataset) % (size if split else size * shard.num_processes) != 0
    except (TypeError, AttributeError):
        return True


def _presharded(loader) -> bool:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    from torch.utils.data.distributed import DistributedSampler

    found = next((x for x in (sampler, inner) if isinstance(x, DistributedSampler)), None)
    if found is not None and not found.drop_last and found.total_size > len(found.dataset):
        warnings.warn(
            f"DistributedSampler pads {len(found.dataset)} samples to {found.total_size} by repeating "
            f"{found.total_size - len(found.dataset)} of them, which then count twice in the covariances; "
            "use drop_last=True, or a dataset size divisible by the world size",
            stacklevel=4,
        )
    if found is not None:
        return True
    # accelerate (Accelerator.prepare, the HF Trainer) shards through its own classes, which carry
    # num_processes/process_index; its dispatcher hands each process its slice of every batch.
    if type(loader).__name__ == "DataLoaderDispatcher":
        return True
    dataset = getattr(loader, "dataset", None)
    for x in (batch_sampler, sampler, inner, getattr(batch_sampler, "batch_sampler", None), dataset):
        if isinstance(getattr(x, "num_processes", None), int) and x.num_processes > 1 and hasattr(x, "process_index"):
            # BatchSamplerShard pads only with even_batches; IterableDatasetShard always, unless drop_last.
            pads = getattr(x, "even_batches", True) and not getattr(x, "drop_last", False)
            if pads and _uneven(x, dataset):
                warnings.warn(
                    "accelerate pads the shards to equal size by repeating samples (even_batches, or an iterable "
                    "dataset without drop_last); the repeated ones count twice in the covariances "
                    "(Accelerator(even_batches=False), or drop_last=True, avoids it)",
                    stacklevel=4,
                )
            return True
    return False


# ---------------------------------------------------------------------- collection
@dataclass
class Shard:
    """This rank's view of a distributed collection: which batches to read, and the final reduction."""

    rank: int
    world: int
    presharded: bool = False

    @classmethod
    def resolve(cls, distributed: Distributed, loader=None) -> Shard | None:
        """The shard for ``collect_cov(distributed=...)``: None = auto (on when a group is initialized)."""
        if distributed not in _MODES:
            raise ValueError(f"distributed must be None, True, False or 'presharded', got {distributed!r}")
        if distributed is False:
            return None
        if not is_active():
            if distributed is None:
                return None
            raise RuntimeError(
                f"collect_cov(distributed={distributed!r}) needs an initialized torch.distributed process group "
                "(torchrun + torch.distributed.init_process_group)"
            )
        rank, world = rank_and_world()
        pre = distributed == "presharded" or (loader is not None and _presharded(loader))
        return cls(rank, world, pre)

    def split(self, loader: Iterable, max_batches: int | None) -> tuple[Iterable, int | None]:
        """(this rank's batches, its max_batches). ``max_batches`` counts global batches unless presharded."""
        if self.presharded or self.world == 1:
            return loader, max_batches
        it = loader if max_batches is None else itertools.islice(loader, max_batches)
        local_max = None if max_batches is None else len(range(self.rank, max_batches, self.world))
        return itertools.islice(it, self.rank, None, self.world), local_max

    def reduce(self, collector, n_batches: int, error: BaseException | None = None) -> int:
        """Make every rank's collector hold the global sums; returns the global number of batches.

        Groups are matched by member names (a rank that saw no batch, or met
        a module later than another rank did, still lines up); a module that
        shares its input with different modules on different ranks raises.
        A rank whose collection failed passes its ``error``: then every rank
        raises right after the first exchange, and no sums are reduced.
        """
        import torch.distributed as dist

        from .collect import _Group

        local = {
            "groups": [(list(g.names), g.d) for g in collector.groups],
            "unmasked": sorted(collector.unmasked),
            "masked": sorted(collector.masked),
            "decoder_unmasked": sorted(collector.decoder_unmasked),
            "batches": n_batches,
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
        if error is None:
            # Summing covariances of different models is meaningless: every rank must hold the same weights.
            local["signatures"] = weight_signatures(collector.modules)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, local)
        failed = [(r, info["error"]) for r, info in enumerate(gathered) if info.get("error")]
        if failed:
            if error is not None:
                return 0  # the caller re-raises its own exception
            r, msg = failed[0]
            raise RuntimeError(f"collection failed on rank {r} ({msg}); stopping on rank {self.rank} too")
        collector.signatures = local["signatures"]
        ref = gathered[0]["signatures"]
        for r, info in enumerate(gathered[1:], 1):
            for name, (norm, proj) in info["signatures"].items():
                norm0, proj0 = ref.get(name, (norm, proj))
                tol = SIGNATURE_TOLERANCE * max(abs(norm0), abs(norm), 1e-30)
                if abs(norm - norm0) > tol or abs(proj - proj0) > tol:
                    raise RuntimeError(
                        f"rank {r} holds other weights than rank 0 for module {name!r} (‖W‖ {norm:.6g} vs "
                        f"{norm0:.6g}): every rank must load the same model before collecting"
                    )

        order: list[tuple[str, ...]] = []
        dims: dict[tuple[str, ...], int] = {}
        owner: dict[str, tuple[str, ...]] = {}
        for r, info in enumerate(gathered):
            for names, d in info["groups"]:
                key = tuple(names)
                for name in names:
                    prev = owner.get(name)
                    if prev is not None and set(prev) != set(key):
                        raise RuntimeError(
                            f"module {name!r} shared its input with {list(prev)} on one rank but with {list(key)} "
                            f"on rank {r}: collect these modules separately (targets=...)"
                        )
                if any(n in owner for n in names):
                    continue
                for name in names:
                    owner[name] = key
                order.append(key)
                dims[key] = d

        mine = {frozenset(g.names): g for g in collector.groups}

        def line_up():
            groups = []
            for key in order:
                g = mine.get(frozenset(key))
                if g is None:
                    dev = collector.accumulator_device(key[0])
                    d = dims[key]
                    zero = torch.zeros((), dtype=torch.float64, device=dev)
                    acc = torch.zeros(d, d, dtype=collector.accum_dtype, device=dev)
                    g = _Group(list(key), d, acc, zero, zero.clone(), 0)
                g.names = list(key)
                groups.append(g)
            return groups

        # Local work between two collectives: a failure here must reach every rank, not strand them.
        groups = checked_on_every_rank("the covariance reduction", line_up)
        collector.groups = groups
        collector.group_of = {name: i for i, g in enumerate(groups) for name in g.names}
        collector.unmasked = set().union(*(set(info["unmasked"]) for info in gathered))
        collector.masked = set().union(*(set(info["masked"]) for info in gathered))
        collector.decoder_unmasked = set().union(*(set(info["decoder_unmasked"]) for info in gathered))

        for g in groups:
            _all_reduce_(g.acc)
        if groups:
            dev = _comm_device()
            counts = torch.stack([torch.stack([g.count.to(dev), g.seqs.to(dev)]) for g in groups])
            torch.distributed.all_reduce(counts)
            for g, (c, s) in zip(groups, counts):
                g.count = c.to(g.acc.device)
                g.seqs = s.to(g.acc.device)
        return sum(int(info["batches"]) for info in gathered)


# ---------------------------------------------------------------------- decomposition
def _group_cost(modules: Mapping[str, nn.Module], group: list[str]) -> float:
    """Rough flop count: the damping Cholesky, then per module W·C, the Gram product and its eigh."""
    from ._targets import weight_shape

    d_in = weight_shape(modules[group[0]])[1]
    cost = d_in**3 / 3
    for name in group:
        d_out, d_in = weight_shape(modules[name])
        k = min(d_out, d_in)
        cost += d_out * d_in * d_in + d_out * d_in * k + 9 * k**3
    return cost


def assign_groups(modules: Mapping[str, nn.Module], groups: list[list[str]], world: int) -> list[int]:
    """Owner rank of each group: longest-processing-time-first onto the least loaded rank (deterministic)."""
    costs = [_group_cost(modules, g) for g in groups]
    load = [0.0] * world
    owners = [0] * len(groups)
    for i in sorted(range(len(groups)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def exchange(payload, error: BaseException | None, what: str) -> list:
    """Every rank's ``payload`` (one all_gather_object), or, if any rank failed, its error raised on every rank.

    Each rank calls it once whatever happened locally, so no rank is left waiting in a collective.
    """
    import torch.distributed as dist

    _, world = rank_and_world()
    report = {"error": f"{type(error).__name__}: {error}"} if error is not None else {"payload": payload}
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if error is not None:
        raise error
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")
    return [rep["payload"] for rep in reports]


def checked_on_every_rank(what: str, fn, enabled: bool = True):
    """``fn()``, whose failure on any rank is raised on every rank, so none is left waiting in the next
    collective for a rank that stopped (a rank that loaded other weights fails the checks alone).
    ``enabled=False`` (a caller working locally) or no process group: just ``fn()``."""
    if not enabled or not is_active():
        return fn()
    result, failure = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised by exchange, here and on every other rank
        failure = e
    exchange(None, failure, what)
    return result


def decompose_all_distributed(
    modules: Mapping[str, nn.Module], covs: Mapping[str, torch.Tensor], p, mode: str, *, progress: bool = False, **kw
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``rewrite.decompose_all`` with the groups split across ranks and the factors broadcast from their owners.

    Every rank returns the same factors, each on its module's device. A
    failure on one rank is raised on every rank (no rank is left waiting).
    """

    from ._targets import linear_weight
    from .rewrite import BuildPlan, decompose_all

    if not is_active():
        raise RuntimeError(
            "build_corda(distributed=True) needs an initialized torch.distributed process group "
            "(torchrun + torch.distributed.init_process_group)"
        )
    rank, world = rank_and_world()
    owners = assign_groups(modules, p.groups, world)
    mine = [g for g, o in zip(p.groups, owners) if o == rank]
    names = [n for g in mine for n in g]
    sub = BuildPlan({n: p.ranks[n] for n in names}, {n: p.alphas[n] for n in names}, mine)
    local: dict = {}
    error = None
    try:
        if mine:
            local = decompose_all(
                {n: modules[n] for n in names}, covs, sub, mode, progress=progress and rank == 0, **kw
            )
    except Exception as e:  # re-raised below on every rank, after all ranks have reported
        error = e
    # One collective carries both any failure and the factors' shapes/dtypes, so receivers need not guess them.
    shapes = {n: (str(A.dtype), tuple(A.shape), tuple(B.shape)) for n, (A, B) in local.items()}
    reports = exchange(shapes, error, "decomposition")

    out = {}
    for group, owner in zip(p.groups, owners):
        for name in group:
            if owner == rank:
                A, B = (t.contiguous() for t in local[name])
            else:
                dtype, a_shape, b_shape = reports[owner][name]
                dev = linear_weight(modules[name]).device
                dt = getattr(torch, dtype.removeprefix("torch."))
                A = torch.empty(a_shape, dtype=dt, device=dev)
                B = torch.empty(b_shape, dtype=dt, device=dev)
            _broadcast_(A, owner)
            _broadcast_(B, owner)
            out[name] = (A, B)
    return out
