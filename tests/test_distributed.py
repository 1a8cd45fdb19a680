"""torch.distributed: a 2-process gloo run on CPU equals one process over the union of the data."""

import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import padded_batches, tiny_llama

import corda_kernels as ck
from corda_kernels.distributed import Shard, assign_groups

N_BATCHES = 5  # odd: the two shards differ in size


def _factors(model):
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in ck.corda_layers(model).items()}


def _worker(rank, world, init_file, out_dir):
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        batches = padded_batches(model.config.vocab_size, n_batches=N_BATCHES, seed=1)
        res = {}
        res["covs"] = ck.collect_cov(model, batches, progress=False)
        res["covs_max1"] = ck.collect_cov(model, batches, max_batches=1, progress=False)  # rank 1 reads nothing
        res["covs_pre"] = ck.collect_cov(model, batches[rank::world], distributed="presharded", progress=False)
        single = ck.Covariances.load(os.path.join(out_dir, "single.safetensors"))
        own = tiny_llama()  # adapters from this run's own (all-reduced) covariances
        ck.build_corda(own, res["covs"], rank=4, distributed=True)
        ck.build_corda(model, single, rank=4, ranks={"model.layers.0.mlp.down_proj": 2}, distributed=True)
        # CorDA++ allocation with the spectrum work split, then a distributed build that reuses it.
        fresh = ck.Covariances.load(os.path.join(out_dir, "single.safetensors"))
        pp = tiny_llama()
        alloc = ck.allocate_ranks(pp, fresh, budget=0.8, rank=4, distributed=True)
        cache = fresh.spectrum_cache
        with_vectors = len(cache._spectra)
        ck.build_corda(pp, fresh, rank=4, ranks=alloc, distributed=True)
        torch.save(
            {
                "covs": {k: v for k, v in res["covs"].items()},
                "tokens": res["covs"].token_counts,
                "max1": {k: v for k, v in res["covs_max1"].items()},
                "max1_tokens": res["covs_max1"].token_counts,
                "pre": {k: v for k, v in res["covs_pre"].items()},
                "factors": _factors(model),
                "own": {n: m.merged_weight() - m.weight for n, m in ck.corda_layers(own).items()},
                "alloc": dict(alloc),
                "alloc_used": alloc.used,
                "with_vectors": with_vectors,
                "values": len(cache._values),
                "pp_factors": _factors(pp),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, nprocs=2, timeout=240):
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout}s")


def test_two_process_gloo_matches_single_process(tmp_path):
    model = tiny_llama()
    batches = padded_batches(model.config.vocab_size, n_batches=N_BATCHES, seed=1)
    covs = ck.collect_cov(model, batches, progress=False)
    covs1 = ck.collect_cov(model, batches, max_batches=1, progress=False)
    covs.save(tmp_path / "single.safetensors")
    single = ck.Covariances.load(tmp_path / "single.safetensors")
    ck.build_corda(model, single, rank=4, ranks={"model.layers.0.mlp.down_proj": 2})
    ref_factors = _factors(model)
    plain = tiny_llama()
    ck.build_corda(plain, covs, rank=4)
    ref_updates = {n: m.merged_weight() - m.weight for n, m in ck.corda_layers(plain).items()}

    pp = tiny_llama()
    alloc = ck.allocate_ranks(pp, single, budget=0.8, rank=4)
    ck.build_corda(pp, single, rank=4, ranks=alloc)
    pp_factors = _factors(pp)

    _spawn(_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # Distributed CorDA++ allocation: the same ranks everywhere, each rank decomposing only its share
    # (its cache holds its share's vectors and everyone's singular values), and the same adapters.
    n_layers = len(single)
    assert [out["values"] for out in outs] == [n_layers, n_layers]
    assert sum(out["with_vectors"] for out in outs) == n_layers and all(out["with_vectors"] for out in outs)
    for out in outs:
        assert out["alloc"] == dict(alloc) and out["alloc_used"] == alloc.used
        for name, (A, B) in pp_factors.items():
            torch.testing.assert_close(out["pp_factors"][name][0], A, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out["pp_factors"][name][1], B, rtol=1e-6, atol=1e-7)

    for out in outs:
        assert set(out["covs"]) == set(covs)
        assert out["tokens"] == covs.token_counts
        assert out["max1_tokens"] == covs1.token_counts
        for name in covs:
            torch.testing.assert_close(out["covs"][name], covs[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["max1"][name], covs1[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["pre"][name], covs[name], rtol=1e-5, atol=1e-6)
        # Same covariances in, so the split decompositions must give exactly the single-process factors.
        assert set(out["factors"]) == set(ref_factors)
        for name, (A, B) in ref_factors.items():
            torch.testing.assert_close(out["factors"][name][0], A, rtol=0, atol=0)
            torch.testing.assert_close(out["factors"][name][1], B, rtol=0, atol=0)
    # End to end (distributed collection + distributed build): the same adapters, up to summation order.
    for out in outs:
        for name, upd in ref_updates.items():
            torch.testing.assert_close(out["own"][name], upd, rtol=1e-3, atol=1e-5)
    # Every rank holds identical covariances (one all-reduce, same result everywhere).
    for name in covs:
        assert torch.equal(outs[0]["covs"][name], outs[1]["covs"][name])


def _failing_worker(rank, world, init_file, out_dir):
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    seen = {}
    try:
        model = tiny_llama()
        batches = padded_batches(model.config.vocab_size, n_batches=4, seed=1)
        bad = list(batches)
        bad[1] = [dict(batches[1])]  # rank 1's first batch (round-robin split) is not a valid batch
        t = time.monotonic()
        try:
            ck.collect_cov(model, bad, progress=False)
        except Exception as e:  # noqa: BLE001
            seen["failure"] = (type(e).__name__, str(e), time.monotonic() - t)
        try:
            ck.collect_cov(model, batches, candidates=2, progress=False)
        except Exception as e:  # noqa: BLE001
            seen["candidates"] = (type(e).__name__, str(e))
        try:  # each rank loaded another model: their sums must not be added up
            ck.collect_cov(tiny_llama(seed=rank), batches, progress=False)
        except Exception as e:  # noqa: BLE001
            seen["weights"] = (type(e).__name__, str(e))
        # Rank 1 loaded other weights than the covariances': only its checks fail, and rank 0 must
        # hear so at once rather than wait in the decompositions' first collective.
        covs = ck.collect_cov(model, batches[:1], distributed=False, progress=False)
        other = tiny_llama(seed=rank)
        for what, call in (
            ("build", lambda: ck.build_corda(other, covs, rank=2, distributed=True)),
            ("allocate", lambda: ck.allocate_ranks(other, covs, budget=0.5, rank=2, distributed=True)),
        ):
            t = time.monotonic()
            try:
                call()
            except Exception as e:  # noqa: BLE001
                seen[what] = (type(e).__name__, str(e), time.monotonic() - t)
        # A rank that read no batch makes zero accumulators for the groups the others saw; where its
        # weights are offloaded (meta), they go to the CPU, not to the meta device.
        offloaded = tiny_llama()
        if rank == 1:
            offloaded.model.layers[1].to("meta")
        seen["offloaded"] = dict(ck.collect_cov(offloaded, batches, max_batches=1, progress=False))
        torch.save(seen, os.path.join(out_dir, f"fail{rank}.pt"))
        dist.barrier()  # no rank drops its connections while a peer still finishes the last exchange
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank saved its results and met the others at the barrier. gloo's teardown after this
    # test's failed exchanges aborted a CI run once ("terminate called without an active
    # exception": a joinable thread destroyed); what the test checks is done, so skip it.
    os._exit(0)


def test_a_failing_rank_stops_every_rank_and_candidates_refuse_a_group(tmp_path):
    # Without the error exchange, rank 0 would sit in the reduction until the group's timeout.
    _spawn(_failing_worker, (2, str(tmp_path / "init"), str(tmp_path)), timeout=180)
    outs = [torch.load(tmp_path / f"fail{r}.pt") for r in range(2)]
    kind1, msg1, _ = outs[1]["failure"]
    assert kind1 == "TypeError" and "collate" in msg1
    kind0, msg0, took = outs[0]["failure"]
    assert kind0 == "RuntimeError" and "failed on rank 1" in msg0 and "collate" in msg0
    assert took < 30  # far below the 60 s group timeout: told, not timed out
    for out in outs:
        kind, msg = out["candidates"]
        assert kind == "NotImplementedError" and "distributed=False" in msg
        kind, msg = out["weights"]
        assert kind == "RuntimeError" and "rank 1 holds other weights than rank 0" in msg
    for what in ("build", "allocate"):
        kind1, msg1, _ = outs[1][what]
        assert kind1 == "ValueError" and "collected on other weights" in msg1
        kind0, msg0, took = outs[0][what]
        assert kind0 == "RuntimeError" and "checks failed on rank 1" in msg0 and "other weights" in msg0
        assert took < 30, what
    model = tiny_llama()
    want = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=4, seed=1)[:1], progress=False)
    for out in outs:
        assert set(out["offloaded"]) == set(want)
        for name in want:
            torch.testing.assert_close(out["offloaded"][name].cpu(), want[name], rtol=1e-5, atol=1e-6)


def test_sharding_and_assignment_without_a_group():
    s = Shard(rank=1, world=3)
    loader, local_max = s.split(range(10), 8)
    assert list(loader) == [1, 4, 7]
    assert local_max == 3
    loader, local_max = Shard(rank=1, world=3, presharded=True).split(range(10), 8)
    assert list(loader) == list(range(10)) and local_max == 8
    assert Shard.resolve(None) is None  # no process group: plain local collection
    with pytest.raises(RuntimeError, match="process group"):
        Shard.resolve(True)
    with pytest.raises(ValueError, match="distributed"):
        Shard.resolve("yes")

    model = tiny_llama()
    from corda_kernels._targets import find_targets

    modules = find_targets(model)
    groups = [[n] for n in modules]
    owners = assign_groups(modules, groups, 2)
    assert set(owners) == {0, 1}
    # The biggest layers (down_proj) go to different ranks.
    downs = [owners[i] for i, g in enumerate(groups) if g[0].endswith("down_proj")]
    assert sorted(downs) == [0, 1]


def test_build_distributed_needs_a_group():
    model = tiny_llama()
    batches = padded_batches(model.config.vocab_size, n_batches=1)
    covs = ck.collect_cov(model, batches, progress=False)
    with pytest.raises(RuntimeError, match="process group"):
        ck.build_corda(model, covs, rank=2, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        ck.collect_cov(model, batches, distributed=True, progress=False)


@pytest.mark.parametrize("n, drop_last, warns", [(21, False, True), (20, False, False), (21, True, False)])
def test_a_padding_distributed_sampler_is_warned_about(n, drop_last, warns):
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from corda_kernels.distributed import _presharded

    data = TensorDataset(torch.arange(n))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False, drop_last=drop_last)
    loader = DataLoader(data, sampler=sampler, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _presharded(loader)
    assert any("count twice" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize("n, warns", [(12, False), (13, True)])
def test_an_accelerate_prepared_loader_counts_as_presharded(n, warns):
    # Accelerator.prepare (and the HF Trainer) shard with accelerate's own classes: splitting their
    # loader again would keep a third of a third of the data, silently.
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, TensorDataset

    from corda_kernels.distributed import _presharded

    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=2)
    loader = prepare_data_loader(loader, num_processes=3, process_index=0, put_on_device=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _presharded(loader)
    assert any("repeating samples" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize(
    "kind, n, warns",
    [("split", 10, False), ("split", 11, True), ("iterable", 16, False), ("iterable", 10, True)],
)
def test_accelerate_padding_is_warned_about_only_when_it_repeats(kind, n, warns):
    # split_batches: each batch is cut across the processes, so only a short last batch repeats.
    # An iterable dataset's shard pads its last round of batch_size × processes samples.
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    from corda_kernels.distributed import _presharded

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(n))

        def __len__(self):
            return n

    if kind == "split":
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=2)
        loader = prepare_data_loader(loader, num_processes=2, process_index=0, split_batches=True, put_on_device=False)
    else:
        loader = prepare_data_loader(
            DataLoader(Stream(), batch_size=4), num_processes=2, process_index=0, put_on_device=False
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _presharded(loader)
    assert any("repeating samples" in str(w.message) for w in caught) == warns
