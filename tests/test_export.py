"""PEFT interop: save_pretrained (residual + adapter), to_lora (rank 2r on the original), from_peft, atomic writes."""

import json
import os
import warnings

import pytest
import torch
from tiny import padded_batches, rel, tiny_gpt2, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels import export

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def _corda(make, mixed=True):
    model = make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batches = padded_batches(model.config.vocab_size, n_batches=2, seq=10)
    covs = ck.collect_cov(model, batches, progress=False)
    names = list(covs)
    ranks = {n: (2 if i % 3 == 0 else 4) for i, n in enumerate(names)} if mixed else None
    alpha = {n: (8.0 if i % 2 else 4.0) for i, n in enumerate(names)} if mixed else None
    ck.build_corda(model, covs, rank=4, ranks=ranks, alpha=alpha)
    return model, original, batches


def _train(model, batches, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        loss = model(**b, labels=b["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _peft_logits(out_dir, batch):
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "residual"))
    return _logits(PeftModel.from_pretrained(base, os.path.join(out_dir, "adapter")).eval(), batch)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_save_pretrained_loads_in_peft_before_and_after_training(make, tmp_path):
    model, _, batches = _corda(make)
    b = batches[0]
    out = tmp_path / "export"
    keys = sorted(model.state_dict())
    ref = _logits(model, b)
    export.save_pretrained(model, out)
    # The user's model is untouched: still CordaLinear, same parameters, same function.
    assert sorted(model.state_dict()) == keys
    assert len(ck.corda_layers(model)) > 0
    torch.testing.assert_close(_logits(model, b), ref, rtol=0, atol=0)

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    layers = ck.corda_layers(model)
    assert cfg["fan_in_fan_out"] == (make is tiny_gpt2)
    assert {n: cfg["rank_pattern"].get(n, cfg["r"]) for n in cfg["target_modules"]} == {
        n: m.rank for n, m in layers.items()
    }
    assert {n: cfg["alpha_pattern"].get(n, cfg["lora_alpha"]) for n in cfg["target_modules"]} == {
        n: m.alpha for n, m in layers.items()
    }
    torch.testing.assert_close(_peft_logits(out, b), ref, rtol=1e-5, atol=1e-5)

    _train(model, batches)
    trained = _logits(model, b)
    assert (trained - ref).abs().max() > 1e-3  # the adapters really moved
    export.save_pretrained(model, out)  # replaces the earlier export
    torch.testing.assert_close(_peft_logits(out, b), trained, rtol=1e-5, atol=1e-5)

    back = export.load_pretrained(out)
    torch.testing.assert_close(_logits(back, b), trained, rtol=1e-6, atol=1e-6)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_to_lora_serves_on_the_original_model(make, tmp_path):
    model, original, batches = _corda(make)
    _train(model, batches)
    b = batches[1]
    want = _logits(model, b)
    adapter = export.to_lora(model, original, tmp_path / "lora")
    layers = ck.corda_layers(model)
    for name, layer in layers.items():
        A = adapter.state_dict[f"base_model.model.{name}.lora_A.weight"]
        assert A.shape == (2 * layer.rank, layer.in_features)
    base = make()  # same seed: the unmodified original weights
    got = _logits(PeftModel.from_pretrained(base, tmp_path / "lora").eval(), b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # Applied by hand to the original weights, the adapter is W + s·B·A with the doubled alpha.
    cfg = adapter.config
    name = next(iter(layers))
    a = adapter.state_dict[f"base_model.model.{name}.lora_A.weight"]
    bb = adapter.state_dict[f"base_model.model.{name}.lora_B.weight"]
    r = cfg["rank_pattern"].get(name, cfg["r"])
    alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
    assert alpha / r == layers[name].scaling
    w0 = original[f"{name}.weight"]
    w0 = w0.t() if layers[name].base_type == "conv1d" else w0
    torch.testing.assert_close(w0 + alpha / r * bb @ a, layers[name].merged_weight(), rtol=1e-4, atol=1e-5)


def test_to_lora_converts_a_layer_whose_initial_adapter_is_exactly_zero(tmp_path):
    # KPM on a weight with pruned rows: the smallest components are exactly zero, the residual is W
    # bit for bit, and the original is still the right one to serve the LoRA on.
    def pruned():
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[:8].zero_()
        return model

    model, original, batches = _corda(pruned, mixed=False)
    layer = model.model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight, original["model.layers.0.mlp.down_proj.weight"])
    _train(model, batches)
    want = _logits(model, batches[1])
    export.to_lora(model, original, tmp_path / "lora")
    got = _logits(PeftModel.from_pretrained(pruned(), tmp_path / "lora").eval(), batches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The residuals alone (no adapter keys) equal "the original" in every layer: refused.
    residuals = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    with pytest.raises(ValueError, match="equals the residual in every layer"):
        export.to_lora(model, residuals)


def test_to_lora_rejects_the_wrong_original():
    model, _, _ = _corda(tiny_llama, mixed=False)
    other = tiny_llama(seed=1).state_dict()
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        export.to_lora(model, other)
    with pytest.raises(KeyError, match="no weight for module"):
        export.to_lora(model, {})


@pytest.mark.parametrize("rslora", [False, True])
def test_from_peft_gives_corda_layers_with_equal_outputs(rslora):
    base = tiny_llama()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.mlp.down_proj": 2},
        init_lora_weights=False,  # random A and B: the adapter changes the outputs
        use_rslora=rslora,
    )
    pm = get_peft_model(base, cfg).eval()
    b = padded_batches(base.config.vocab_size, n_batches=1)[0]
    want = _logits(pm, b)
    model = export.from_peft(pm)
    layers = ck.corda_layers(model)
    assert len(layers) == 6 and layers["model.layers.1.mlp.down_proj"].rank == 2
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    torch.testing.assert_close(_logits(model, b), want, rtol=1e-6, atol=1e-6)
    assert all(p.requires_grad for m in layers.values() for p in (m.lora_A, m.lora_B))
    assert not any(m.weight.requires_grad for m in layers.values())


def test_from_peft_conv1d_and_dora_error():
    base = tiny_gpt2()
    pm = get_peft_model(base, LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    b = padded_batches(base.config.vocab_size, n_batches=1)[0]
    want = _logits(pm.eval(), b)
    model = export.from_peft(pm.base_model)  # a LoraModel works as well as the PeftModel
    assert {m.base_type for m in ck.corda_layers(model).values()} == {"conv1d"}
    torch.testing.assert_close(_logits(model, b), want, rtol=1e-6, atol=1e-6)

    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="q_proj.*DoRA"):
        export.from_peft(dora)
    with pytest.raises(TypeError, match="PeftModel or LoraModel"):
        export.from_peft(tiny_llama())


def test_from_peft_refuses_embedding_and_conv_loras_and_changes_nothing():
    b = padded_batches(128, n_batches=1)[0]
    emb = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="embed_tokens.*embedding LoRA"):
        export.from_peft(emb)  # the adapter would silently vanish, changing the outputs

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.conv = nn.Linear(4, 4), nn.Conv2d(2, 2, 1)

        def forward(self, x, img):
            return self.proj(x), self.conv(img)

    net = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj", "conv"], init_lora_weights=False))
    x, img = torch.randn(3, 4), torch.randn(1, 2, 3, 3)
    want = net(x, img)
    with pytest.raises(TypeError, match="'conv'.*Conv2d"):
        export.from_peft(net)
    # Nothing was swapped before the error: the PEFT model is whole and gives the same outputs.
    from peft.tuners.lora import LoraLayer

    assert isinstance(net.base_model.model.proj, LoraLayer)
    for got, ref in zip(net(x, img), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert _logits(emb, b).isfinite().all()


def test_writes_are_atomic(tmp_path, monkeypatch):
    model, _, batches = _corda(tiny_llama, mixed=False)
    out = tmp_path / "export"

    def boom(self, directory):
        # Fail after the residual model is fully written: the half-made export must vanish.
        assert os.path.exists(os.path.join(os.path.dirname(directory), "residual", "config.json"))
        raise OSError("disk full")

    monkeypatch.setattr(export.LoraAdapter, "_write", boom)
    with pytest.raises(OSError, match="disk full"):
        export.save_pretrained(model, out)
    assert os.listdir(tmp_path) == []  # no out_dir, no temporary left behind

    monkeypatch.undo()
    export.save_pretrained(model, out)
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(export.LoraAdapter, "_write", boom)
    with pytest.raises(OSError):
        export.save_pretrained(model, out)
    assert sorted(p.name for p in out.rglob("*")) == before  # the earlier export is intact
    assert sorted(os.listdir(tmp_path)) == ["export"]
    monkeypatch.undo()

    # A directory that is not an earlier export is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        export.save_pretrained(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no CordaLinear"):
        export.save_pretrained(tiny_llama(), tmp_path / "plain")


def test_load_pretrained_names_what_is_missing_or_does_not_fit(tmp_path):
    import shutil

    model, _, _ = _corda(tiny_llama, mixed=False)
    export.save_pretrained(model, tmp_path / "good")
    marker = json.loads((tmp_path / "good" / export.MARKER).read_text())
    name = next(iter(marker["layers"]))

    def copy(tag):
        shutil.copytree(tmp_path / "good", tmp_path / tag)
        return tmp_path / tag

    d = copy("no_config")
    (d / "residual" / "config.json").unlink()  # from_pretrained would build a default 7B Llama
    with pytest.raises(FileNotFoundError, match=r"incomplete: .*residual.config\.json is missing"):
        export.load_pretrained(d)
    d = copy("no_adapter")
    (d / "adapter" / export.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        export.load_pretrained(d)
    d = copy("bad_json")
    (d / export.MARKER).write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt"):
        export.load_pretrained(d)
    d = copy("rank")
    bad = dict(marker, layers={**marker["layers"], name: {**marker["layers"][name], "rank": 2}})
    (d / export.MARKER).write_text(json.dumps(bad))  # tensors of rank 4 under a marker of rank 2
    with pytest.raises(ValueError, match=f"layer '{name}' of rank 2"):
        export.load_pretrained(d)
    assert ck.corda_layers(export.load_pretrained(tmp_path / "good"))[name].rank == 4


@pytest.mark.parametrize("alpha", [0.25, 64.0])
def test_to_lora_accepts_any_scaling(alpha, tmp_path):
    # The rank check must not scale the residual's rounding by 1/scaling (alpha 0.25 at rank 16
    # used to be refused as "not a rank-16 matrix").
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=2), progress=False)
    ck.build_corda(model, covs, rank=16, alpha=alpha, mode="ipm")
    b = padded_batches(model.config.vocab_size, n_batches=1, seed=3)[0]
    want = _logits(model, b)
    export.to_lora(model, original, tmp_path / "lora")
    got = _logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval(), b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "build_dtype, export_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),  # built in fp32, upcast before export
        (torch.bfloat16, torch.float32),  # built in bf16 (its rounding stays in the residual), upcast
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["f64", "f32-then-f64", "bf16-then-f32", "bf16"],
)
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_to_lora_in_any_dtype_and_after_a_cast(build_dtype, export_dtype, mode):
    # The rank check measures the remainder directly (float64 cancellation in |delta|² − Σs² was ~1e-8,
    # refused against float64's rounding) and against the rounding the residual was built with.
    model = tiny_llama().to(build_dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=2), progress=False)
    ck.build_corda(model, covs, rank=4, mode=mode)
    model.to(export_dtype)
    adapter = export.to_lora(model, original)
    layers = ck.corda_layers(model)
    for name, layer in layers.items():
        a = adapter.state_dict[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter.state_dict[f"base_model.model.{name}.lora_B.weight"].double()
        w0 = original[f"{name}.weight"].double()
        want = layer.merged_weight().double()
        tol = 8 * torch.finfo(build_dtype).eps
        assert rel(w0 + layer.scaling * b @ a, want) < tol, name
    # The check still refuses another model's weights in every dtype.
    other = {k: v.to(export_dtype) for k, v in tiny_llama(seed=1).state_dict().items()}
    with pytest.raises(ValueError, match="not a rank-4 matrix"):
        export.to_lora(model, other)


def test_load_pretrained_uses_the_saved_model_class(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    model = BertForMaskedLM(cfg).eval()
    batches = padded_batches(cfg.vocab_size, n_batches=2)
    ck.build_corda(model, ck.collect_cov(model, batches, progress=False), rank=4)
    want = _logits(model, batches[0])
    export.save_pretrained(model, tmp_path / "bert")
    back = export.load_pretrained(tmp_path / "bert")  # not a causal LM: no model_class needed
    assert type(back) is BertForMaskedLM
    torch.testing.assert_close(_logits(back, batches[0]), want, rtol=1e-6, atol=1e-6)


def test_from_peft_casts_fp32_adapters_over_a_bf16_base():
    # PEFT keeps adapters in fp32 over a 16-bit base; the converted model must run, and match.
    base = tiny_llama().to(torch.bfloat16)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    b = padded_batches(base.config.vocab_size, n_batches=1)[0]
    want = _logits(pm, b)
    model = export.from_peft(pm)
    layer = ck.corda_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert rel(_logits(model, b).float(), want.float()) < 2e-2


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_exports_of_a_wrapped_model_use_the_inner_names(tmp_path, wrap):
    model, original, batches = _corda(tiny_llama)
    want = _logits(model, batches[0])
    if wrap == "compile":
        wrapped = torch.compile(model)  # nothing compiles unless it is called
    else:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
        try:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        except Exception:
            torch.distributed.destroy_process_group()
            raise
    try:
        export.save_pretrained(wrapped, tmp_path / "out")
        adapter = export.to_lora(wrapped, original, tmp_path / "lora")
    finally:
        if wrap == "ddp":
            torch.distributed.destroy_process_group()
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter.state_dict)
    back = export.load_pretrained(tmp_path / "out")
    assert type(back).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(back, batches[0]), want, rtol=1e-6, atol=1e-6)
    got = _logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval(), batches[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_from_peft_of_a_tied_head_unties_it_and_every_route_keeps_the_outputs(tmp_path):
    # PEFT's LoRA on lm_head over tied embeddings: the head gets its own weight and the config drops the
    # tie, so that save/reload (the residual must hold lm_head) and merge + tie_weights() keep the outputs.
    batch = padded_batches(100, n_batches=1)[0]
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
    with torch.no_grad():
        ref = pm.eval()(**batch).logits
    with pytest.warns(UserWarning, match="'lm_head' with 'transformer.wte.weight'.*tie_word_embeddings"):
        model = ck.from_peft(pm).eval()
    assert model.config.tie_word_embeddings is False
    ck.save_pretrained(model, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "residual"),
                                         tmp_path / "out" / "adapter").eval()  # fmt: skip
    merged = ck.merge_corda(export.load_pretrained(tmp_path / "out")).eval()
    merged.tie_weights()
    with torch.no_grad():
        for got in (model(**batch).logits, reloaded(**batch).logits, merged(**batch).logits):
            assert rel(got, ref) < 1e-5


def test_an_export_peft_would_rewrite_on_load_is_warned_about(tmp_path):
    # PEFT converts v4 MoE target names for transformers 5, dense MLPs included: their adapters would be
    # dropped by PeftModel.from_pretrained. A plain Llama export is not affected.
    import transformers

    conversion = pytest.importorskip("peft.utils.transformers_weight_conversion")
    if not hasattr(transformers, "Qwen3MoeConfig") or not hasattr(conversion, "convert_peft_config_for_transformers"):
        pytest.skip("needs transformers' Qwen3-MoE and PEFT's v5 conversion")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
        mlp_only_layers=[0], max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ck.build_corda(model, ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False), rank=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.save_pretrained(model, tmp_path / "moe")
    rewrites = [str(w.message) for w in caught if "PEFT will rewrite" in str(w.message)]
    if not rewrites:  # this PEFT/transformers pair does not convert qwen3_moe: then nothing is dropped either
        assert "qwen3_moe" not in getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}) or not hasattr(
            transformers, "conversion_mapping"
        )
    else:
        assert "model.layers.0.mlp.gate_proj" in rewrites[0] and "load_pretrained" in rewrites[0]

    plain = tiny_llama()
    ck.build_corda(plain, ck.collect_cov(plain, padded_batches(128, n_batches=1), progress=False), rank=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.save_pretrained(plain, tmp_path / "plain")
    assert not [w for w in caught if "PEFT will rewrite" in str(w.message)]


def test_a_raw_trainer_checkpoint_loads_into_the_same_conversion(tmp_path):
    # What Trainer.save_model / checkpoints write is the model's own save_pretrained (README recipe).
    from safetensors.torch import load_file

    b = padded_batches(128, n_batches=1)[0]
    model = tiny_llama()
    covs = ck.collect_cov(model, [b], progress=False)
    ck.build_corda(model, covs, rank=4)
    with torch.no_grad():
        for layer in ck.corda_layers(model).values():
            layer.lora_B.add_(0.01)  # "trained"
    model.save_pretrained(tmp_path / "checkpoint-2")
    fresh = ck.build_corda(tiny_llama(), covs, rank=4)
    fresh.load_state_dict(load_file(tmp_path / "checkpoint-2" / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, model(**b).logits)


def test_load_pretrained_keeps_fp32_adapters_over_a_bf16_base_when_asked(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    b = padded_batches(model.config.vocab_size, n_batches=2)
    ck.build_corda(model, ck.collect_cov(model, b, progress=False), rank=4)
    layers = ck.corda_layers(model)
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():  # fp32 adapters trained under autocast hold values bf16 cannot
        layer.lora_A = nn.Parameter(layer.lora_A.float() + 1e-3 * torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B = nn.Parameter(layer.lora_B.float() + 1e-3 * torch.randn(layer.lora_B.shape, generator=g))
    export.save_pretrained(model, tmp_path / "e")
    # dtype= explicitly: transformers 4 loads in fp32 by default, 5 in the checkpoint's dtype.
    with pytest.warns(UserWarning, match=r"14 layers .* saved in torch.float32 .* adapter_dtype='widest'"):
        rounded = export.load_pretrained(tmp_path / "e", dtype=torch.bfloat16)
    kept = export.load_pretrained(tmp_path / "e", adapter_dtype="widest", dtype=torch.bfloat16)
    as_f16 = export.load_pretrained(tmp_path / "e", adapter_dtype=torch.float16, dtype=torch.bfloat16)
    for name, layer in layers.items():
        r, k, h = (ck.corda_layers(m)[name] for m in (rounded, kept, as_f16))
        assert r.lora_A.dtype == torch.bfloat16 and not torch.equal(r.lora_A.float(), layer.lora_A)
        assert k.lora_A.dtype == k.lora_B.dtype == torch.float32 and k.weight.dtype == torch.bfloat16
        assert torch.equal(k.lora_A, layer.lora_A) and torch.equal(k.lora_B, layer.lora_B)
        assert k.lora_A.requires_grad and not k.weight.requires_grad
        assert h.lora_B.dtype == torch.float16
        torch.testing.assert_close(k.merged_weight(), layer.merged_weight(), rtol=0, atol=0)
    # Runs as it was trained: under autocast, with gradients for the fp32 adapters.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept(**b[0], labels=b[0]["input_ids"]).loss.backward()
    assert all(
        m.lora_A.grad is not None and m.lora_A.grad.dtype == torch.float32 for m in ck.corda_layers(kept).values()
    )
    # float64 adapters over a 16-bit base stop at float32 with "widest": autocast runs fp32 operands, not fp64.
    assert export._adapter_dtype("widest", torch.float64, torch.bfloat16) == torch.float32
    assert export._adapter_dtype("widest", torch.float64, torch.float64) == torch.float64
    assert export._adapter_dtype("widest", torch.bfloat16, torch.float32) == torch.float32
    assert export._adapter_dtype(None, torch.float32, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="adapter_dtype"):
        export.load_pretrained(tmp_path / "e", adapter_dtype=torch.int8)
    with pytest.raises(ValueError, match="adapter_dtype"):
        export.load_pretrained(tmp_path / "e", adapter_dtype="float32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_to_lora_refuses_an_original_a_few_percent_off(dtype):
    # The rank check's tolerance is the residual's rounding, with a margin, not 16 ulps of |W|: in bf16
    # that let an original 10% off per element through as "the model it was built from".
    model = tiny_llama().to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=2), progress=False)
    ck.build_corda(model, covs, rank=4)
    export.to_lora(model, original)  # the real one converts
    g = torch.Generator().manual_seed(1)
    off = {k: (v.float() * (1 + 0.05 * torch.randn(v.shape, generator=g))).to(dtype) for k, v in original.items()}
    with pytest.raises(ValueError, match="not a rank-4 matrix"):
        export.to_lora(model, off)


def test_per_layer_dropout_survives_our_export_and_peft_gets_the_largest(tmp_path):
    model, _, _ = _corda(tiny_llama, mixed=False)
    layers = ck.corda_layers(model)
    first = next(iter(layers))
    layers[first].dropout = 0.1
    with pytest.warns(UserWarning, match=r"dropouts differ \(\[0.0, 0.1\]\).*takes 0.1 for every layer"):
        export.save_pretrained(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.1
    back = ck.corda_layers(export.load_pretrained(tmp_path / "out"))
    assert {n: m.dropout for n, m in back.items()} == {n: m.dropout for n, m in layers.items()}


def test_an_export_through_a_link_replaces_what_the_link_points_to(tmp_path):
    model, _, batches = _corda(tiny_llama, mixed=False)
    export.save_pretrained(model, tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    _train(model, batches)
    export.save_pretrained(model, tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and os.readlink(tmp_path / "link") == str(tmp_path / "real")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temporary left behind
    torch.testing.assert_close(
        _logits(export.load_pretrained(tmp_path / "real"), batches[0]), _logits(model, batches[0])
    )
