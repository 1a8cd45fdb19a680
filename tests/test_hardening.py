"""Misuse that used to destroy data, pass silently or fail without naming its argument: exports over their
source, corrupt covariance files, owner-only modes of atomic writes, to_lora on the residual state dict,
unknown names in alpha, arguments of the wrong kind."""

import copy
import json
import os
import stat

import pytest
import torch
from tiny import padded_batches, rel, tiny_gpt2, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels import cli, export
from corda_kernels._io import current_umask

pytest.importorskip("peft")


def _corda(make=tiny_llama):
    model = make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=2, seq=10), progress=False)
    ck.build_corda(model, covs, rank=4)
    return model, original, covs


@pytest.fixture
def exported(tmp_path):
    """An export at tmp/src built from the original model saved at tmp/base."""
    model, _, _ = _corda()
    tiny_llama().save_pretrained(tmp_path / "base")
    export.save_pretrained(model, tmp_path / "src")
    return tmp_path / "src", tmp_path / "base"


def _listing(d):
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*"))


def _kind(d):
    return json.loads((d / export.MARKER).read_text())["kind"]


# ---------------------------------------------------------------------- 1. export over its own source
@pytest.mark.parametrize("how", ["merged", "base"])
@pytest.mark.parametrize("where", ["same", "symlink", "dotdot", "inside"])
def test_cli_export_refuses_to_write_over_its_source(exported, capsys, how, where):
    src, base = exported
    before = _listing(src)
    out = {
        "same": src,
        "symlink": src.parent / "link",
        "dotdot": src / "residual" / ".." / ".." / src.name,
        "inside": src / "lora",
    }[where]
    if where == "symlink":
        out.symlink_to(src, target_is_directory=True)
    mode = ["--merged"] if how == "merged" else ["--base", str(base)]
    rc = cli.main(["export", str(src), "-o", str(out), *mode])
    err = capsys.readouterr().err
    assert rc == 1
    assert str(src) in err and str(out) in err and "Traceback" not in err
    assert _listing(src) == before and _kind(src) == "corda"  # the source export is intact


def test_cli_export_refuses_an_output_that_holds_the_source(tmp_path, capsys):
    model, _, _ = _corda()
    export.save_pretrained(model, tmp_path / "outer")  # an earlier export: atomic_dir would replace it
    export.save_pretrained(model, tmp_path / "outer" / "src")
    rc = cli.main(["export", str(tmp_path / "outer" / "src"), "-o", str(tmp_path / "outer"), "--merged"])
    assert rc == 1
    assert "contains the source" in capsys.readouterr().err
    assert _kind(tmp_path / "outer" / "src") == "corda"


def test_python_api_refuses_to_replace_the_export_a_model_was_loaded_from(exported):
    src, base = exported
    before = _listing(src)
    model = export.load_pretrained(src)
    original = tiny_llama().state_dict()
    with pytest.raises(ValueError, match=r"output directory .*src.* the source directory .*src"):
        export.to_lora(model, original, src)
    with pytest.raises(ValueError, match="would replace or change the source"):
        export.save_pretrained(model, src)
    assert _listing(src) == before and _kind(src) == "corda"
    # Anywhere else is fine.
    export.to_lora(model, original, src.parent / "lora")
    export.save_pretrained(model, src.parent / "copy")
    assert _kind(src.parent / "copy") == "corda"


# ---------------------------------------------------------------------- 2. corrupt covariance files
@pytest.mark.parametrize("damage", ["header", "half", "text", "empty"])
def test_corrupt_covariance_file_is_a_clear_value_error(tmp_path, capsys, damage):
    _, _, covs = _corda()
    good = tmp_path / "covs.safetensors"
    covs.save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        {"header": data[:4], "half": data[: len(data) // 2], "text": b"not a covariance file\n"}.get(damage, b"")
    )
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt or not a corda_kernels covariance file"):
        ck.Covariances.load(bad)
    with pytest.raises(FileNotFoundError):
        ck.Covariances.load(tmp_path / "missing.safetensors")

    rc = cli.main(["build", str(tmp_path), str(bad), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(bad) in err and "corrupt" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 3. atomic writes and the umask
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["022", "027"])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    model, original, covs = _corda()
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        covs.save(tmp_path / "covs.safetensors")
        export.save_pretrained(model, tmp_path / "export")
        export.save_pretrained(model, tmp_path / "export")  # replacing an earlier export
        export.to_lora(model, original, tmp_path / "lora")
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "covs.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "export") == 0o777 & ~mask
    assert mode(tmp_path / "lora") == 0o777 & ~mask
    assert mode(tmp_path / "export" / export.MARKER) == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["covs.safetensors", "export", "lora"]  # no temporary left behind

    # Replacing a file keeps its mode: a private covariance file stays private.
    os.chmod(tmp_path / "covs.safetensors", 0o600)
    covs.save(tmp_path / "covs.safetensors")
    assert mode(tmp_path / "covs.safetensors") == 0o600
    # Through a symlink, the file it points to is replaced and the link stays.
    os.symlink(tmp_path / "covs.safetensors", tmp_path / "link.safetensors")
    covs.save(tmp_path / "link.safetensors")
    assert os.path.islink(tmp_path / "link.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["covs.safetensors", "export", "link.safetensors", "lora"]


def test_plot_ranks_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = ck.plot_ranks({"model.layers.0.q_proj": 4, "model.layers.1.q_proj": 2}, tmp_path / "ranks.png")
    good = open(path, "rb").read()

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        ck.plot_ranks({"model.layers.0.q_proj": 8}, tmp_path / "ranks.png")
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["ranks.png"]


# ---------------------------------------------------------------------- 4. to_lora on the residual state dict
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_to_lora_rejects_the_corda_models_own_state_dict(make):
    model, original, _ = _corda(make)
    first = next(iter(ck.corda_layers(model)))
    with pytest.raises(ValueError, match=rf"module '{first}'.*own state dict"):
        export.to_lora(model, model.state_dict())
    adapter = export.to_lora(model, original)  # the real original still converts
    a0 = adapter.state_dict[f"{export.PEFT_PREFIX}{first}.lora_A.weight"][4:]
    assert a0.abs().max() > 0


# ---------------------------------------------------------------------- 5. unknown names in an alpha dict
def test_alpha_dict_with_an_unknown_module_is_rejected():
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    alpha = {n: 8.0 for n in covs}
    alpha["model.layers.0.self_attn.q_prj"] = 8.0  # a typo: would silently keep alpha = rank
    with pytest.raises(ValueError, match=r"alpha names module\(s\) \['model.layers.0.self_attn.q_prj'\]"):
        ck.build_corda(model, covs, rank=4, alpha=alpha)
    assert not ck.corda_layers(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    del alpha["model.layers.0.self_attn.q_prj"]
    ck.build_corda(model, covs, rank=4, alpha=alpha)
    assert {m.alpha for m in ck.corda_layers(model).values()} == {8.0}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_token_file_is_a_one_line_cli_error(tmp_path, capsys, suffix):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    capsys.readouterr()  # drop transformers' own progress output
    bad = tmp_path / f"tokens{suffix}"
    bad.write_bytes(b"\x00\x01 not tokens")
    rc = cli.main(["collect", str(tmp_path / "model"), str(bad), "-o", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "could not be read" in err and str(bad) in err
    assert not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------------- 6. arguments of the wrong kind name themselves
@pytest.fixture(scope="module")
def collected():
    model = tiny_llama()
    return model, ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": "x"}, TypeError, "alpha for module .* must be a number, got 'x'"),
        ({"alpha": {"model.layers.0.self_attn.q_proj": "x"}}, TypeError, "alpha for module .* got 'x'"),
        ({"alpha": float("inf")}, ValueError, "alpha for module .* finite"),
        ({"damping": float("inf")}, ValueError, "damping must be a finite number >= 0, got inf"),
        ({"damping": -1.0}, ValueError, "damping must be a finite number >= 0"),
        ({"damping": "0.01"}, ValueError, "damping must be a finite number >= 0, got '0.01'"),
        ({"targets": 123}, TypeError, "targets must be a list of names, globs or 're:' patterns"),
        ({"targets": [1, 2]}, TypeError, r"targets entries must be strings, got \[1, 2\]"),
        ({"targets": ["re:("]}, ValueError, r"targets pattern 're:\(' is not a valid regular expression"),
    ],
)
def test_build_arguments_of_the_wrong_kind_are_named_and_change_nothing(collected, kwargs, error, message):
    model, covs = collected
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        ck.build_corda(model, covs, rank=4, **kwargs)
    assert not ck.corda_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_numpy_numbers_are_numbers(collected):
    np = pytest.importorskip("numpy")
    model, covs = collected
    model = copy.deepcopy(model)
    ck.build_corda(model, covs, rank=4, alpha=np.float32(8), damping=np.float64(0.02))
    assert {m.alpha for m in ck.corda_layers(model).values()} == {8.0}


def test_damping_is_checked_before_any_forward():
    model, pulled = tiny_llama(), []

    def loader():
        for b in padded_batches(128, n_batches=4):
            pulled.append(1)
            yield b

    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        ck.collect_cov(model, loader(), progress=False, candidates=2, max_batches=4, damping=-1.0)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        ck.allocate_ranks(model, ck.collect_cov(model, padded_batches(128, 1), progress=False), 10**4, damping=-1.0)
    assert not pulled


def test_collect_names_a_bad_device_and_a_mask_of_another_shape():
    model = tiny_llama()
    with pytest.raises(ValueError, match="device='nodevice' is not a torch device"):
        ck.collect_cov(model, padded_batches(128, 1), progress=False, device="nodevice")
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


class _CausalMasked(nn.Module):
    """Takes a (seq, seq) attention mask, not a padding mask: legitimate, and not (batch, seq)."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return self.proj(torch.tril(attention_mask.float()) @ h)


def test_a_mask_of_another_shape_than_the_ids_is_not_read_as_padding():
    # A (seq, seq) causal mask (or a batch built wrong) does not say which tokens are padding: every
    # position counts, and the warning gives both shapes.
    causal = _CausalMasked()
    ids = torch.randint(0, 20, (3, 6))
    with pytest.warns(UserWarning, match=r"attention_mask has shape \(6, 6\) but input_ids \(3, 6\)"):
        covs = ck.collect_cov(causal, [(ids, torch.ones(6, 6))], progress=False, normalize="sum")
    assert covs.token_counts == {"proj": 18}
    x = (torch.tril(torch.ones(6, 6)) @ causal.emb(ids)).reshape(-1, 8).double()
    assert rel(covs["proj"], x.T @ x) < 1e-6


def test_a_converted_model_says_so_when_it_has_no_targets_left():
    model = tiny_llama()
    batches = padded_batches(128, 1)
    covs = ck.collect_cov(model, batches, progress=False)
    ck.build_corda(model, covs, rank=4)
    for call in (
        lambda: ck.collect_cov(model, batches, progress=False),
        lambda: ck.collect_cov(model, batches, progress=False, targets=["q_proj"]),
        lambda: ck.build_corda(model, covs, rank=4, targets=["q_proj"]),
    ):
        with pytest.raises(ValueError, match="build_corda already converted 14 of its layers to CordaLinear"):
            call()
    with pytest.raises(ValueError, match=r"already a CordaLinear \(build_corda ran on this model\)"):
        ck.build_corda(model, covs, rank=4)


@pytest.mark.parametrize(
    "flag, message", [("--device", "--device 'nodevice'"), ("--dtype", "--dtype 'float8_e4m3fn': one of")]
)
def test_cli_device_and_dtype_are_named(tmp_path, capsys, flag, message):
    tiny_llama().save_pretrained(tmp_path / "model")
    torch.save({"input_ids": torch.randint(3, 20, (2, 9))}, tmp_path / "t.pt")
    value = "nodevice" if flag == "--device" else "float8_e4m3fn"
    capsys.readouterr()
    rc = cli.main(["collect", str(tmp_path / "model"), str(tmp_path / "t.pt"), "-o", str(tmp_path / "c"), flag, value])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
