import copy
import json
import re
import types
import warnings

import pytest
import torch
from conftest import requires_compilable_transformers
from tiny import padded_batches, rel, tiny_gpt2, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels._targets import weight_shape


def _logits(model, batches):
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("factory,vocab", [(tiny_llama, 128), (tiny_gpt2, 100)])
def test_outputs_unchanged_and_trainable_count_exact(factory, vocab, mode):
    model = factory()
    batches = padded_batches(vocab, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    shapes = {n: weight_shape(m) for n, m in model.named_modules() if n in covs}
    before = _logits(model, batches)
    ck.build_corda(model, covs, rank=4, mode=mode)
    after = _logits(model, batches)
    for a, b in zip(after, before):
        assert rel(a, b) < 1e-5
    layers = ck.corda_layers(model)
    assert set(layers) == set(covs)
    expected = sum(4 * (d_in + d_out) for d_out, d_in in shapes.values())
    assert ck.trainable_parameters(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)

    ck.merge_corda(model)
    assert not ck.corda_layers(model)
    merged = _logits(model, batches)
    for a, b in zip(merged, before):
        assert rel(a, b) < 1e-5
    if factory is tiny_gpt2:
        from transformers.pytorch_utils import Conv1D

        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    else:
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_ranks_override_alpha_and_training_step():
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    ranks = {"model.layers.0.mlp.down_proj": 9, "model.layers.1.self_attn.q_proj": 1}
    ck.build_corda(model, covs, rank=3, mode="ipm", ranks=ranks, alpha=6.0)
    layers = ck.corda_layers(model)
    assert layers["model.layers.0.mlp.down_proj"].rank == 9
    assert layers["model.layers.1.self_attn.q_proj"].rank == 1
    assert layers["model.layers.0.self_attn.k_proj"].rank == 3
    assert layers["model.layers.0.self_attn.k_proj"].scaling == pytest.approx(2.0)
    model.train()
    out = model(**batches[0], labels=batches[0]["input_ids"])
    out.loss.backward()
    for name, layer in layers.items():
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None, name
        assert layer.weight.grad is None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()


def test_from_linear_and_merge_roundtrip():
    lin = nn.Linear(20, 12)
    x = torch.randn(40, 20)
    cov = x.T @ x / 40
    layer = ck.CordaLinear.from_linear(lin, cov, 5, "kpm", alpha=10)
    assert layer.lora_A.shape == (5, 20) and layer.lora_B.shape == (12, 5)
    assert layer.scaling == 2.0
    assert rel(layer(x), lin(x)) < 1e-5
    back = layer.merge()
    assert type(back) is nn.Linear
    assert rel(back.weight, lin.weight) < 1e-6
    assert torch.equal(back.bias, lin.bias)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        ck.CordaLinear.from_linear(nn.Conv1d(3, 3, 1), cov, 2)


def _assert_untouched(model, state):
    assert not ck.corda_layers(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_inputs_leave_model_untouched():
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    state = _state(model)

    with pytest.raises(
        ValueError, match=r"rank 40 of module 'model.layers.0.self_attn.k_proj' exceeds .* = 32.*ranks="
    ):
        ck.build_corda(model, covs, rank=40)  # k_proj is 32 x 64
    _assert_untouched(model, state)

    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj'"):
        ck.build_corda(model, covs, rank=4, ranks={"model.layers.1.mlp.down_proj": 500})
    _assert_untouched(model, state)

    partial = {k: v for k, v in covs.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="no covariance for module 'model.layers.1.mlp"):
        ck.build_corda(model, partial, rank=4, targets=["re:.*_proj"])
    _assert_untouched(model, state)

    bad = dict(covs)
    bad["model.layers.0.mlp.down_proj"] = torch.eye(64)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj'"):
        ck.build_corda(model, bad, rank=4)
    _assert_untouched(model, state)

    # A decomposition failure late in the list still leaves nothing half-applied.
    late = dict(covs)
    late["model.layers.1.mlp.down_proj"] = torch.full((96, 96), float("nan"))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj'"):
        ck.build_corda(model, late, rank=4)
    _assert_untouched(model, state)

    with pytest.raises(ValueError, match="ranks names module"):
        ck.build_corda(model, covs, rank=4, ranks={"model.nope": 3})
    with pytest.raises(ValueError, match="mode"):
        ck.build_corda(model, covs, rank=4, mode="xyz")
    _assert_untouched(model, state)


def test_default_targets_leave_task_heads_out():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    model = BertForSequenceClassification(cfg).eval()  # classifier: 32 -> 2, outside model.bert
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    backbone = {"bert." + n for n, m in model.bert.named_modules() if isinstance(m, nn.Linear)}
    assert set(covs) == backbone and "bert.pooler.dense" in covs
    before = _logits(model, batches)
    ck.build_corda(model, covs, rank=4)  # would exceed the classifier's rank of 2
    assert type(model.classifier) is nn.Linear
    for a, b in zip(_logits(model, batches), before):
        assert rel(a, b) < 1e-5
    # Named explicitly, a head is a target like any other layer.
    assert set(ck.collect_cov(model, batches, targets=["classifier"], progress=False)) == {"classifier"}
    # A pretrained head layer (the MLM transform) stays a default target; only its decoder, the output
    # embeddings, is left out.
    from transformers import BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(**{**cfg.to_dict(), "num_labels": 32})).eval()  # num_labels = hidden
    names = set(ck.collect_cov(mlm, batches, progress=False))
    assert "cls.predictions.transform.dense" in names and "cls.predictions.decoder" not in names
    # A head's output layer is found by place, not by size: a QA span layer of 2 outputs whatever
    # num_labels says.
    from transformers import LlamaConfig, LlamaForQuestionAnswering

    lcfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_labels=3
    )
    qa = LlamaForQuestionAnswering(lcfg).eval()
    names = set(ck.collect_cov(qa, batches, progress=False))
    assert "qa_outputs" not in names and "transformer.layers.0.mlp.down_proj" in names


def test_covariances_from_another_model_are_rejected(tmp_path):
    small = tiny_llama()
    covs = ck.collect_cov(small, padded_batches(128, n_batches=1), progress=False)
    p = tmp_path / "c.safetensors"
    covs.save(p)
    loaded = ck.Covariances.load(p)
    other = tiny_llama(hidden=32, inter=48)
    state = _state(other)
    with pytest.raises(ValueError, match="another model"):
        ck.build_corda(other, loaded, rank=2)
    _assert_untouched(other, state)
    gpt = tiny_gpt2()
    with pytest.raises(ValueError, match="another model"):
        ck.build_corda(gpt, loaded, rank=2)


def test_covariances_from_other_weights_of_the_same_shapes_are_rejected(tmp_path):
    batches = padded_batches(128, n_batches=1)
    covs = ck.collect_cov(tiny_llama(seed=0), batches, progress=False)
    covs.save(tmp_path / "c.safetensors")
    loaded = ck.Covariances.load(tmp_path / "c.safetensors")
    assert loaded.signatures == covs.signatures and len(covs.signatures) == len(covs)

    other = tiny_llama(seed=1)  # same names and shapes, other weights
    state = _state(other)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' was collected on other weights"):
        ck.build_corda(other, loaded, rank=2)
    _assert_untouched(other, state)
    with pytest.raises(ValueError, match="other weights"):
        ck.allocate_ranks(other, loaded, budget=0.5, rank=2)
    loaded.signatures.clear()  # on purpose: the documented way to use them anyway
    ck.build_corda(other, loaded, rank=2)

    # The same weights in bf16, or rebuilt after a merge, are the same model.
    same = tiny_llama(seed=0).to(torch.bfloat16)
    ck.build_corda(same, covs.to(torch.float32), rank=2)
    merged = tiny_llama(seed=0)
    ck.merge_corda(ck.build_corda(merged, covs, rank=2))
    ck.build_corda(merged, covs, rank=2)


def _nan_signatures(text):
    return json.dumps({k: [float("nan"), v[1]] for k, v in json.loads(text).items()})


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t, m: m.update(normalize="bogus"), "normalize='bogus'"),
        (lambda t, m: m.update(token_counts="[-5, 3, 3, 3, 3, 3, 3, 3]"), "token counts"),
        (lambda t, m: m.update(token_counts="[1.5, 3, 3, 3, 3, 3, 3, 3]"), "token counts"),
        (lambda t, m: m.update(format="corda_kernels.covariances/2"), "format 'corda_kernels.covariances/2'"),
        (lambda t, m: t.update(extra=torch.zeros(2)), "tensors for"),
        (lambda t, m: t.update({"group.0": t["group.0"].to(torch.int32)}), "torch.int32"),
        (lambda t, m: t.update({"group.0": t["group.0"] + torch.triu(torch.ones_like(t["group.0"]))}), "symmetric"),
        (lambda t, m: t["group.1"].__setitem__((0, 0), float("nan")), "non-finite"),
        # Signatures that would switch the other-model check off: NaN compares unequal to nothing.
        (lambda t, m: m.update(signatures=_nan_signatures(m["signatures"])), "signature of"),
        (lambda t, m: m.update(signatures="[]"), "signatures must be a JSON object"),
        (lambda t, m: m.update(signatures="null"), "signatures must be a JSON object"),
    ],
)
def test_a_tampered_covariance_file_is_refused(tmp_path, tamper, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    covs = ck.collect_cov(tiny_llama(), padded_batches(128, n_batches=1), progress=False)
    path = tmp_path / "c.safetensors"
    covs.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tamper(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{re.escape(message)}"):
        ck.Covariances.load(path)


def test_half_precision_covariances_round_trip(tmp_path):
    covs = ck.collect_cov(tiny_llama(), padded_batches(128, n_batches=1), progress=False)
    for dtype in (torch.float16, torch.bfloat16):
        covs.to(dtype).save(tmp_path / "c.safetensors")
        back = ck.Covariances.load(tmp_path / "c.safetensors")
        assert all(torch.equal(back[n], covs[n].to(dtype)) for n in covs)


def test_unsupported_dtype_named():
    model = nn.Sequential(nn.Linear(8, 8))
    covs = ck.collect_cov(model, [torch.randn(10, 8)], progress=False)
    model[0].weight.data = model[0].weight.data.to(torch.float8_e4m3fn)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="weight of module '0' has dtype torch.float8_e4m3fn"):
        ck.build_corda(model, covs, rank=2)
    assert torch.equal(model[0].weight.float(), state["0.weight"].float())


def test_build_twice_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    covs = ck.collect_cov(model, [torch.randn(10, 8)], progress=False)
    ck.build_corda(model, covs, rank=2)
    with pytest.raises(ValueError, match="already a CordaLinear"):
        ck.build_corda(model, covs, rank=2)


def test_bf16_model_outputs_unchanged_to_bf16_rounding():
    model = tiny_llama().to(torch.bfloat16)
    batches = padded_batches(128, n_batches=1)
    covs = ck.collect_cov(model, batches, progress=False)
    ref = model.float()
    before = _logits(copy.deepcopy(ref), batches)
    model = ref.to(torch.bfloat16)
    ck.build_corda(model, covs, rank=4)
    layer = ck.corda_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    after = _logits(model.float(), batches)
    assert rel(after[0], before[0]) < 5e-2


def test_float64_model_collects_builds_and_runs():
    # A float64 model goes through the torch paths end to end (the Triton kernels are 16/32-bit).
    model = tiny_llama().double()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False, accum_dtype=torch.float64)
    before = _logits(copy.deepcopy(model), batches)
    ck.build_corda(model, covs, rank=4, compute_dtype=torch.float64)
    layer = ck.corda_layers(model)["model.layers.0.mlp.down_proj"]
    assert layer.weight.dtype == torch.float64 and layer.lora_A.dtype == torch.float64
    after = _logits(model, batches)
    assert all(rel(a, b) < 1e-10 for a, b in zip(after, before))
    model.float()  # and a built model moved between dtypes keeps running
    assert torch.isfinite(_logits(model, batches)[0]).all()


def test_zero_singular_values_in_the_adapter_are_warned_about():
    # A rank-deficient weight: KPM's smallest components are exact zeros, whose factors start dead.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[8:] = 0
    covs = ck.collect_cov(model, [torch.randn(64, 16)], progress=False)
    with pytest.warns(UserWarning, match=r"'1': 4 of 4\) have a singular value of W·C_d of zero"):
        ck.build_corda(copy.deepcopy(model), covs, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.build_corda(model, covs, rank=4, mode="ipm")  # the top components are alive: no warning


class _Experts(nn.Module):
    """An MoE layer whose router sends every token to expert 0: experts 1 and 2 run on no row."""

    def __init__(self, d=12):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        h = self.inp(x)
        return self.experts[0](h) + sum(e(h[:0]).sum() for e in self.experts[1:])


def test_zero_covariances_are_all_named_before_any_decomposition(monkeypatch):
    torch.manual_seed(0)
    model = _Experts()
    covs = ck.collect_cov(model, [torch.randn(20, 12)], progress=False)  # no mask: zero rows is no error here
    assert covs.token_counts["experts.1"] == 0
    state = _state(model)
    import corda_kernels.rewrite as rewrite

    def never(*a, **k):
        raise AssertionError("decomposed before the check")

    monkeypatch.setattr(rewrite, "selected_spectrum", never)
    with pytest.raises(ValueError, match=r"2 module\(s\) is zero .*\['experts.1', 'experts.2'\].*targets="):
        ck.build_corda(model, covs, rank=2)
    assert not ck.corda_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    monkeypatch.undo()
    ck.build_corda(model, covs, rank=2, targets=["inp", "experts.0"])
    assert set(ck.corda_layers(model)) == {"inp", "experts.0"}


def test_spectra_from_another_damping_are_refused_and_raised_damping_is_warned():
    from corda_kernels.decompose import compute_spectrum, damp_covariance

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    covs = ck.collect_cov(model, [torch.randn(64, 16)], progress=False)
    other = compute_spectrum(model[0].weight.detach(), damp_covariance(covs["0"], 1.0))
    with pytest.raises(ValueError, match=r"spectra\['0'\] .* damping 1 .* damping 0.01"):
        ck.build_corda(copy.deepcopy(model), covs, rank=2, spectra={"0": other})
    same = compute_spectrum(model[0].weight.detach(), damp_covariance(covs["0"], 0.01))
    ck.build_corda(copy.deepcopy(model), covs, rank=2, spectra={"0": same})

    # 4 tokens for 16 features: singular C; from damping 0 it must be raised, and the user told.
    few = ck.collect_cov(model, [torch.randn(4, 16)], progress=False)
    with pytest.warns(UserWarning, match=r"damping of 1 layer\(s\) was raised above 0 .*'0': 1e-06"):
        ck.build_corda(copy.deepcopy(model), few, rank=2, damping=0.0, mode="ipm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.build_corda(model, few, rank=2, mode="ipm")  # the default damping needs no raise


def test_a_tied_output_layer_stays_untied_through_tie_weights(tmp_path):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    batches = padded_batches(100, n_batches=2)
    before = _logits(model, batches)
    covs = ck.collect_cov(model, batches, targets=["lm_head"], progress=False)
    with pytest.warns(UserWarning, match=r"'lm_head' with 'transformer.wte.weight'.*tie_word_embeddings was set"):
        ck.build_corda(model, covs, rank=4)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # also what resize_token_embeddings calls
    model.resize_token_embeddings(100)
    for a, b in zip(_logits(model, batches), before):
        assert rel(a, b) < 1e-5
    ck.save_pretrained(model, tmp_path / "out")
    from corda_kernels.export import load_pretrained

    for a, b in zip(_logits(load_pretrained(tmp_path / "out"), batches), before):
        assert rel(a, b) < 1e-5


def test_a_tied_head_is_refused_where_the_forward_reads_the_tie_flag():
    # SwitchTransformers rescales the decoder output only while config.tie_word_embeddings is set:
    # untying there would change the outputs, so the head is refused and nothing is touched.
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, expert_capacity=64, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=2, router_jitter_noise=0.0,
    )  # fmt: skip
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    assert model.lm_head.weight is model.shared.weight
    batches = padded_batches(100, n_batches=1)
    for b in batches:
        b["decoder_input_ids"] = b["input_ids"][:, :6]
        b["decoder_attention_mask"] = torch.ones_like(b["decoder_input_ids"])
    before = _logits(model, batches)
    covs = ck.collect_cov(model, batches, targets=["lm_head", "q"], progress=False)
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight.*SwitchTransformersForConditionalGeneration"):
        ck.build_corda(model, covs, rank=4)
    assert not ck.corda_layers(model) and model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.shared.weight
    ck.build_corda(model, covs, rank=4, targets=["q"])  # the other targets alone are fine
    for a, b in zip(_logits(model, batches), before):
        assert rel(a, b) < 1e-5


def test_from_factors_owns_its_adapters_and_checks_their_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    dec = ck.context_svd(lin.weight.detach(), torch.eye(8), 2)
    layer = ck.CordaLinear.from_factors(lin, dec.residual, dec.A, dec.B)
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    assert not torch.equal(layer.lora_A, dec.A)  # an optimizer step must not write into the caller's factors
    with pytest.raises(ValueError, match="A is torch.float64 on cpu but the residual is torch.float32"):
        ck.CordaLinear.from_factors(lin, dec.residual, dec.A.double(), dec.B)
    layer.alpha = 4.0
    assert layer.scaling == 2.0  # derived, never stale


class _Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module in two slots: both are swapped, nothing is untied

    def forward(self, x):
        return self.b(self.a(x))


def test_one_module_in_two_slots_is_no_tie():
    torch.manual_seed(0)
    model = _Alias()
    x = torch.randn(16, 8)
    ref = model(x).detach()
    covs = ck.collect_cov(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.build_corda(model, covs, rank=2)
    assert isinstance(model.a, ck.CordaLinear) and model.a is model.b
    assert rel(model(x).detach(), ref) < 1e-5


class _SharedNotEmbedding(nn.Module):
    """Two targets share one Parameter (an encoder-decoder tie); the word-embedding tie is not a target."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(tie_word_embeddings=True)
        self.emb = nn.Embedding(10, 16)
        self.enc, self.dec = nn.Linear(16, 16), nn.Linear(16, 16)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        return self.head(self.dec(self.enc(self.emb(ids))))


def test_a_shared_weight_that_is_no_embedding_tie_leaves_the_config_alone():
    torch.manual_seed(0)
    model = _SharedNotEmbedding()
    ids = torch.randint(0, 10, (4, 8))
    ref = model(ids).detach()
    covs = ck.collect_cov(model, [ids], targets=["enc", "dec"], progress=False)
    with pytest.warns(UserWarning, match="no longer shared") as caught:
        ck.build_corda(model, covs, rank=4)
    assert "tie_word_embeddings" not in str(caught[0].message)
    assert model.config.tie_word_embeddings is True and model.head.weight is model.emb.weight
    assert rel(model(ids).detach(), ref) < 1e-5


class _SkippingExperts(_Experts):
    """transformers 4's Mixtral: an expert no token was routed to is not called at all."""

    def forward(self, x):
        return self.experts[0](self.inp(x))


def test_targets_that_never_ran_are_collected_as_zero_and_named_at_build():
    torch.manual_seed(0)
    model = _SkippingExperts()
    with pytest.warns(UserWarning, match=r"2 target module\(s\) never ran .*'experts.1', 'experts.2'.*targets="):
        covs = ck.collect_cov(model, [torch.randn(20, 12)], progress=False)
    assert covs.token_counts["experts.1"] == 0 and not covs["experts.2"].any()
    with pytest.raises(ValueError, match=r"2 module\(s\) is zero .*\['experts.1', 'experts.2'\]"):
        ck.build_corda(model, covs, rank=2)
    ck.build_corda(model, covs, rank=2, targets=["inp", "experts.0"])
    with pytest.raises(ValueError, match="no target module was called"):
        ck.collect_cov(_SkippingExperts(), [torch.randn(20, 12)], targets=["experts.1"], progress=False)


def test_a_non_finite_weight_gets_no_signature_and_its_file_loads(tmp_path):
    # NaN and inf pass any tolerance test, so such a signature would check nothing; a file holding one
    # would also be refused on load, though collect_cov wrote it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    covs = ck.collect_cov(model, [torch.randn(6, 8)], progress=False)
    assert set(covs.signatures) == {"0"}
    covs.save(tmp_path / "c.safetensors")
    loaded = ck.Covariances.load(tmp_path / "c.safetensors")
    assert loaded == covs and loaded.signatures == covs.signatures


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_build_and_merge_free_each_replaced_weight_as_they_go(make, monkeypatch):
    # Swapping all layers at the end (or merging all before swapping) holds a second copy of every
    # target weight at once: +12 GiB on a 7B bf16 model. Before the k-th swap, k-1 of the replaced
    # weights must already be gone.
    import weakref

    from corda_kernels import rewrite

    model = make()
    b = padded_batches(model.config.vocab_size, n_batches=1)
    covs = ck.collect_cov(model, b, progress=False)
    with torch.no_grad():
        want = model(**b[0]).logits
    refs = [weakref.ref(model.get_submodule(n).weight) for n in covs]
    alive = []
    real = rewrite.swap_modules

    def counting(*args):
        alive.append(sum(r() is not None for r in refs))
        real(*args)

    monkeypatch.setattr(rewrite, "swap_modules", counting)
    ck.build_corda(model, covs, rank=2)
    assert alive == list(range(len(refs), 0, -1))
    with torch.no_grad():
        torch.testing.assert_close(model(**b[0]).logits, want, rtol=1e-5, atol=1e-5)

    refs[:] = [weakref.ref(m.weight) for m in ck.corda_layers(model).values()]
    alive.clear()
    ck.merge_corda(model)
    assert alive == list(range(len(refs), 0, -1))
    assert not ck.corda_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**b[0]).logits, want, rtol=1e-5, atol=1e-5)
    # merge builds on the meta device and keeps no meta tensor
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_target_inside_another_target_is_refused_before_any_swap():
    # Replacing the outer layer would silently drop the inner one; swapping one layer at a time it
    # would also fail half-way. Refused while checking, naming both.
    class Outer(nn.Linear):  # nn.Linear's own forward, and a child layer
        def __init__(self):
            super().__init__(8, 8)
            self.inner = nn.Linear(8, 8)

    class Chained(Outer):  # a forward of its own that runs the child: not a target at all
        def forward(self, x):
            return super().forward(self.inner(x))

    model = nn.Sequential(Outer(), nn.Linear(8, 2))
    covs = {n: torch.eye(8) for n in ("0", "0.inner")}
    with pytest.raises(ValueError, match=r"target '0.inner' lies inside target '0'"):
        ck.build_corda(model, covs, rank=2, targets=["0", "0.inner"])
    assert not ck.corda_layers(model)
    ck.build_corda(model, covs, rank=2, targets=["0.inner"])  # either one alone is fine
    assert set(ck.corda_layers(model)) == {"0.inner"}
    chained = nn.Sequential(Chained(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'0' is a Chained, a Linear subclass whose own forward is not"):
        ck.build_corda(chained, covs, rank=2, targets=["0", "0.inner"])
    assert not ck.corda_layers(chained)


def test_rank_error_pickles_and_copies():
    import copy
    import pickle

    from corda_kernels.decompose import RankTooLarge

    e = RankTooLarge(9, "model.x", (4, 6))
    for back in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
        assert isinstance(back, ValueError) and str(back) == str(e)
        assert (back.rank, back.name, back.limit) == (9, "model.x", 4)


@requires_compilable_transformers
def test_a_compiled_model_is_built_and_merged_under_the_plain_names():
    # torch.compile's wrapper prefixes every name with "_orig_mod.": covariances collected on the plain
    # model must build the compiled one (and the reverse), and the wrapper comes back, still compiled.
    torch._dynamo.reset()
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    before = _logits(model, batches)
    compiled = torch.compile(model, backend="eager")
    assert ck.build_corda(compiled, covs, rank=4) is compiled
    layers = ck.corda_layers(compiled)
    assert set(layers) == set(covs) and set(ck.corda_layers(model)) == set(covs)
    for a, b in zip(_logits(compiled, batches), before):
        assert rel(a, b) < 1e-5
    assert ck.merge_corda(compiled) is compiled and not ck.corda_layers(model)
    for a, b in zip(_logits(compiled, batches), before):
        assert rel(a, b) < 1e-5


def test_a_ddp_wrapped_model_is_refused_untouched(tmp_path):
    # DDP's reducer keeps the parameters it was built with: adapters swapped in afterwards would train
    # unsynchronized on every rank. build_corda says to build first, before anything is changed.
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False)
    state = _state(model)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        for outer in (wrapped, torch.compile(wrapped, backend="eager")):
            with pytest.raises(ValueError, match="DistributedDataParallel.*Build the plain model, then wrap"):
                ck.build_corda(outer, covs, rank=2)
    finally:
        torch.distributed.destroy_process_group()
    assert not ck.corda_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_data_parallel_model_is_built_under_the_plain_names():
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    before = _logits(model, batches)
    wrapped = nn.DataParallel(model)  # without GPUs its forward is the module's own
    assert ck.build_corda(wrapped, covs, rank=2) is wrapped and set(ck.corda_layers(wrapped)) == set(covs)
    for a, b in zip(_logits(model, batches), before):
        assert rel(a, b) < 1e-5


def test_covariances_named_through_a_wrapper_prefix_get_a_pointed_error():
    # Until 2026-11-29, collect_cov kept torch.compile's "_orig_mod." in the names it collected.
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=1), progress=False, targets=["re:.*q_proj"])
    old = {f"_orig_mod.{n}": c for n, c in covs.items()}
    with pytest.raises(ValueError, match="_orig_mod.*wrapper's prefix.*collect the covariances again"):
        ck.build_corda(model, old, rank=2)


def test_offloaded_weights_are_refused_by_name_before_any_swap():
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=1), progress=False)
    model.model.layers[1].to("meta")  # what accelerate's disk offload leaves in the module tree
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj' is on the meta device \(offloaded"):
        ck.build_corda(model, covs, rank=2)
    assert not ck.corda_layers(model)
