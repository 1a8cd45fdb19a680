"""What swapping modules must preserve besides the weights: train/eval mode (adapter dropout must
not run in an eval model), modules registered under two names, requires_grad after a merge, and
arguments checked before anything is swapped."""

import copy

import pytest
import torch
from tiny import padded_batches, reference_covariances, rel, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels import export
from corda_kernels._targets import find_targets


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _covs(model):
    return ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=2), progress=False)


def test_build_keeps_an_eval_model_in_eval_so_dropout_stays_off():
    model = tiny_llama()  # eval()
    batch = padded_batches(model.config.vocab_size, n_batches=1)[0]
    want = _logits(model, batch)
    ck.build_corda(model, _covs(model), rank=4, dropout=0.3)
    layers = ck.corda_layers(model)
    assert layers and not any(m.training for m in layers.values())
    first = _logits(model, batch)
    assert rel(first, want) < 1e-5
    assert torch.equal(first, _logits(model, batch))
    # The dropout is real: in training mode two forwards differ.
    model.train()
    assert all(m.training for m in layers.values())
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)


def test_from_linear_and_merge_keep_the_mode():
    lin = nn.Linear(12, 10).eval()
    layer = ck.CordaLinear.from_linear(lin, torch.eye(12), rank=3, dropout=0.5)
    assert not layer.training
    x = torch.randn(7, 12)
    assert rel(layer(x), lin(x)) < 1e-5
    assert not layer.merge().training
    assert layer.train().merge().training


@pytest.mark.parametrize("how", ["load_pretrained", "from_peft"])
def test_reloaded_and_converted_models_keep_eval_mode(tmp_path, how):
    pytest.importorskip("peft")
    model = tiny_llama()
    batch = padded_batches(model.config.vocab_size, n_batches=1)[0]
    if how == "load_pretrained":
        ck.build_corda(model, _covs(model), rank=4, dropout=0.3)
        want = _logits(model, batch)
        export.save_pretrained(model, tmp_path / "out")
        got_model = export.load_pretrained(tmp_path / "out")
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "down_proj"])
        pm = get_peft_model(model, cfg).eval()
        for m in pm.modules():  # nonzero B, so the adapter (and any dropout on it) shows in the logits
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                nn.init.normal_(m.lora_B["default"].weight, std=0.05)
        want = _logits(pm, batch)
        got_model = export.from_peft(pm)
    layers = ck.corda_layers(got_model)
    assert layers and not any(m.training for m in layers.values())
    assert any(m.dropout > 0 for m in layers.values())
    assert rel(_logits(got_model, batch), want) < 1e-5


class Aliased(nn.Module):
    """One Linear registered under two names, called from both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = self.a
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x))))


def test_a_module_registered_twice_is_replaced_in_both_places():
    model = Aliased()
    x = torch.randn(5, 16)
    want = model(x).detach()
    covs = ck.collect_cov(model, [torch.randn(4, 6, 16) for _ in range(2)], progress=False)
    assert covs.tokens > 0
    ck.build_corda(model, covs, rank=3)
    assert isinstance(model.a, ck.CordaLinear) and model.b is model.a
    assert rel(model(x), want) < 1e-5
    with torch.no_grad():
        model.a.lora_B.add_(0.1)  # "training": both call sites must see it
    trained = model(x).detach()
    ck.merge_corda(model)
    assert isinstance(model.a, nn.Linear) and model.b is model.a
    assert rel(model(x), trained) < 1e-5


def test_merge_leaves_the_model_uniformly_frozen():
    model = tiny_llama()
    ck.build_corda(model, _covs(model), rank=4)
    ck.merge_corda(model)
    # build froze everything but the adapters; the merged layers replace frozen residuals.
    assert not any(p.requires_grad for p in model.parameters())
    model.requires_grad_(True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"dropout": 1.5}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"compute_dtype": torch.float16}, TypeError, "compute_dtype"),
    ],
)
def test_bad_build_arguments_fail_before_any_swap(kwargs, err, match):
    model = tiny_llama()
    covs = _covs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        ck.build_corda(model, covs, rank=4, **kwargs)
    assert not ck.corda_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_built_model_trains_under_autocast():
    model = tiny_llama()
    batch = padded_batches(model.config.vocab_size, n_batches=1)[0]
    ck.build_corda(model, _covs(model), rank=4)
    want = _logits(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch).logits
    assert rel(logits, want) < 5e-2
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _torch_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=2)  # torch's default: padded batches go nested
    return nn.Sequential(nn.Linear(16, 32), encoder, nn.Linear(32, 4)).eval()


def test_torch_transformer_encoder_layers_keep_their_adapters_in_eval():
    model = _torch_encoder()
    xs = [torch.randn(3, 10, 16) for _ in range(2)]
    with torch.no_grad():
        want = model(xs[0])
    covs = ck.collect_cov(model, xs, progress=False)
    # MultiheadAttention hands out_proj.weight to a functional kernel: never a target.
    assert not any("out_proj" in n for n in covs) and "1.layers.0.linear1" in covs
    with pytest.raises(ValueError, match=r"'1.layers.0.self_attn.out_proj'.*MultiheadAttention"):
        ck.collect_cov(model, xs, targets=["out_proj"], progress=False)
    # nor through a covariance mapping that names it (hand-made, or from another tool)
    named = {"1.layers.0.self_attn.out_proj": torch.eye(32), **covs}
    with pytest.raises(ValueError, match=r"'1.layers.0.self_attn.out_proj'.*leave it out of the covariances"):
        ck.build_corda(model, named, rank=4)
    assert not ck.corda_layers(model)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True  # a padded batch: nn.TransformerEncoder would pack it into nested tensors
    with torch.no_grad():
        want_padded = model[2](model[1](model[0](xs[0]), src_key_padding_mask=pad))
    ck.build_corda(model, covs, rank=4)
    with torch.no_grad():  # eval + no_grad: where the encoder layer's fused fast path would run
        built = model(xs[0])
        built_padded = model[2](model[1](model[0](xs[0]), src_key_padding_mask=pad))
    assert rel(built, want) < 1e-5
    assert rel(built_padded[1:], want_padded[1:]) < 1e-5 and rel(built_padded[0, :6], want_padded[0, :6]) < 1e-5
    with torch.no_grad():
        for layer in ck.corda_layers(model).values():
            layer.lora_B.add_(0.05)
        trained = model(xs[0])
    assert rel(trained, want) > 1e-3  # the adapters are part of the forward
    ck.merge_corda(model)
    with torch.no_grad():
        assert rel(model(xs[0]), trained) < 1e-5


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _torch_encoder()

    def forward(self, x, attention_mask):
        h = self.inner[0](x)
        return self.inner[2](self.inner[1](h, src_key_padding_mask=~attention_mask.bool()))


def test_a_padded_batch_through_nn_transformer_encoder_is_collected_without_its_padding():
    # In eval without grad the encoder packs a padded batch into nested tensors, which have no rows.
    model = _PaddedEncoder()
    batches = []
    for i in range(2):
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[i, 6 - i :] = 0
        batches.append({"x": torch.randn(3, 10, 16), "attention_mask": mask})
    covs = ck.collect_cov(model, batches, progress=False)
    assert all(m.use_nested_tensor for m in model.modules() if isinstance(m, nn.TransformerEncoder))
    unpacked = copy.deepcopy(model)
    unpacked.inner[1].use_nested_tensor = False
    ref, counts = reference_covariances(unpacked, batches, list(covs))
    assert covs.token_counts == counts == {n: 2 * 30 - 4 - 5 for n in covs}
    assert all(rel(covs[n], ref[n]) < 1e-5 for n in covs)


def test_from_peft_on_a_torch_transformer_encoder_keeps_the_adapters_in_eval():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = _torch_encoder()
    x = torch.randn(3, 10, 16)
    cfg = LoraConfig(r=4, target_modules=["linear1", "linear2"], init_lora_weights=False)
    pm = get_peft_model(model, cfg).eval()
    with torch.enable_grad():  # an input that needs grad keeps torch off the fused path: the adapters' output
        want = pm(x.clone().requires_grad_()).detach()
    converted = export.from_peft(pm)
    with torch.no_grad():
        assert rel(converted(x), want) < 1e-5


@pytest.mark.parametrize("how", ["gradient_checkpointing_enable", "as_transformers_4_sets_it"])
def test_adapters_train_under_reentrant_checkpointing_switched_on_after_the_build(how):
    # Reentrant checkpointing gives a block's adapters no gradient unless the block's input requires
    # one; with every other weight frozen, the embeddings' output does not. transformers 4 enables
    # it without making the input require grad (transformers 5 does that itself).
    import functools

    from torch.utils.checkpoint import checkpoint

    model = tiny_llama()
    b = padded_batches(128, n_batches=1)[0]
    ck.build_corda(model, ck.collect_cov(model, [b], progress=False), rank=4)
    model.train()
    plain = copy.deepcopy(model)
    plain(**b, labels=b["input_ids"], use_cache=False).loss.backward()
    if how == "gradient_checkpointing_enable":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=True)
        )
    model(**b, labels=b["input_ids"], use_cache=False).loss.backward()
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and len(got) == 28
    missing = [n for n, g in got.items() if g is None]
    assert not missing, missing
    assert all(rel(got[n], want[n]) < 1e-5 for n in got)


def test_the_input_grad_hook_is_only_for_reentrant_checkpointing_and_respects_an_opt_out():
    import functools

    from torch.utils.checkpoint import checkpoint

    b = padded_batches(128, n_batches=1)[0]

    def built():
        model = tiny_llama()
        ck.build_corda(model, ck.collect_cov(model, [b], progress=False), rank=4)
        return model.train()

    def ours(model):  # the input embeddings' forward hooks (enable_input_require_grads adds one)
        return len(model.get_input_embeddings()._forward_hooks)

    # Non-reentrant checkpointing needs no input grad (and a hook set inside torch.compile would break it).
    model = built()
    model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=False)
    )
    model(**b, use_cache=False)
    assert ours(model) == 0
    # Switched off on purpose: not switched on again.
    model = built()
    model.enable_input_require_grads()
    model.disable_input_require_grads()
    model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=True)
    )
    model(**b, use_cache=False)
    assert ours(model) == 0
    # Without checkpointing nothing is added either.
    model = built()
    model(**b, use_cache=False)
    assert ours(model) == 0


class _Router(nn.Linear):
    """A linear subclass with its own forward (transformers' Llama4Router returns a tuple)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class _Marked(nn.Linear):
    """A subclass that only marks the layer (torch's NonDynamicallyQuantizableLinear): a plain linear."""


class _HandWritten(nn.Linear):
    """Its own forward, the plain map written out (transformers' FalconLinear): still a target."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _Doubled(nn.Linear):
    """Its own forward, one tensor of the right shape, but not x·Wᵀ + b."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _Scaled(nn.Linear):
    """State of its own (a learned output scale, as transformers' DoryLMHead): the plain map only while
    the scale is 1, so refused without probing."""

    def __init__(self, *a):
        super().__init__(*a)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.scale


class _Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = _HandWritten(12, 16)
        self.router = _Router(16, 8)
        self.doubled = _Doubled(16, 12)
        self.scaled = _Scaled(16, 12)
        self.marked = _Marked(16, 12)

    def forward(self, x):
        h = self.up(x)
        probs, _ = self.router(h)
        return self.marked(h) + self.doubled(h) + self.scaled(h) + probs.sum(-1, keepdim=True)


def test_linear_subclasses_with_their_own_forward_are_not_targets():
    torch.manual_seed(0)
    model = _Routed().eval()
    xs = [torch.randn(3, 5, 12) for _ in range(2)]
    with torch.no_grad():
        want = model(xs[0])
    covs = ck.collect_cov(model, xs, progress=False)
    assert sorted(covs) == ["marked", "up"]  # the router and the doubling layer are left out by default
    for how in (["router"], lambda name, m: name == "router"):
        with pytest.raises(ValueError, match=r"'router' is a _Router, a Linear subclass whose own forward is not"):
            ck.collect_cov(model, xs, targets=how, progress=False)
    with pytest.raises(ValueError, match=r"'doubled' is a _Doubled, a Linear subclass whose own forward is not"):
        ck.collect_cov(model, xs, targets=["doubled"], progress=False)
    with pytest.raises(ValueError, match=r"'scaled' is a _Scaled"):
        ck.collect_cov(model, xs, targets=["scaled"], progress=False)
    meta = copy.deepcopy(model).to("meta")  # weights not materialized: the output's shape still tells
    assert sorted(find_targets(meta)) == ["doubled", "marked", "up"]
    # The probe is the same under autocast (x·Wᵀ rounded before the bias is added would differ from
    # F.linear by more than fp32 rounding) and leaves the caller's random stream where it was.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sorted(find_targets(model)) == ["marked", "up"]
    torch.manual_seed(1)
    want_draw = torch.rand(3)
    torch.manual_seed(1)
    find_targets(model)
    assert torch.equal(torch.rand(3), want_draw)
    with pytest.raises(ValueError, match=r"'router' is a _Router.*leave it out of the covariances"):
        ck.build_corda(model, {"router": torch.eye(16), **covs}, rank=2)
    with pytest.raises(TypeError, match="from_linear cannot wrap a _Router"):
        ck.CordaLinear.from_linear(model.router, torch.eye(16), rank=2)
    assert not ck.corda_layers(model)
    ck.build_corda(model, covs, rank=2)
    assert sorted(ck.corda_layers(model)) == ["marked", "up"] and type(model.router) is _Router
    with torch.no_grad():
        assert rel(model(xs[0]), want) < 1e-5
