"""What users feed collect_cov: wrapped models, precomputed encoder outputs, offloaded weights,
masks it cannot use. Each case is checked against covariances of a plain run, or a float64 reference."""

import collections
import warnings

import pytest
import torch
from test_collect import _bart, _seq2seq_batches, _t5
from tiny import padded_batches, rel, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels.collect import _to


def _assert_same(covs, ref, tol=1e-6):
    assert set(covs) == set(ref)
    for n in ref:
        assert covs.token_counts[n] == ref.token_counts[n], n
        assert rel(covs[n], ref[n]) < tol, n


def _tuples(batches):
    return [(b["input_ids"], b["attention_mask"]) for b in batches]


@pytest.mark.parametrize("wrap", ["data_parallel", "peft"])
def test_tuple_batches_find_the_mask_through_wrappers(wrap):
    # Their forwards take (*args, **kwargs): the mask's position comes from the model inside.
    batches = padded_batches(128, n_batches=2)
    ref = ck.collect_cov(tiny_llama(), batches, progress=False)
    if wrap == "data_parallel":
        model = nn.DataParallel(tiny_llama())
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        covs = ck.collect_cov(model, _tuples(batches), progress=False, targets=["re:.*(k_proj|down_proj)"])
    assert covs.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    for n in covs:
        # DataParallel's "module." is left out of the names; a PEFT model's own names stay its own.
        plain = n.replace("base_model.model.", "", 1) if wrap == "peft" else n
        assert wrap == "peft" or not n.startswith("module.")
        assert rel(covs[n], ref[plain]) < 1e-6, n


class _StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_llama()

    def forward(self, *args):
        return self.inner(*args)


def test_a_tuple_batch_through_star_args_is_warned_about():
    batches = padded_batches(128, n_batches=1)
    with pytest.warns(UserWarning, match=r"takes \*args.*use dict batches"):
        covs = ck.collect_cov(_StarArgs(), _tuples(batches), progress=False)
    assert covs.tokens == batches[0]["input_ids"].numel()


class _KwargsOnly(nn.Module):
    """A multimodal-style wrapper: its forward takes use_cache only through **kwargs."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()
        self.caches = []

    def forward(self, **kwargs):
        out = self.lm(**kwargs)
        self.caches.append(sorted(out.keys()))  # a ModelOutput lists only the fields it holds
        return out


def test_no_kv_cache_is_built_when_use_cache_hides_in_kwargs():
    model = _KwargsOnly()
    assert model.lm.config.use_cache is True
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False, targets=["re:.*layers.*"])
    assert model.caches == [["logits"], ["logits"]]
    assert model.lm.config.use_cache is True  # restored
    ref = ck.collect_cov(tiny_llama(), batches, progress=False)
    for n in ref:
        assert rel(covs["lm." + n], ref[n]) < 1e-6, n


class _FourD(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def test_a_4d_mask_is_not_applied_silently():
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.zeros(2, 1, 5, 5)
    with pytest.warns(UserWarning, match="attention_mask is 4-D.*padding included"):
        covs = ck.collect_cov(_FourD(), [{"input_ids": ids, "attention_mask": mask}] * 2, progress=False)
    assert covs.tokens == 20


@pytest.mark.parametrize("make", [_t5, _bart])
@pytest.mark.parametrize("form", ["model_output", "tuple"])
def test_precomputed_encoder_outputs_keep_the_encoder_mask(make, form):
    model = make()
    batches = _seq2seq_batches(model.config.vocab_size)
    decoder = lambda n, m: ".decoder." in f".{n}" and "lm_head" not in n  # noqa: E731
    ref = ck.collect_cov(model, batches, progress=False, targets=decoder)
    pre = []
    with torch.no_grad():
        for b in batches:
            enc = model.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            rest = {k: v for k, v in b.items() if k != "input_ids"}
            pre.append({**rest, "encoder_outputs": enc if form == "model_output" else tuple(enc.values())})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        covs = ck.collect_cov(model, pre, progress=False, targets=decoder)
    _assert_same(covs, ref)


def test_batches_keep_their_container_types():
    from transformers.modeling_outputs import BaseModelOutput

    Pair = collections.namedtuple("Pair", "a b")
    x = torch.ones(2)
    moved = _to({"enc": BaseModelOutput(last_hidden_state=x), "pair": Pair(x, [x])}, torch.device("cpu"))
    assert isinstance(moved["enc"], BaseModelOutput) and moved["enc"].last_hidden_state is x
    assert isinstance(moved["pair"], Pair) and moved["pair"].a is x and moved["pair"].b[0] is x


def test_an_offloaded_model_gets_its_batches_on_the_execution_device():
    from accelerate import cpu_offload

    batches = padded_batches(128, n_batches=2)
    ref = ck.collect_cov(tiny_llama(), batches, progress=False)
    model = tiny_llama()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.embed_tokens.weight.device.type == "meta"
    _assert_same(ck.collect_cov(model, batches, progress=False), ref)


class _MergeOnEval(nn.Module):
    """A loralib-style layer: eval() merges its update into the weight, train() takes it back out."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.delta = nn.Parameter(torch.ones(6, 6))
        self.merged = False

    def train(self, mode=True):
        super().train(mode)
        with torch.no_grad():
            if not mode and not self.merged:
                self.lin.weight += self.delta
            elif mode and self.merged:
                self.lin.weight -= self.delta
        self.merged = not mode
        return self

    def forward(self, x):
        return self.lin(x) if self.merged else self.lin(x) + x @ self.delta.T


class _Headless(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _MergeOnEval()

    def get_output_embeddings(self):
        raise NotImplementedError  # transformers' default for models without a head

    def forward(self, x):
        return self.block(x)


def test_modes_are_restored_through_train_and_a_headless_model_collects():
    model = _Headless().train()
    w = model.block.lin.weight.detach().clone()
    x = torch.randn(10, 6)
    covs = ck.collect_cov(model, [x], progress=False)
    assert rel(covs["block.lin"], x.double().T @ x.double() / 10) < 1e-6
    assert model.training and model.block.training and not model.block.merged
    torch.testing.assert_close(model.block.lin.weight.detach(), w)  # merged on eval(), unmerged again


@pytest.mark.parametrize("bad", [True, 2.0, "3"])
def test_max_batches_must_be_an_int(bad):
    with pytest.raises(ValueError, match="max_batches must be an int"):
        ck.collect_cov(tiny_llama(), padded_batches(128, n_batches=1), progress=False, max_batches=bad)


def test_a_tuple_batch_follows_the_outer_forward_when_it_names_its_parameters():
    # PEFT's seq2seq forward has its own order (inputs_embeds before decoder_input_ids): the tuple goes
    # to that forward, so its positions decide, not T5's.
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_t5(), LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    b = _seq2seq_batches(64, n=1)[0]
    names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    tup = (b["input_ids"], b["attention_mask"], None, b["decoder_input_ids"], b["decoder_attention_mask"])
    decoder = lambda n, m: ".decoder." in n and "lora" not in n and "lm_head" not in n  # noqa: E731
    ref = ck.collect_cov(model, [{k: b[k] for k in names}], progress=False, targets=decoder)
    _assert_same(ck.collect_cov(model, [tup], progress=False, targets=decoder), ref)


def test_a_submodule_shared_by_two_parents_gets_its_own_mode_back():
    class Run(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.b(self.a(x))

    run = Run().eval()
    run.b.train()
    run.b.append(run.a[0])  # the dropout stays off; its second parent b is in training mode
    before = {n: m.training for n, m in run.named_modules(remove_duplicate=False)}
    ck.collect_cov(run, [torch.randn(5, 4)], progress=False)
    assert {n: m.training for n, m in run.named_modules(remove_duplicate=False)} == before


class _Patches(nn.Module):
    """45 layers reading image patches (not the text tokens), next to a text layer; the first two share
    their input (one group)."""

    def __init__(self):
        super().__init__()
        self.emb, self.text = nn.Embedding(20, 4), nn.Linear(4, 4)
        self.vision = nn.ModuleList(nn.Linear(4, 4) for _ in range(45))

    def forward(self, input_ids, attention_mask=None, pixel_values=None):
        h = pixel_values
        self.vision[0](h)
        for layer in self.vision[1:]:
            h = layer(h)
        return self.text(self.emb(input_ids))


def test_the_layout_warning_is_capped_and_silent_without_padding():
    ids, pixels = torch.randint(0, 20, (2, 5)), torch.randn(7, 4)
    full = {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long), "pixel_values": pixels}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no padding: counting every row counted none
        ck.collect_cov(_Patches(), [full], progress=False)
    padded = dict(full, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    with pytest.warns(UserWarning, match=r"token layout of 45 module\(s\), .* and 5 more; all their rows") as caught:
        ck.collect_cov(_Patches(), [padded], progress=False)
    assert len(str(caught[0].message)) < 2000


class _SeqFirst(nn.Module):
    """Reads its tokens seq-first through a transposed view (Longformer's attention does)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(50, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids).transpose(0, 1))


@pytest.mark.parametrize("seq", [5, 3], ids=["batch_ne_seq", "square"])
def test_a_transposed_view_is_not_masked_in_the_wrong_order(seq):
    # Neither shape nor base may pass for token order: the rows are counted whole, with the warning,
    # instead of dropping the wrong ones.
    torch.manual_seed(0)
    model = _SeqFirst()
    ids = torch.randint(0, 50, (3, seq))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, 2:] = 0
    with pytest.warns(UserWarning, match="did not match the token layout"):
        covs = ck.collect_cov(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, normalize="sum")
    x = model.emb(ids).reshape(-1, 8).double()
    assert covs.token_counts == {"lin": 3 * seq}
    assert rel(covs["lin"], x.T @ x) < 1e-6


class _Flattened(nn.Module):
    """Reads a feature slice of the flattened tokens: still token order, so the mask applies."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(50, 24), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.lin(h.view(-1, 24)[:, 8:16])


def test_a_sliced_flat_view_in_token_order_takes_the_mask():
    torch.manual_seed(0)
    model = _Flattened()
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    covs = ck.collect_cov(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, normalize="sum")
    x = model.emb(ids)[..., 8:16][mask.bool()].double()
    assert covs.token_counts == {"lin": 12}
    assert rel(covs["lin"], x.T @ x) < 1e-6


class _EmbeddingAsOutput(nn.Module):
    """get_output_embeddings() is an embedding that runs first (FSMT's decoder does this)."""

    def __init__(self):
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def get_output_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        return self.l2(self.l1(self.emb(input_ids))) @ self.emb.weight.T


def test_a_non_linear_output_embedding_does_not_end_the_forward():
    torch.manual_seed(0)
    model = _EmbeddingAsOutput()
    ids = torch.randint(0, 50, (2, 6))
    covs = ck.collect_cov(model, [{"input_ids": ids}], progress=False, normalize="sum")
    assert covs.token_counts == {"l1": 12, "l2": 12}
    x = model.emb(ids).reshape(-1, 8).double()
    assert rel(covs["l1"], x.T @ x) < 1e-6
