"""The command line, end to end on a tiny local model + tokenizer (built offline, nothing downloaded)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama

import corda_kernels as ck
from corda_kernels import cli

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "low rank adapters are small and fast",
    "the model reads the text",
    "covariance of the inputs of every layer",
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = tiny_llama()
    model.save_pretrained(d / "model")
    _tokenizer().save_pretrained(d / "model")
    (d / "data.txt").write_text("\n".join(TEXTS[:3]) + "\n\n")
    (d / "data.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[3:])))
    g = torch.Generator().manual_seed(0)
    torch.save({"input_ids": torch.randint(3, 20, (2, 9), generator=g)}, d / "tokens.pt")
    return d


def _run(args, cwd, console_script=False):
    exe = [str(Path(sys.executable).with_name("corda-kernels"))] if console_script else [sys.executable, "-m"]
    cmd = exe + ([] if console_script else ["corda_kernels"]) + [str(a) for a in args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


def test_collect_build_export_end_to_end(workdir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = workdir
    data = [d / "data.txt", d / "data.jsonl", d / "tokens.pt"]
    r = _run(["collect", d / "model", *data, "-o", d / "covs.safetensors", "--batch-size", "2"], d)
    assert "tok/s" in r.stderr  # the token progress bar with a rate

    # The file holds what collect_cov gives on the same batches, and every word counted once.
    covs = ck.Covariances.load(d / "covs.safetensors")
    words = sum(len(t.split()) for t in TEXTS) + 2 * 9
    assert covs.tokens == words
    model = tiny_llama()
    args = cli.build_parser().parse_args(["collect", str(d / "model"), "x", "-o", "y", "--batch-size", "2"])
    batches = cli.load_batches([str(p) for p in data], args, str(d / "model"))
    assert len(batches) == 3 + 1  # 5 texts + 2 token rows, 2 a batch
    ref = ck.collect_cov(model, batches, progress=False)
    for name in ref:
        torch.testing.assert_close(covs[name], ref[name], rtol=1e-6, atol=1e-7)

    exe_ok = Path(sys.executable).with_name("corda-kernels").exists()
    r = _run(
        ["build", d / "model", d / "covs.safetensors", "-o", d / "out", "--rank", "4", "--mode", "ipm"],
        d,
        console_script=exe_ok,
    )
    assert "layer/s" in r.stderr  # the decomposition progress bar
    assert sorted(os.listdir(d / "out")) == ["adapter", "corda_export.json", "residual"]
    assert (d / "out" / "residual" / "tokenizer.json").exists()
    cfg = json.loads((d / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"

    ids = batches[0]
    with torch.no_grad():
        base = model(**ids).logits
    ck.build_corda(model, ref, rank=4, mode="ipm")
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(d / "out" / "residual"), d / "out" / "adapter"
    )
    with torch.no_grad():
        got = peft.eval()(**ids).logits
        ours = model(**ids).logits
    torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, base, rtol=1e-3, atol=1e-4)  # building does not change the function

    assert cli.main(["export", str(d / "out"), "-o", str(d / "lora"), "--base", str(d / "model")]) == 0
    original = AutoModelForCausalLM.from_pretrained(d / "model")
    lora = PeftModel.from_pretrained(original, d / "lora").eval()
    assert json.loads((d / "lora" / "adapter_config.json").read_text())["r"] == 8
    with torch.no_grad():
        torch.testing.assert_close(lora(**ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_cordapp_and_merged_export_in_process(workdir, tmp_path, capsys):
    d = workdir
    rc = cli.main(
        ["collect", str(d / "model"), str(d / "data.txt"), str(d / "data.jsonl"), "-o", str(tmp_path / "c.safetensors")]
        + ["--batch-size", "1", "--candidates", "2", "--no-progress"]
    )
    assert rc == 0
    assert "chosen" in capsys.readouterr().err
    covs = ck.Covariances.load(tmp_path / "c.safetensors")
    assert covs.meta.get("candidates") == "2"

    rc = cli.main(
        ["build", str(d / "model"), str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "pp"), "--cordapp"]
        + ["--budget", "0.5", "--rank", "4", "--no-progress", "--report", str(tmp_path / "report.png")]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "report.png").stat().st_size > 10_000
    cfg = json.loads((tmp_path / "pp" / "adapter" / "adapter_config.json").read_text())
    ranks = {n: cfg["rank_pattern"].get(n, cfg["r"]) for n in cfg["target_modules"]}
    assert len(set(ranks.values())) > 1  # an allocation, not a uniform rank
    assert cfg["rank_pattern"]
    # Without the kept vectors the build computes the components itself: the same adapter.
    rc = cli.main(
        ["build", str(d / "model"), str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "lean"), "--cordapp"]
        + ["--budget", "0.5", "--rank", "4", "--no-progress", "--no-keep-spectra"]
    )
    assert rc == 0, capsys.readouterr().err
    lean_cfg = json.loads((tmp_path / "lean" / "adapter" / "adapter_config.json").read_text())
    assert {**lean_cfg, "base_model_name_or_path": None} == {**cfg, "base_model_name_or_path": None}
    lean, kept = (load_file(tmp_path / p / "adapter" / "adapter_model.safetensors") for p in ("lean", "pp"))
    assert lean.keys() == kept.keys()
    for k in kept:  # one product B·A per layer; each factor's sign is the solver's to pick
        torch.testing.assert_close(lean[k].abs(), kept[k].abs(), rtol=1e-3, atol=1e-5)

    # Merged export: one plain transformers model equal to the CorDA model.
    rc = cli.main(["export", str(tmp_path / "pp"), "-o", str(tmp_path / "merged"), "--merged"])
    assert rc == 0
    from transformers import AutoModelForCausalLM

    from corda_kernels.export import load_pretrained

    corda = load_pretrained(tmp_path / "pp")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not ck.corda_layers(merged)
    ids = torch.randint(3, 20, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, corda(ids).logits, rtol=1e-4, atol=1e-5)


def test_cordapp_scoring_options_and_targets_reach_the_api(workdir, tmp_path, capsys):
    d, covs_path = workdir, tmp_path / "c.safetensors"
    rc = cli.main(
        ["collect", str(d / "model"), str(d / "data.txt"), "-o", str(covs_path), "--batch-size", "1"]
        + ["--candidates", "2", "--sum-over", "adapter", "--rank", "2", "--mode", "ipm", "--pi-from", "wc"]
        + ["--group-score", "max", "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    rule = json.loads(ck.Covariances.load(covs_path).meta["selection"])
    assert (rule["sum_over"], rule["rank"], rule["mode"], rule["pi_from"], rule["group_score"]) == (
        "adapter",
        2,
        "ipm",
        "wc",
        "max",
    )
    # --targets restricts the CorDA++ allocation as it restricts the build.
    rc = cli.main(
        ["build", str(d / "model"), str(covs_path), "-o", str(tmp_path / "pp"), "--cordapp", "--budget", "0.5"]
        + ["--rank", "4", "--targets", "*q_proj", "*v_proj", "--pi-normalize", "none", "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "pp" / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] and all(n.endswith(("q_proj", "v_proj")) for n in cfg["target_modules"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "{m}", "{m}/c.safetensors", "-o", "{t}/o", "--budget", "100"], "--cordapp"),
        (["build", "{m}", "{t}/missing.safetensors", "-o", "{t}/o"], "does not exist"),
        (["collect", "{t}/nope", "{d}/data.txt", "-o", "{t}/c"], "not a local directory"),
        (["collect", "{m}", "{t}/bad.jsonl", "-o", "{t}/c"], "field 'text'"),
        (["collect", "{m}", "{d}/data.csv", "-o", "{t}/c"], "does not exist"),
        (["export", "{m}", "-o", "{t}/e", "--merged"], "not a corda_kernels export"),
        (["export", "{m}", "-o", "{t}/e"], "export needs --base ORIGINAL_MODEL_DIR"),
        (["export", "{m}", "-o", "{t}/e", "--merged", "--base", "{m}"], "--merged writes one merged model"),
        (["export", "{m}", "-o", "{t}/e", "--base", "{t}/nope"], "--base '"),
        (["bench", "--bench-dir", "{t}"], "not found"),
        (["collect", "{m}", "{t}/oov.pt", "-o", "{t}/c"], "vocabulary has 128 entries"),
        (["collect", "{m}", "{t}/masked.pt", "-o", "{t}/c"], "no token was counted"),
        (["collect", "{m}", "{t}/halfmask.pt", "-o", "{t}/c"], "attention_mask must have input_ids' shape"),
        (["collect", "{m}", "{d}/data.txt", "-o", "{d}/data.txt"], "is one of the calibration files"),
        (["collect", "{m}", "{t}/missing.txt", "-o", "{d}/data.txt"], "not a corda_kernels covariance file"),
        (["collect", "{m}", "{d}/data.txt", "-o", "{t}"], "is a directory"),
        (["collect", "{m}", "{d}/data.txt", "-o", "{t}/c", "--targets", "re:("], "missing )"),
        (["collect", "{m}", "{d}/data.txt", "-o", "{t}/c", "--rank", "4"], "--rank: these score CorDA++ candidates"),
        (["build", "{m}", "{t}/c.safetensors", "-o", "{t}/keep"], "is not an earlier corda_kernels export"),
        (
            ["build", "{m}", "{t}/c.safetensors", "-o", "{t}/new", "--max-rank", "2", "--pi-from", "wc"],
            "--max-rank, --pi-from: these shape the CorDA++ rank allocation and apply only with --cordapp",
        ),
        (["export", "{m}", "-o", "{t}/keep", "--merged", "--no-progress"], "is not an earlier corda_kernels export"),
        (["collect", "{m}", "{d}/data.txt", "-o", "{t}/c", "--candidates", "2", "--mode", "ipm"], "--sum-over adapter"),
        (
            ["collect", "{m}", "{d}/data.txt", "-o", "{t}/c", "--candidates", "2", "--sum-over", "adapter"],
            "needs --rank",
        ),
        (["collect", "{m}", "{d}/data.txt", "-o", "{d}/data.txt/c.safetensors"], "data.txt' is not a directory"),
        (["build", "{m}", "{t}/c.safetensors", "-o", "{d}/data.txt/out"], "data.txt' is not a directory"),
        (["build", "{m}", "{t}/c.safetensors", "-o", "{t}/new", "--report", "{d}/data.txt/r.png"], "--report"),
        (["collect", "{m}", "{t}/latin1.txt", "-o", "{t}/c"], "latin1.txt: not UTF-8 text"),
        (["collect", "{t}/cut", "{d}/data.txt", "-o", "{t}/c"], "cut': a .safetensors file there is truncated"),
        # A link is written through: the folder that counts is its target's.
        (["collect", "{m}", "{d}/data.txt", "-o", "{t}/link.safetensors"], "data.txt' is not a directory"),
    ],
)
def test_errors_are_one_clear_line(workdir, tmp_path, capsys, argv, message):
    (tmp_path / "link.safetensors").symlink_to(workdir / "data.txt" / "c.safetensors")
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    shutil.copytree(workdir / "model", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    (tmp_path / "c.safetensors").write_bytes(b"")  # build's -o check comes before reading it
    torch.save({"input_ids": torch.tensor([[3, 5, 1000]])}, tmp_path / "oov.pt")
    torch.save({"input_ids": torch.tensor([[3, 5, 7]]), "attention_mask": torch.zeros(1, 3)}, tmp_path / "masked.pt")
    torch.save({"input_ids": torch.tensor([[3, 5, 7]]), "attention_mask": torch.ones(1, 2)}, tmp_path / "halfmask.pt")
    before = (workdir / "data.txt").read_bytes()
    fill = {"m": str(workdir / "model"), "d": str(workdir), "t": str(tmp_path)}
    rc = cli.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err and "Traceback" not in err
    assert (workdir / "data.txt").read_bytes() == before
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "command, flag",
    [("collect", f) for f in ("--max-batches", "--batch-size", "--max-length", "--candidates")]
    + [("build", f) for f in ("--min-rank", "--max-rank", "--multiple")],
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_usage_errors(workdir, capsys, command, flag, value):
    inputs = [str(workdir / "data.txt")] if command == "collect" else ["c.safetensors", "--cordapp"]
    with pytest.raises(SystemExit) as e:
        cli.main([command, str(workdir / "model"), *inputs, "-o", "c", flag, value])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_max_batches_stops_reading_and_samples_fit_the_model(workdir, tmp_path, monkeypatch, capsys):
    calls = []
    real = cli._load_tokenizer

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, text, **kw):
            calls.append(kw.get("max_length"))
            return self.tok(text, **kw)

    def counting(path):
        return Counting(real(path))

    monkeypatch.setattr(cli, "_load_tokenizer", counting)
    long = " ".join(TEXTS) * 20  # ~700 words, past the tiny model's 128 positions
    (tmp_path / "big.txt").write_text("\n".join([long] * 200) + "\n")
    argv = ["collect", str(workdir / "model"), "x", "-o", "y", "--batch-size", "2", "--max-batches", "3"]
    args = cli.build_parser().parse_args(argv)
    batches = cli.load_batches([str(tmp_path / "big.txt")], args, str(workdir / "model"), str(workdir / "model"))
    assert len(batches) == 3 and len(calls) == 6  # 200 lines in the file, 6 read
    assert set(calls) == {128} and all(b["input_ids"].shape[1] == 128 for b in batches)
    assert "position limit" in capsys.readouterr().err


def test_export_never_replaces_its_base_model(workdir, tmp_path, capsys):
    d = workdir
    assert cli.main(["collect", str(d / "model"), str(d / "data.txt"), "-o", str(tmp_path / "c.safetensors")]) == 0
    out = tmp_path / "built"
    assert cli.main(["build", str(d / "model"), str(tmp_path / "c.safetensors"), "-o", str(out), "--rank", "2"]) == 0
    merged = tmp_path / "merged"
    assert cli.main(["export", str(out), "-o", str(merged), "--merged"]) == 0
    # An earlier export may be replaced, but not when it is the --base the new LoRA is for.
    capsys.readouterr()
    rc = cli.main(["export", str(out), "-o", str(merged), "--base", str(merged)])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    assert (merged / "config.json").exists()
    # Inside the base is fine: nothing of it is replaced.
    assert cli.main(["export", str(out), "-o", str(merged / "lora"), "--base", str(merged)]) == 0
    assert (merged / "config.json").exists() and (merged / "lora" / "adapter_config.json").exists()


def test_outputs_never_replace_inputs_and_fail_before_writing(workdir, tmp_path, capsys):
    d, m = workdir, workdir / "model"
    weights = {p.name: p.read_bytes() for p in m.iterdir() if p.is_file()}
    for victim in ("model.safetensors", "tokenizer.json", "config.json"):
        rc = cli.main(["collect", str(m), str(d / "data.txt"), "-o", str(m / victim)])
        assert rc == 1 and "not a corda_kernels covariance file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in m.iterdir() if p.is_file()} == weights
    covs = tmp_path / "c.safetensors"
    assert cli.main(["collect", str(m), str(d / "data.txt"), "-o", str(covs)]) == 0
    assert cli.main(["collect", str(m), str(d / "data.jsonl"), "-o", str(covs)]) == 0  # an earlier one: replaced

    out = tmp_path / "out"
    assert cli.main(["build", str(m), str(covs), "-o", str(out), "--rank", "2"]) == 0
    inside = out / "covs.safetensors"
    inside.write_bytes(covs.read_bytes())
    capsys.readouterr()
    assert cli.main(["build", str(m), str(inside), "-o", str(out), "--rank", "2"]) == 1
    assert "holds the covariances file" in capsys.readouterr().err and inside.exists()

    # A report that cannot be drawn fails before anything is built or written.
    rc = cli.main(["build", str(m), str(covs), "-o", str(tmp_path / "new"), "--rank", "2", "--report", "r.xyz"])
    assert rc == 1 and "unknown image format 'xyz'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("part", ["residual/model.safetensors", "adapter/adapter_model.safetensors"])
def test_a_truncated_export_is_one_line_naming_it(workdir, tmp_path, capsys, part):
    d = workdir
    covs, out = tmp_path / "c.safetensors", tmp_path / "built"
    assert cli.main(["collect", str(d / "model"), str(d / "data.txt"), "-o", str(covs)]) == 0
    assert cli.main(["build", str(d / "model"), str(covs), "-o", str(out), "--rank", "2"]) == 0
    f = out / part
    assert f.exists()
    f.write_bytes(f.read_bytes()[:3000])
    capsys.readouterr()
    for extra in (["--merged"], ["--base", str(d / "model")]):
        assert cli.main(["export", str(out), "-o", str(tmp_path / "e"), *extra]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"source '{out}'" in err and "truncated or corrupt" in err
        assert not (tmp_path / "e").exists()


def test_build_refuses_covariances_of_other_weights_unless_told(workdir, tmp_path, capsys):
    from tiny import padded_batches

    covs = ck.collect_cov(tiny_llama(seed=1), padded_batches(128, n_batches=1), progress=False)
    covs.save(tmp_path / "other.safetensors")
    argv = [
        "build",
        str(workdir / "model"),
        str(tmp_path / "other.safetensors"),
        "-o",
        str(tmp_path / "o"),
        "--rank",
        "2",
    ]
    assert cli.main(argv) == 1 and "collected on other weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main([*argv, "--other-weights"]) == 0


def test_debug_after_the_command_and_max_batches_stops_before_a_bad_line(workdir, tmp_path, capsys):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"text": "the cat sat"}\n{"text": "a dog ran"}\nnot json\n')
    argv = ["collect", str(workdir / "model"), str(bad), "-o", str(tmp_path / "c.safetensors"), "--batch-size", "1"]
    assert cli.main([*argv, "--max-batches", "2", "--debug"]) == 0  # line 3 is never read
    assert cli.main(argv) == 1 and "mixed.jsonl:3: not valid JSON" in capsys.readouterr().err
    with pytest.raises(cli.CliError, match="not valid JSON"):
        cli.main([*argv, "--debug"])  # --debug after the command: the traceback is not swallowed


def test_build_rank_errors_speak_in_flags(workdir, tmp_path, capsys):
    d = workdir
    covs = tmp_path / "c.safetensors"
    assert cli.main(["collect", str(d / "model"), str(d / "data.txt"), "-o", str(covs)]) == 0
    capsys.readouterr()
    assert cli.main(["build", str(d / "model"), str(covs), "-o", str(tmp_path / "out"), "--rank", "1000"]) == 1
    err = capsys.readouterr().err
    assert "--rank 1000 exceeds min(d_out, d_in) = " in err and "of module 'model.layers.0." in err
    assert "--targets" in err and "ranks=" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # the allocation's and the candidate rounds' errors are said in flags too
    build = ["build", str(d / "model"), str(covs), "-o", str(tmp_path / "out"), "--cordapp", "--no-progress"]
    for extra, want in (
        (["--multiple", "1000"], "(--min-rank 1 rounded up to a multiple of 1000)"),
        (["--multiple", "1000"], "lower --min-rank/--multiple, or leave that module out (--targets)"),
        (["--budget", "2.5"], "give --budget an int for a number of parameters"),
    ):
        assert cli.main(build + extra) == 1
        err = capsys.readouterr().err
        assert want in err and "min_rank" not in err, err
    argv = ["collect", str(d / "model"), str(d / "data.txt"), "-o", str(tmp_path / "c2.safetensors")]
    assert cli.main([*argv, "--candidates", "1000", "--no-progress"]) == 1
    assert "--candidates 1000 needs at least 1000 batches" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_build_allocation_defaults_are_allocate_ranks_defaults():
    import inspect

    params = inspect.signature(ck.allocate_ranks).parameters
    assert cli._ALLOCATION_DEFAULTS == {k: params[k].default for k in cli._ALLOCATION_DEFAULTS}


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_collect", interrupted)
    assert cli.main(["collect", "m", "d.txt", "-o", "c"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_demo_and_bench_delegate(monkeypatch, tmp_path):
    import corda_kernels.demo as demo

    seen = {}

    def fake_main(argv=None):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", "--rank", "4", "--help"]) == 0
    assert seen["argv"] == ["--rank", "4", "--help"]

    # --debug after demo is the CLI's own flag, not passed on: the traceback comes through.
    def failing_main(argv=None):
        seen["argv"] = argv
        raise ValueError("boom")

    monkeypatch.setattr(demo, "main", failing_main)
    assert cli.main(["demo", "--rank", "4"]) == 1
    with pytest.raises(ValueError, match="boom"):
        cli.main(["demo", "--debug", "--rank", "4"])
    assert seen["argv"] == ["--rank", "4"]

    (tmp_path / "bench_ops.py").write_text("import sys\nopen(sys.argv[1], 'w').write('ran')\n")
    assert cli.main(["bench", "ops", "--bench-dir", str(tmp_path), str(tmp_path / "flag")]) == 0
    assert (tmp_path / "flag").read_text() == "ran"


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["build", "a", "b", "-o", "c", "--no-such-option"])
    assert e.value.code == 2


def test_torchrun_collect_and_build_match_one_process(workdir, tmp_path):
    # The README's `torchrun ... -m corda_kernels collect`: two gloo processes on the CPU, each reading
    # its shard of the batches, must write the covariances one process writes; `build` under torchrun
    # splits the decompositions and must write the same adapter.
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    from safetensors.torch import load_file

    d = workdir
    data = [d / "data.txt", d / "data.jsonl", d / "tokens.pt"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"

    def pp(i):
        return ["--cordapp", "--budget", "0.8", "--report", tmp_path / f"report{i}.png"]

    _run(["collect", d / "model", *data, "-o", one, "--batch-size", "2", "--no-progress"], d)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "corda_kernels"]
    for args in (
        ["collect", d / "model", *data, "-o", two, "--batch-size", "2", "--no-progress"],
        # CorDA++ allocation and the report: their spectrum work is split across the ranks too.
        ["build", d / "model", two, "-o", tmp_path / "out2", "--rank", "3", "--no-progress", *pp("2")],
    ):
        r = subprocess.run(cmd + [str(a) for a in args], cwd=d, env=env, capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = ck.Covariances.load(one), ck.Covariances.load(two)
    assert a.tokens == b.tokens and a.token_counts == b.token_counts
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)

    _run(["build", d / "model", two, "-o", tmp_path / "out1", "--rank", "3", "--no-progress", *pp("1")], d)
    assert (tmp_path / "report1.png").stat().st_size > 0 and (tmp_path / "report2.png").stat().st_size > 0
    cfg1, cfg2 = (json.loads((tmp_path / f"out{i}" / "adapter" / "adapter_config.json").read_text()) for i in (1, 2))
    assert cfg1["rank_pattern"] == cfg2["rank_pattern"] and len(set(cfg1["rank_pattern"].values())) > 1
    w1 = load_file(str(tmp_path / "out1" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "out2" / "adapter" / "adapter_model.safetensors"))
    assert set(w1) == set(w2) and w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "text,want", [("1e4", 10000), ("12000", 12000), ("0.5", 0.5), ("1.0", 1.0), ("2.5e-1", 0.25), (None, None)]
)
def test_budget_parsing(text, want):
    from corda_kernels.cli import _parse_budget

    got = _parse_budget(text)
    assert got == want and type(got) is type(want)


def test_demo_runs_both_parts_with_fewer_sequences_than_candidate_rounds(capsys):
    import corda_kernels.demo as demo

    # 16 sequences are two batches of 8: the CorDA++ part takes two candidate rounds, not four.
    assert demo.main(["--seqs", "16", "--hidden", "64", "--layers", "1", "--seq-len", "16", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("OK: outputs unchanged after build_corda") == 2 and "collect_cov (2 candidates)" in out
    with pytest.raises(SystemExit) as e:
        demo.main(["--seqs", "0"])
    assert e.value.code == 2 and "--seqs: must be >= 1, got 0" in capsys.readouterr().err
