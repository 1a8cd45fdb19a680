import pytest
import torch
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
    covs = ck.collect_cov(model, batches, progress=False)
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
