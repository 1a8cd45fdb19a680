import warnings
import weakref

import pytest
import torch
from conftest import requires_compilable_transformers
from tiny import padded_batches, reference_covariances, rel, tiny_gpt2, tiny_llama
from torch import nn

import corda_kernels as ck


@pytest.mark.parametrize("left", [False, True])
def test_llama_every_layer_matches_float64_reference(left):
    model = tiny_llama()
    batches = padded_batches(128, left=left)
    covs = ck.collect_cov(model, batches, progress=False)
    names = list(covs)
    assert len(names) == 14  # 7 linears x 2 layers, lm_head excluded
    assert "lm_head" not in covs
    ref, counts = reference_covariances(model, batches, names)
    for n in names:
        assert rel(covs[n], ref[n]) < 1e-5, n
    expected_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert covs.tokens == expected_tokens
    assert all(c == expected_tokens for c in covs.token_counts.values())


def test_shared_inputs_are_grouped_and_computed_once():
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128), progress=False)
    groups = {tuple(n.rsplit(".", 1)[-1] for n in g) for g in covs.groups}
    assert ("q_proj", "k_proj", "v_proj") in groups
    assert ("gate_proj", "up_proj") in groups
    assert ("o_proj",) in groups and ("down_proj",) in groups
    q = covs["model.layers.0.self_attn.q_proj"]
    assert q is covs["model.layers.0.self_attn.v_proj"]
    assert q is not covs["model.layers.1.self_attn.q_proj"]


def test_gpt2_conv1d_targets():
    model = tiny_gpt2()
    batches = padded_batches(100, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    assert any(n.endswith("attn.c_attn") for n in covs)
    ref, _ = reference_covariances(model, batches, list(covs))
    for n in covs:
        assert rel(covs[n], ref[n]) < 1e-5, n
    assert covs["transformer.h.0.attn.c_attn"].shape == (48, 48)
    assert covs["transformer.h.0.mlp.c_proj"].shape == (192, 192)


def test_peft_normalization_matches_reference():
    model = tiny_llama()
    batches = padded_batches(128)
    covs = ck.collect_cov(model, batches, normalize="peft", progress=False)
    ref, counts = reference_covariances(model, batches, list(covs), normalize="peft")
    for n in covs:
        assert rel(covs[n], ref[n]) < 1e-5, n
    assert covs.sequences == 9


@pytest.mark.parametrize("normalize", ["mean", "peft"])
def test_a_float64_model_collects_to_float64_precision(normalize):
    # With a float64 accumulator every step stays in float64, PEFT's per-sequence scale included
    # (it was computed in fp32: 1e-8 off).
    model = tiny_llama().double()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, normalize=normalize, accum_dtype=torch.float64, progress=False)
    ref, _ = reference_covariances(model, batches, list(covs), normalize=normalize)
    for n in covs:
        assert rel(covs[n], ref[n]) < 1e-13, n


def test_padding_does_not_leak_even_if_nan():
    # A NaN in a padded position must be dropped, not multiplied by zero.
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    x[1, 4] = float("nan")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 4)

        def forward(self, x, attention_mask=None):
            return self.f(x)

    m = M()
    covs = ck.collect_cov(m, [{"x": x, "attention_mask": mask}], progress=False)
    keep = x[mask.bool()].double()
    assert rel(covs["f"], keep.T @ keep / keep.shape[0]) < 1e-6


def test_batch_forms_and_targets():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    for loader in ([x], [(x,)], [[x]]):
        covs = ck.collect_cov(model, loader, progress=False)
        assert set(covs) == {"0", "2"}
        assert rel(covs["0"], x.double().T @ x.double() / 4) < 1e-6
    covs = ck.collect_cov(model, [x], targets=["2"], progress=False)
    assert set(covs) == {"2"}
    covs = ck.collect_cov(model, [x], targets=lambda n, m: m.out_features == 5, progress=False)
    assert set(covs) == {"0"}
    covs = ck.collect_cov(model, [x], targets=["re:[02]"], progress=False)
    assert set(covs) == {"0", "2"}
    with pytest.raises(ValueError, match="matched no"):
        ck.collect_cov(model, [x], targets=["nope"], progress=False)


def test_one_output_layers_are_not_default_targets():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1))  # a scalar gate: rank 1, all adapter
    x = torch.randn(4, 6)
    assert set(ck.collect_cov(model, [x], progress=False)) == {"0"}
    assert set(ck.collect_cov(model, [x], targets=["1"], progress=False)) == {"1"}


def test_max_batches_and_float64_accumulation():
    model = nn.Sequential(nn.Linear(6, 5))
    xs = [torch.randn(3, 6) for _ in range(4)]
    covs = ck.collect_cov(model, xs, max_batches=2, accum_dtype=torch.float64, progress=False)
    ref = sum(x.double().T @ x.double() for x in xs[:2]) / 6
    assert covs["0"].dtype == torch.float64
    assert rel(covs["0"], ref) < 1e-12
    assert covs.tokens == 6


def test_mode_restored_and_hooks_removed_on_error():
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()

    def bad():
        yield padded_batches(128, n_batches=1)[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        ck.collect_cov(model, bad(), progress=False)
    assert model.training and not model.model.layers[0].training
    for m in model.modules():
        assert not m._forward_pre_hooks, m
    model.eval()
    ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    assert not model.training
    for m in model.modules():
        assert not m._forward_pre_hooks


def test_a_failure_while_hooking_undoes_the_set_up(monkeypatch):
    # The hooks go on one module at a time: one refused halfway must still leave the model as it was.
    model = tiny_llama().train()
    victim = model.model.layers[1].mlp.up_proj

    def refuse(*a, **k):
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(victim, "register_forward_pre_hook", refuse)
    with pytest.raises(RuntimeError, match="no hooks here"):
        ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False, early_stop=True)
    assert model.training and model.config.use_cache is True
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, m


def test_a_scripted_submodule_takes_no_hook_and_collection_goes_on():
    # TorchScript modules refuse Python hooks: watching and row-passing skip them instead of failing.
    model = tiny_llama(layers=3)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.jit.script(nn.SiLU())
    batches = padded_batches(128, n_batches=3)
    covs = ck.collect_cov(model, batches, progress=False, early_stop=True)
    ref, _ = reference_covariances(model, batches, list(covs))
    assert all(rel(covs[n], ref[n]) < 1e-5 for n in covs)


def test_empty_loader_and_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no batch"):
        ck.collect_cov(model, [], progress=False)
    with pytest.raises(ValueError, match="normalize"):
        ck.collect_cov(model, [torch.randn(2, 4)], normalize="max", progress=False)
    with pytest.raises(TypeError, match="accum_dtype"):
        ck.collect_cov(model, [torch.randn(2, 4)], accum_dtype=torch.float16, progress=False)
    with pytest.raises(TypeError, match="batch"):
        ck.collect_cov(model, [3.0], progress=False)


def test_non_finite_activation_names_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'1'"):
        ck.collect_cov(model, [torch.randn(3, 4)], progress=False)


def test_save_load_roundtrip_and_atomicity(tmp_path, monkeypatch):
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    p = tmp_path / "sub" / "covs.safetensors"
    covs.save(p)
    assert [f.name for f in p.parent.iterdir()] == ["covs.safetensors"]  # no temp file left behind
    back = ck.Covariances.load(p)
    assert back.groups == covs.groups and back.tokens == covs.tokens
    assert back.fingerprint == covs.fingerprint
    for n in covs:
        assert torch.equal(back[n], covs[n])
    assert back["model.layers.0.self_attn.q_proj"] is back["model.layers.0.self_attn.k_proj"]

    # A write that dies half-way leaves the previous file intact and no temp file.
    import safetensors.torch as st

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    before = p.read_bytes()
    monkeypatch.setattr(st, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        covs.save(p)
    assert p.read_bytes() == before
    assert [f.name for f in p.parent.iterdir()] == ["covs.safetensors"]


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not a corda_kernels covariance file"):
        ck.Covariances.load(p)


def test_early_stop_keeps_every_layer():
    # Batches after the first stop at the last target; the covariances must still include every layer.
    model = tiny_llama(layers=3)
    batches = padded_batches(128, n_batches=4)
    covs = ck.collect_cov(model, batches, progress=False, early_stop=True)
    ref, _ = reference_covariances(model, batches, list(covs))
    last = "model.layers.2.mlp.down_proj"
    assert rel(covs[last], ref[last]) < 1e-5


def test_progress_bar_shows_total_and_token_rate(capsys):
    model = tiny_llama(layers=1)
    batches = padded_batches(128, n_batches=3)
    covs = ck.collect_cov(model, batches, progress=True)
    err = capsys.readouterr().err
    assert "/3" in err  # the total is known, so tqdm can give an ETA
    assert covs.tokens == sum(int(b["attention_mask"].sum()) for b in batches)


class _Branchy(nn.Module):
    """Text-only or text+image batches: the vision linear runs only when pixels come; `head` is the output."""

    def __init__(self, d=8):
        super().__init__()
        self.vision, self.l1, self.l2, self.head = (nn.Linear(d, d) for _ in range(4))

    def get_output_embeddings(self):
        return self.head

    def forward(self, x, pixel=None):
        if pixel is not None:
            x = x + self.vision(pixel)
        return self.head(self.l2(self.l1(x)))


@pytest.mark.parametrize("order", ["text_first", "image_first"])
def test_early_stop_survives_batches_that_call_different_modules(order):
    # The forward stops early from the second batch on; a batch that calls a module the first batch
    # did not (or skips one) must still reach every target.
    torch.manual_seed(0)
    model = _Branchy()
    x, p = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    text, image = {"x": x}, {"x": x, "pixel": p}
    batches = [text, image, image, text] if order == "text_first" else [image, text, image, text]
    covs = ck.collect_cov(model, batches, progress=False, normalize="sum", early_stop=True)
    assert covs.token_counts == {"vision": 20, "l1": 40, "l2": 40}
    h = x + model.vision(p)
    l1_in = torch.cat([x, h, h, x] if order == "text_first" else [h, x, h, x]).reshape(-1, 8).double()
    assert rel(covs["l1"], l1_in.T @ l1_in) < 1e-5


def test_tuple_batches_take_the_mask_from_the_forward_signature():
    model = tiny_llama()
    batches = padded_batches(128)
    covs = ck.collect_cov(model, [(b["input_ids"], b["attention_mask"]) for b in batches], progress=False)
    assert covs.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    ref, _ = reference_covariances(model, batches, list(covs))
    assert all(rel(covs[n], ref[n]) < 1e-5 for n in covs)


def test_a_tuple_batch_whose_mask_would_go_to_the_cache_is_refused():
    # GPT-2's second parameter is the KV cache (transformers 4: past_key_values, 5: cache), not the mask.
    model = tiny_gpt2()
    batches = padded_batches(100, n_batches=1)
    tuples = [(b["input_ids"], b["attention_mask"]) for b in batches]
    with pytest.raises(ValueError, match=r"element 1 of a tuple batch .* parameter '(past_key_values|cache)'"):
        ck.collect_cov(model, tuples, progress=False)
    assert not any(m._forward_pre_hooks for m in model.modules())
    covs = ck.collect_cov(model, [(b["input_ids"],) for b in batches], progress=False)  # ids alone are fine
    assert covs.tokens == batches[0]["input_ids"].numel()


class _Series(nn.Module):
    """A time-series forward: its 'past_*' parameters are data, not a KV cache."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 8)

    def forward(self, past_values, past_observed_mask=None):
        return self.proj((past_values * past_observed_mask).unsqueeze(-1))


def test_a_tuple_batch_for_past_named_data_parameters_is_taken():
    x = torch.randn(2, 7)
    covs = ck.collect_cov(_Series(), [(x, torch.ones_like(x))], progress=False)
    assert rel(covs["proj"], (x.reshape(-1, 1).double().T @ x.reshape(-1, 1).double()) / 14) < 1e-6


def test_list_of_dicts_gets_a_clear_error():
    model = tiny_llama()
    b = padded_batches(128, n_batches=1)[0]
    with pytest.raises(TypeError, match="collate"):
        ck.collect_cov(model, [[{"input_ids": b["input_ids"][0]}]], progress=False)


def test_iterable_dataset_loader_with_progress_and_exact_max_batches():
    model = tiny_llama()
    batches = padded_batches(128, n_batches=4)
    pulled = []

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in batches:
                pulled.append(1)
                yield b

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    covs = ck.collect_cov(model, loader, max_batches=2, progress=True)  # len(loader) raises TypeError
    assert len(pulled) == 2  # not one more than used
    assert covs.tokens == sum(int(b["attention_mask"].sum()) for b in batches[:2])


class _Router(nn.Module):
    """A router reading hidden.view(-1, d) (same tokens, flattened), a layer reading a flattened
    copy of them that is not a view (OPT's MLP reads a normalized one), a layer reading every token
    in another order (seq-first), and one reading image patches whose row count equals batch·seq."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.router = nn.Linear(d, 4)
        self.flat = nn.Linear(d, d)
        self.seq_first = nn.Linear(d, d)
        self.patches = nn.Linear(d, d)
        self.tokens = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask=None, pixel_values=None):
        h = self.emb(input_ids)
        self.tokens(h)  # the same tokens, unflattened
        self.router(h.view(-1, h.shape[-1]))
        self.flat(h.reshape(-1, h.shape[-1]) * 1.0)
        self.seq_first(h.transpose(0, 1).reshape(-1, h.shape[-1]))
        if pixel_values is not None:
            self.patches(pixel_values.reshape(-1, pixel_values.shape[-1]))


def _three_padded(seq: int, cut: int):
    """Three sequences of token ids < 50: the first padded from ``cut``, the last one token long."""
    ids = torch.randint(0, 50, (3, seq))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, cut:] = 0
    mask[2, 1:] = 0
    return ids, mask


@pytest.mark.parametrize("image", [False, True])
def test_mask_applies_to_flattened_views_only(image):
    # Equal row counts are not enough: patches, or the same tokens in another order, would have the
    # mask applied to the wrong rows. Such inputs count every row, and a warning names them.
    torch.manual_seed(0)
    model = _Router()
    ids, mask = _three_padded(seq=6, cut=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    pixels = torch.randn(2, 9, 8)  # 18 patch rows, as many as the batch has token positions
    if image:
        batch["pixel_values"] = pixels
    targets = None if image else ["router", "tokens", "flat", "seq_first"]
    with pytest.warns(UserWarning, match="'flat', .*'seq_first'"):
        covs = ck.collect_cov(model, [batch], targets=targets, progress=False, normalize="sum")
    h = model.emb(ids).detach().double()
    kept = h[mask.bool()]
    for name in ("router", "tokens"):
        assert covs.token_counts[name] == int(mask.sum())
        assert rel(covs[name], kept.T @ kept) < 1e-6
    every = h.reshape(-1, 8)
    for name in ("flat", "seq_first"):
        assert covs.token_counts[name] == 18
        assert rel(covs[name], every.T @ every) < 1e-6
    if image:
        assert covs.token_counts["patches"] == 18
        assert rel(covs["patches"], pixels.double().reshape(-1, 8).T @ pixels.double().reshape(-1, 8)) < 1e-6

    # normalize="peft" scales each sequence by its own max: a flattened view must get the same
    # per-sequence treatment as the (batch, seq, d) tensor it views.
    with pytest.warns(UserWarning, match="flat"):
        peft = ck.collect_cov(model, [batch], targets=["router", "tokens", "flat"], progress=False, normalize="peft")
    seqs = [h[b][mask[b].bool()] for b in range(3)]
    ref = sum(x.T @ x / x.max().abs() ** 2 for x in seqs) / 3
    for name in ("tokens", "router"):
        assert rel(peft[name], ref) < 1e-5


class _Flip(nn.Module):
    def forward(self, x):
        return x.flip(0)


class _NormedMLP(nn.Module):
    """OPT's MLP: flattened tokens, normalized (a new tensor, no longer a view), then fc1 -> act -> fc2.
    Token order survives the norm, fc1 and the activation module, but not a module that reorders rows,
    nor a seq-first flattening."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.norm, self.norm_sf = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.act = nn.Linear(d, 12), nn.Linear(12, d), nn.GELU()
        self.flipped, self.seq_first = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        x = self.norm(h.reshape(-1, h.shape[-1]))
        self.fc2(self.act(self.fc1(x)))
        self.flipped(_Flip()(x))
        self.seq_first(self.norm_sf(h.transpose(0, 1).contiguous().view(-1, h.shape[-1])))


def test_token_order_follows_through_row_wise_modules():
    torch.manual_seed(0)
    model = _NormedMLP()
    ids, mask = _three_padded(seq=5, cut=3)
    with pytest.warns(UserWarning, match=r"\['flipped', 'seq_first'\]"):
        covs = ck.collect_cov(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, normalize="sum")
    with torch.no_grad():
        h = model.emb(ids).double()
        x = torch.nn.functional.layer_norm(h.reshape(-1, 8), (8,), model.norm.weight.double(), model.norm.bias.double())
        y = model.act(torch.nn.functional.linear(x, model.fc1.weight.double(), model.fc1.bias.double()))
        sf = model.norm_sf(h.transpose(0, 1).reshape(-1, 8).float()).double()
    keep = mask.reshape(-1).bool()
    for name, rows in (("fc1", x[keep]), ("fc2", y[keep]), ("flipped", x), ("seq_first", sf)):
        assert covs.token_counts[name] == rows.shape[0], name
        assert rel(covs[name], rows.T @ rows) < 1e-5, name


class _Watch(nn.Module):
    """Llama-free probe: the second linear checks that the first one's input was already freed."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.freed = []

    def forward(self, x):
        t = x * 2.0
        ref = weakref.ref(t)
        y = self.a(t)
        del t
        self.freed.append(ref() is None)
        return self.b(y)


def test_a_collector_finishes_once():
    from corda_kernels.collect import Collector, run_batches

    model = nn.Sequential(nn.Linear(6, 5))
    collector = Collector({"0": model[0]})
    run_batches(model, [torch.randn(4, 6)], collector, progress=False)
    collector.finish()
    with pytest.raises(RuntimeError, match="already called"):
        collector.finish()  # its accumulators are the first result, mirrored and scaled in place


def test_collection_never_keeps_an_input_alive():
    # The hooks hold activations by weak reference: peak memory stays that of a plain no-grad forward.
    model = _Watch()
    covs = ck.collect_cov(model, [torch.randn(4, 8)] * 2, targets=["a", "b"], progress=False)
    assert model.freed == [True, True]
    assert covs.token_counts == {"a": 8, "b": 8}


@pytest.mark.parametrize("normalize", ["mean", "peft"])
def test_triton_backend_end_to_end(monkeypatch, normalize):
    # collect_cov on the kernel path (the interpreter off a GPU): padded batches, shared inputs, the
    # batch's kept-row list built once per batch and reused by every accumulator.
    from corda_kernels import ops

    built = []

    class Counting(ops.KeptRows):
        def index_and_count(self):
            if self._index is None:
                built.append(self.mask.numel())
            return super().index_and_count()

    monkeypatch.setattr(ops, "KeptRows", Counting)
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, normalize=normalize, backend="triton", progress=False)
    ref, counts = reference_covariances(model, batches, list(covs), normalize=normalize)
    for n in covs:
        assert rel(covs[n], ref[n]) < 1e-5, n
    assert covs.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert len(built) == len(batches)


class WritesInPlace(nn.Module):
    """l2 reads the very tensor object l1 read, after it was changed in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 6)

    def forward(self, h):
        h = h.clone()
        a = self.l1(h)
        h += 3 * a
        return self.l2(h)


def test_a_tensor_changed_in_place_between_reads_is_two_inputs():
    model = WritesInPlace()
    batches = [torch.randn(3, 5, 8) for _ in range(3)]
    covs = ck.collect_cov(model, batches, progress=False)
    assert sorted(map(sorted, covs.groups)) == [["l1"], ["l2"]]
    seen = {"l1": [], "l2": []}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].double())) for n in seen]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for n, xs in seen.items():
        x = torch.cat([t.reshape(-1, 8) for t in xs])
        assert rel(covs[n], x.T @ x / x.shape[0]) < 1e-6, n


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4)
    return T5ForConditionalGeneration(cfg).eval()


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
    )  # fmt: skip
    return BartForConditionalGeneration(cfg).eval()


def _seq2seq_batches(vocab, n=2, batch=3, seq=10, seed=0):
    # Encoder and decoder of equal length, padded differently: the shapes cannot tell the masks apart.
    enc, dec = padded_batches(vocab, n, batch, seq, seed=seed), padded_batches(vocab, n, batch, seq, seed=seed + 1)
    return [
        {**e, "decoder_input_ids": d["input_ids"], "decoder_attention_mask": d["attention_mask"]}
        for e, d in zip(enc, dec)
    ]


@pytest.mark.parametrize("make", [_t5, _bart])
def test_encoder_decoder_decoder_layers_take_the_decoder_mask(make):
    model = make()
    batches = _seq2seq_batches(model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covs = ck.collect_cov(model, batches, progress=False)
    cross_kv = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")

    def mask_of(name, b):
        decoder = ".decoder." in f".{name}" and not name.endswith(cross_kv)
        return b["decoder_attention_mask" if decoder else "attention_mask"]

    seen = {n: [] for n in covs}
    named = dict(model.named_modules())
    current = {}
    hooks = [
        named[n].register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].double()[mask_of(n, current["b"]).bool()])
        )
        for n in covs
    ]
    with torch.no_grad():
        for b in batches:
            current["b"] = b
            model(**b)
    for h in hooks:
        h.remove()
    checked = set()
    for n, xs in seen.items():
        x = torch.cat(xs)
        assert rel(covs[n], x.T @ x / x.shape[0]) < 1e-5, n
        checked.add(mask_of(n, batches[0]) is batches[0]["decoder_attention_mask"])
    assert checked == {True, False}
    # Without decoder_attention_mask the decoder counts every position, and says so.
    plain = [{k: v for k, v in b.items() if k != "decoder_attention_mask"} for b in batches]
    with pytest.warns(UserWarning, match="no decoder_attention_mask"):
        ck.collect_cov(model, plain, progress=False)


def test_tuple_batches_find_the_mask_through_a_compiled_model():
    from corda_kernels.collect import _forward_params, split_batch

    model = tiny_llama()
    compiled = torch.compile(model)  # nothing compiles until it is called
    params = _forward_params(compiled)[0]
    assert params[:2] == ["input_ids", "attention_mask"]
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    assert split_batch((ids, mask), params)[2] is mask


@requires_compilable_transformers
def test_collect_over_a_compiled_model_runs_the_kernel_like_eager(monkeypatch):
    # The hooks run inside the compiled graph: the covariance launch must trace (as a custom op).
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "triton")
    torch._dynamo.reset()
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    eager = ck.collect_cov(model, batches, progress=False)
    compiled = ck.collect_cov(torch.compile(model, backend="aot_eager"), batches, progress=False)
    # Named as inside the wrapper (no "_orig_mod."), so they fit the plain model, fingerprint included.
    assert list(compiled) == list(eager) and compiled.fingerprint == eager.fingerprint
    for name in eager:
        got, want = compiled[name], eager[name]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_covariances_to_takes_a_dtype_positionally():
    covs = ck.collect_cov(tiny_llama(), padded_batches(128, n_batches=1), progress=False)
    wide = covs.to(torch.float64)
    name = next(iter(covs))
    assert wide[name].dtype == torch.float64 and torch.equal(wide[name], covs[name].double())
    assert wide.groups == covs.groups


class _Loop(nn.Module):
    """A cell applied once per time step: how often it runs depends on the batch's length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.cell = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.inp(x)
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(x[:, t] + h))
        return h


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("steps", [(2, 6), (1, 3, 5), (2, 3, 5)])
def test_a_cell_looped_over_time_is_collected_whole(steps, early_stop):
    # Several calls per forward switch early stop off. One call in the first batch allows it: then a
    # later, longer loop must still be collected whole, not cut off at the first batch's count.
    model = _Loop().eval()
    batches = [torch.randn(4, t, 8) for t in steps]
    covs = ck.collect_cov(model, batches, progress=False, early_stop=early_stop)
    assert covs.token_counts["cell"] == 4 * sum(steps)
    seen = []
    hook = model.cell.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()) and None)
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    x = torch.cat(seen)
    assert rel(covs["cell"], x.T @ x / x.shape[0]) < 1e-6


def test_early_stop_skips_what_follows_the_last_target():
    # Targets in the first layer only: from the second batch on, the forward stops before layer 1.
    model = tiny_llama(layers=3)
    calls = []
    hook = model.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    batches = padded_batches(128, n_batches=3)
    covs = ck.collect_cov(model, batches, targets=["model.layers.0.*"], progress=False, early_stop=True)
    assert len(calls) == 1  # the first batch only
    ck.collect_cov(model, batches, targets=["model.layers.0.*"], progress=False)
    hook.remove()
    assert len(calls) == 1 + 3  # off by default: every batch runs to the head
    ref, _ = reference_covariances(model, batches, list(covs))
    assert all(rel(covs[n], ref[n]) < 1e-5 for n in covs)


def test_a_pooler_counts_one_row_per_sequence_without_a_warning():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    model = BertModel(cfg).eval()
    batches = padded_batches(64, n_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covs = ck.collect_cov(model, batches, progress=False)
    assert covs.token_counts["pooler.dense"] == sum(b["input_ids"].shape[0] for b in batches)
    assert covs.token_counts["encoder.layer.0.attention.self.query"] == sum(
        int(b["attention_mask"].sum()) for b in batches
    )


def test_all_rows_masked_is_an_error_naming_a_module():
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    for b in batches:
        b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    with pytest.raises(ValueError, match=r"no token was counted for module\(s\) \['model.layers.0"):
        ck.collect_cov(model, batches, progress=False)


@pytest.mark.parametrize("how", ["tuple", "ddp"])
def test_encoder_decoder_masks_through_tuples_and_wrappers(how, tmp_path):
    model = _t5()
    batches = _seq2seq_batches(model.config.vocab_size)
    want = ck.collect_cov(model, batches, progress=False)
    if how == "tuple":
        keys = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"]
        # T5's forward takes them in this order, decoder_input_ids being the fourth parameter.
        params = list(__import__("inspect").signature(model.forward).parameters)
        order = sorted(keys, key=params.index)
        loader, wrapped = [tuple(b[k] for k in order) for b in batches], model
    else:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
        loader, wrapped = batches, torch.nn.parallel.DistributedDataParallel(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = ck.collect_cov(wrapped, loader, progress=False, distributed=False)
    finally:
        if how == "ddp":
            torch.distributed.destroy_process_group()
    # Named as inside DDP's wrapper (its parameters carry "module."), as the plain model names them.
    assert list(got) == list(want)
    for name in want:
        assert rel(got[name], want[name]) < 1e-6, name


def test_a_module_that_ran_on_zero_rows_without_a_mask_is_no_error():
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.idle = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.inp(x)
            return h + self.idle(h[:0]).sum()  # an expert no token was routed to

    covs = ck.collect_cov(Routed(), [torch.randn(2, 5, 8)], progress=False)
    assert covs.token_counts["idle"] == 0 and covs.token_counts["inp"] == 10


def test_covariances_compare_by_content_and_pickle_without_their_cache(tmp_path):
    import pickle

    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    assert covs.sequences is None  # counted only for normalize="peft"
    covs.save(tmp_path / "c.safetensors")
    loaded = ck.Covariances.load(tmp_path / "c.safetensors")
    assert loaded == covs and not (loaded != covs)
    other = ck.collect_cov(model, padded_batches(128, n_batches=1, seed=3), progress=False)
    assert other != covs
    ck.allocate_ranks(model, covs, budget=0.5, rank=4)
    assert covs.spectrum_cache._values
    back = pickle.loads(pickle.dumps(covs))
    assert back == covs and not hasattr(back, "spectrum_cache")


class _SharedKey(nn.Module):
    """q and k also read a second tensor that v does not (DeBERTa-v3's share_att_key), or, with
    ``loop``, all three read a second hidden state (a layer applied twice, as ALBERT shares them)."""

    def __init__(self, loop=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.loop = loop

    def forward(self, x, rel):
        out = self.q(x) + self.k(x) + self.v(x)
        h = torch.tanh(out)
        if self.loop:
            return out + self.q(h) + self.k(h) + self.v(h)
        return out + self.k(rel).sum() + self.q(rel).sum()


@pytest.mark.parametrize("loop", [False, True], ids=["some_members", "all_members"])
def test_group_members_that_read_a_second_tensor_apart(loop):
    torch.manual_seed(0)
    model = _SharedKey(loop)
    batches = [{"x": torch.randn(2, 5, 8), "rel": torch.randn(4, 8)} for _ in range(3)]
    covs = ck.collect_cov(model, batches, progress=False, normalize="sum")
    xs = torch.cat([b["x"].reshape(-1, 8) for b in batches]).double()
    if loop:
        hs = torch.cat(
            [torch.tanh(model.q(b["x"]) + model.k(b["x"]) + model.v(b["x"])).reshape(-1, 8) for b in batches]
        )
        both = xs.T @ xs + hs.double().T @ hs.double()
        assert covs.groups == (("q", "k", "v"),)
        assert all(rel(covs[n], both) < 1e-6 for n in "qkv")
        return
    rels = torch.cat([b["rel"] for b in batches]).double()
    assert sorted(covs.groups) == [("q", "k"), ("v",)]
    assert rel(covs["v"], xs.T @ xs) < 1e-6
    assert rel(covs["q"], xs.T @ xs + rels.T @ rels) < 1e-6 and covs["k"] is covs["q"]
    assert covs.token_counts == {"q": 30 + 12, "k": 30 + 12, "v": 30}


def test_deberta_v3_relative_attention_collects_and_builds():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DebertaV2Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        relative_attention=True, share_att_key=True, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        max_relative_positions=-1, position_buckets=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DebertaV2ForMaskedLM(cfg).eval()
    batches = padded_batches(128, n_batches=2)
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the relative embeddings are no tokens: counted whole, and said
        covs = ck.collect_cov(model, batches, progress=False)
    layer = "deberta.encoder.layer.0.attention.self."
    assert covs.group_of(layer + "query_proj") == (layer + "query_proj", layer + "key_proj")
    assert covs.group_of(layer + "value_proj") == (layer + "value_proj",)
    ref, _ = reference_covariances(model, batches, [layer + "value_proj"])
    assert rel(covs[layer + "value_proj"], ref[layer + "value_proj"]) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck.build_corda(model, covs, rank=4)
    with torch.no_grad():
        for b, want in zip(batches, before):
            assert rel(model(**b).logits, want) < 1e-4


class _LoopWithTemporaries(nn.Module):
    """A block applied three times: q, k, v read h; q and k also read a temporary freed within the
    iteration, whose id the next tensors may take over."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.pos = nn.Parameter(torch.randn(4, 8))

    def forward(self, h):
        for i in range(3):
            a = self.q(h) + self.k(h) + self.v(h)
            t = self.pos * (i + 1.0)
            self.q(t)
            self.k(t)
            del t
            h = torch.tanh(a)
        return h


def test_a_freed_side_tensor_whose_id_returns_is_not_mistaken_for_the_new_one():
    torch.manual_seed(0)
    model = _LoopWithTemporaries()
    batches = [torch.randn(2, 5, 8) for _ in range(2)]
    covs = ck.collect_cov(model, batches, progress=False, normalize="sum")
    assert covs.token_counts == {"q": 84, "k": 84, "v": 60}
    hs, ts = [], [model.pos * (i + 1.0) for i in range(3)]
    for h in batches:
        for _ in range(3):
            hs.append(h.reshape(-1, 8))
            h = torch.tanh(model.q(h) + model.k(h) + model.v(h))
    hs = torch.cat(hs).double()
    ts = torch.cat(ts * 2).double()
    assert rel(covs["v"], hs.T @ hs) < 1e-6
    assert rel(covs["q"], hs.T @ hs + ts.T @ ts) < 1e-6


class _SharedKeyMasked(_SharedKey):
    def forward(self, x, rel, attention_mask=None):
        return super().forward(x, rel)


def test_after_a_split_only_the_members_that_read_unmasked_rows_are_named():
    # DeBERTa-v3's value projection reads only the tokens: it is masked, and not in the warning.
    torch.manual_seed(0)
    model = _SharedKeyMasked()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batches = [{"x": torch.randn(2, 5, 8), "rel": torch.randn(4, 8), "attention_mask": mask} for _ in range(2)]
    with pytest.warns(UserWarning, match="did not match the token layout") as caught:
        covs = ck.collect_cov(model, batches, progress=False, normalize="sum")
    said = " ".join(str(w.message) for w in caught if "did not match" in str(w.message))
    assert "'q'" in said and "'k'" in said and "'v'" not in said
    assert covs.token_counts == {"q": 16 + 8, "k": 16 + 8, "v": 16}


class _ExtraReadFirst(_SharedKey):
    def forward(self, x, rel):
        return self.q(x) + self.q(rel).sum() + self.k(x) + self.k(rel).sum() + self.v(x)


def test_an_extra_read_before_the_group_formed_is_a_clear_error():
    # q reads rel while it is still its group's only member, so rel is the group's before v joins:
    # that cannot be undone, and the error names the modules and the way out.
    model = _ExtraReadFirst()
    batches = [{"x": torch.randn(2, 5, 8), "rel": torch.randn(4, 8)}]
    with pytest.raises(
        RuntimeError, match=r"modules \['q', 'k', 'v'\] share an input tensor, but module 'v'.*targets="
    ):
        ck.collect_cov(model, batches, progress=False)
    assert set(ck.collect_cov(model, batches, progress=False, targets=["v"])) == {"v"}


class _ExtraRead(nn.Module):
    """q and k share h; from the second batch on, q alone reads one more tensor, made right after h is
    freed, so CPython usually hands it h's id (and, fresh, its version 0)."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.k, self.out = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.ids = []

    def forward(self, x, extra):
        h = self.norm(x)
        y = self.q(h) + self.k(h)
        ids = [id(h)]
        x2 = x * 2.0
        del h
        for _ in range(int(extra)):
            h2 = self.norm(x2)
            ids.append(id(h2))
            y = y + self.q(h2)
            del h2
        self.ids.append(ids)
        return self.out(y)


def test_an_extra_read_by_one_member_is_caught_even_when_it_reuses_the_shared_tensors_id():
    torch.manual_seed(0)
    model = _ExtraRead().eval()
    batches = [(torch.randn(2, 4, 8), torch.tensor(0)), (torch.randn(2, 4, 8), torch.tensor(1))]
    with pytest.raises(RuntimeError, match=r"module 'k' read other inputs than the rest, in batch 1"):
        ck.collect_cov(model, batches, progress=False)
    # The case this guards: the extra tensor got the freed shared tensor's id (not guaranteed by CPython,
    # so only reported; the error above is required either way).
    print("extra read reused the shared id:", model.ids[-1][0] == model.ids[-1][1])


class _InPlaceAndFlat(nn.Module):
    """l1 and l2 read one tensor object before and after an in-place update; fc reads a flattened
    view of the tokens, whose padding only the view's _base identifies."""

    def __init__(self):
        super().__init__()
        self.emb, self.l1, self.l2, self.fc = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) * 1.0
        a = self.l1(h)
        h += a
        return self.fc((self.l2(h) + 1.0).reshape(-1, 8))


def test_collection_inside_inference_mode_equals_no_grad():
    torch.manual_seed(0)
    model = _InPlaceAndFlat().eval()
    batches = padded_batches(50, n_batches=2)
    want = ck.collect_cov(model, batches, progress=False)
    with torch.inference_mode():
        inference_batches = [{k: v.clone() for k, v in b.items()} for b in batches]  # inference tensors too
        got = ck.collect_cov(model, inference_batches, progress=False)
    assert sorted(got.groups) == sorted(want.groups) and ("l1", "l2") not in got.groups
    assert (
        got.token_counts
        == want.token_counts
        == dict.fromkeys(want, sum(int(b["attention_mask"].sum()) for b in batches))
    )
    for name in want:
        assert torch.equal(got[name], want[name]), name


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # in place: impossible outside inference mode for a buffer made inside it
        return self.o(self.l(x))


def test_a_model_made_inside_inference_mode_is_collected_inside_it_with_a_warning():
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    want = ck.collect_cov(_Counting(), [x], progress=False)
    torch.manual_seed(0)
    with torch.inference_mode():
        model = _Counting()
        with pytest.warns(UserWarning, match=r"made under torch.inference_mode\(\), so collection stays in it"):
            got = ck.collect_cov(model, [x], progress=False)
    assert int(model.calls) == 1
    for name in want:
        assert torch.equal(got[name], want[name])
