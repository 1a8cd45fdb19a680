"""End to end on tiny random-weight vision-language models: LLaVA (CLIP + Llama) and Qwen2-VL.

A VLM mixes two token layouts. The language model's linears see (batch, seq, d)
rows that the text attention mask describes; the vision tower and the projector
see image patches ((images, patches, d) for CLIP, flattened (patches, d) for
Qwen2-VL) that the mask does not describe: every one of their rows must be
counted, and collect_cov must say that the mask did not apply to them.
"""

import ast
import re
import warnings

import pytest
import tiny
import torch
import transformers
from tiny import rel
from torch import nn

import corda_kernels as ck
from corda_kernels._targets import weight_shape

UNMASKED_WARNING = "attention_mask did not match the token layout"
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# ---------------------------------------------------------------------- LLaVA: CLIP vision tower + Llama
LLAVA_VOCAB = 128
LLAVA_IMAGE_TOKEN = 127
LLAVA_PATCHES = 16  # 32x32 image, patch 8: 4x4 patches (+ CLS in the vision tower; the projector drops it)


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=LLAVA_VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # vision_feature_layer=-2 (LLaVA-1.5's choice): the last CLIP layer runs but does not reach the logits.
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_batches(n_batches=2, batch=3, seq=24, left=False, seed=0, images=True):
    """Padded batches; each sequence holds one image as LLAVA_PATCHES image tokens after a 2-token prefix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        need = LLAVA_PATCHES + 3 if images else 3
        lengths = torch.randint(need, seq + 1, (batch,), generator=g)
        lengths[0] = seq  # the longest sequence sets the width
        lengths[-1] = min(int(lengths[-1]), seq - 2)  # and the last one is always padded
        ids = torch.zeros(batch, seq, dtype=torch.long)  # 0 = padding
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            row = torch.randint(3, LLAVA_IMAGE_TOKEN - 4, (n,), generator=g)
            if images:
                row[2 : 2 + LLAVA_PATCHES] = LLAVA_IMAGE_TOKEN
            sl = slice(seq - n, seq) if left else slice(0, n)
            ids[i, sl] = row
            mask[i, sl] = 1
        b = {"input_ids": ids, "attention_mask": mask}
        if images:
            b["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
        out.append(b)
    return out


# ---------------------------------------------------------------------- Qwen2-VL: flattened patches, merger, M-RoPE
QWEN_VOCAB = 128
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123
QWEN_GRID = (1, 4, 4)  # t, h, w patches of one 32x32 image with patch 8
QWEN_PATCHES = 16  # rows per image in the vision blocks
QWEN_MERGED = 4  # image tokens per image in the text (spatial merge 2x2)


def tiny_qwen2vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": QWEN_VOCAB,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            # head_dim 16: 8 rotary frequencies split over (t, h, w); transformers 4.x reads rope_scaling
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            **(
                {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 10000.0}
                if TRANSFORMERS_4
                else {}
            ),
        },
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen_batches(n_batches=2, batch=2, seq=20, seed=0):
    """Right-padded batches, one image per sequence: <start> 4 x <image> <end> after a 2-token prefix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(QWEN_MERGED + 5, seq + 1, (batch,), generator=g)
        lengths[0] = seq
        lengths[-1] = min(int(lengths[-1]), seq - 2)  # always some padding
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            row = torch.randint(3, QWEN_IMAGE - 2, (n,), generator=g)
            row[2] = QWEN_START
            row[3 : 3 + QWEN_MERGED] = QWEN_IMAGE
            row[3 + QWEN_MERGED] = QWEN_END
            ids[i, :n] = row
            mask[i, :n] = 1
        b = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.randn(batch * QWEN_PATCHES, 3 * 2 * 8 * 8, generator=g),
            "image_grid_thw": torch.tensor([QWEN_GRID] * batch),
        }
        if _QWEN_TAKES_TOKEN_TYPES:  # newer transformers only; older forwards reject the key
            b["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
        out.append(b)
    return out


def _forward_takes(cls_name: str, arg: str) -> bool:
    import inspect

    return arg in inspect.signature(getattr(transformers, cls_name).forward).parameters


_QWEN_TAKES_TOKEN_TYPES = _forward_takes("Qwen2VLForConditionalGeneration", "mm_token_type_ids")


# ---------------------------------------------------------------------- helpers
FAMILIES = {
    # factory, batch maker, language-model prefix, vision-side prefixes (tower + projector)
    "llava": (
        tiny_llava,
        llava_batches,
        "model.language_model.",
        ("model.vision_tower.", "model.multi_modal_projector."),
    ),
    "qwen2vl": (tiny_qwen2vl, qwen_batches, "model.language_model.", ("model.visual.",)),
}


def linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def is_lm(name):
    return name.startswith("model.language_model.")


def reference_covariances(model, batches, names):
    """Float64 reference: language-model rows selected by the attention mask, every other row counted."""
    return tiny.reference_covariances(model, batches, names, masked=is_lm)


def collect_expecting_unmasked_warning(model, batches, **kw):
    """collect_cov, asserting exactly one 'mask did not apply' warning; returns (covs, names the warning lists)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covs = ck.collect_cov(model, batches, progress=False, **kw)
    msgs = [str(w.message) for w in caught if UNMASKED_WARNING in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    listed = ast.literal_eval(re.search(r"\[.*?\]", msgs[0]).group(0))
    return covs, set(listed)


def collect_quietly(model, batches, **kw):
    """collect_cov, asserting that no 'mask did not apply' warning was raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covs = ck.collect_cov(model, batches, progress=False, **kw)
    assert not [w for w in caught if UNMASKED_WARNING in str(w.message)], [str(w.message) for w in caught]
    return covs


def logits(model, batches):
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def assert_logits_close(after, before, tol=1e-5):
    for a, b in zip(after, before):
        assert torch.isfinite(a).all()
        assert rel(a, b) < tol, rel(a, b)


def assert_unmasked_rows_reported(covs, listed):
    # Every group outside the language model must be named (by at least one member); no language-model module is.
    assert not any(is_lm(n) for n in listed), sorted(listed)
    for g in covs.groups:
        if not is_lm(g[0]):
            assert set(g) & listed, (g, sorted(listed))


# ---------------------------------------------------------------------- 1. collection
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_llava_collect_every_target_matches_reference(left):
    model = tiny_llava()
    batches = llava_batches(n_batches=3, left=left)
    covs, listed = collect_expecting_unmasked_warning(model, batches)

    targets = {n for n in linears(model) if n != "lm_head"}
    assert set(covs) == targets
    assert len([n for n in covs if n.startswith("model.vision_tower.")]) == 12
    assert len([n for n in covs if n.startswith("model.multi_modal_projector.")]) == 2
    assert len([n for n in covs if is_lm(n)]) == 14
    groups = {tuple(n.rsplit(".", 1)[-1] for n in g) for g in covs.groups}
    assert ("q_proj", "k_proj", "v_proj") in groups  # CLIP and Llama attention both share one input
    assert ("gate_proj", "up_proj") in groups

    ref, counts = reference_covariances(model, batches, sorted(covs))
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    images = sum(b["pixel_values"].shape[0] for b in batches)
    for n in covs:
        assert rel(covs[n], ref[n]) < 1e-5, n
        assert covs[n].shape == (weight_shape(dict(model.named_modules())[n])[1],) * 2
        if is_lm(n):
            expected = text_tokens
        elif n.startswith("model.multi_modal_projector."):
            expected = images * LLAVA_PATCHES  # CLS dropped (vision_feature_select_strategy="default")
        else:
            expected = images * (LLAVA_PATCHES + 1)
        assert covs.token_counts[n] == expected == counts[n], n
    assert_unmasked_rows_reported(covs, listed)
    # Documented: `tokens` is the first group's count, here the vision tower's (CLIP q/k/v).
    assert covs.groups[0][0].startswith("model.vision_tower.")
    assert covs.tokens == images * (LLAVA_PATCHES + 1)


def test_llava_text_only_batch_before_image_batches():
    # Mixed calibration data: a text-only batch first (the vision tower does not run), then image batches.
    # From the second batch on the forward stops early; that must not cut the image batches' language-model rows.
    model = tiny_llava()
    batches = llava_batches(n_batches=1, images=False, seed=1) + llava_batches(n_batches=2, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covs = ck.collect_cov(model, batches, progress=False)
    assert set(covs) == {n for n in linears(model) if n != "lm_head"}
    ref, counts = reference_covariances(model, batches, sorted(covs))
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for n in covs:
        assert covs.token_counts[n] == counts[n], (n, covs.token_counts[n], counts[n])
        assert rel(covs[n], ref[n]) < 1e-5, n
    assert covs.token_counts["model.language_model.layers.1.mlp.down_proj"] == text_tokens


@pytest.mark.parametrize(
    "seq",
    [20, 16],
    ids=["text_rows_differ_from_patch_rows", "text_rows_equal_patch_rows"],
)
def test_qwen2vl_collect_every_target_matches_reference(seq):
    # Qwen2-VL's vision blocks read flattened (patches, d) rows. With batch 2 and seq 16, the text mask has
    # 32 entries, exactly the number of patch rows: the mask must still not be applied to the patches.
    model = tiny_qwen2vl()
    batches = qwen_batches(n_batches=2, seq=seq)
    covs, listed = collect_expecting_unmasked_warning(model, batches)

    targets = {n for n in linears(model) if n != "lm_head"}
    assert set(covs) == targets
    assert len([n for n in covs if n.startswith("model.visual.")]) == 10
    ref, counts = reference_covariances(model, batches, sorted(covs))
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    images = sum(b["image_grid_thw"].shape[0] for b in batches)
    for n in covs:
        if is_lm(n):
            expected = text_tokens
        elif n.startswith("model.visual.merger."):
            expected = images * QWEN_MERGED
        else:
            expected = images * QWEN_PATCHES
        assert covs.token_counts[n] == expected == counts[n], (n, covs.token_counts[n], expected)
        assert rel(covs[n], ref[n]) < 1e-5, n
    assert_unmasked_rows_reported(covs, listed)


# ---------------------------------------------------------------------- 2. build / merge
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_build_keeps_logits_and_merge_roundtrips(family, mode):
    factory, make_batches, _, _ = FAMILIES[family]
    model = factory()
    batches = make_batches(n_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covs = ck.collect_cov(model, batches, progress=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {n: weight_shape(m) for n, m in model.named_modules() if n in covs}
    before = logits(model, batches)

    ck.build_corda(model, covs, rank=4, mode=mode)
    assert_logits_close(logits(model, batches), before)
    layers = ck.corda_layers(model)
    assert set(layers) == set(covs)
    assert any(not is_lm(n) for n in layers) and any(is_lm(n) for n in layers)
    assert all(layer.mode == mode and layer.rank == 4 for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    assert ck.trainable_parameters(model) == sum(4 * (d_in + d_out) for d_out, d_in in shapes.values())
    assert type(model.lm_head) is nn.Linear

    ck.merge_corda(model)
    assert not ck.corda_layers(model)
    assert all(type(dict(model.named_modules())[n]) is nn.Linear for n in covs)
    assert_logits_close(logits(model, batches), before)
    merged = model.state_dict()
    assert set(merged) == set(original)
    for k, v in original.items():
        assert merged[k].shape == v.shape, k
        assert rel(merged[k], v) < 1e-5, k


# ---------------------------------------------------------------------- 3. language model only
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_language_model_only_targets_leave_vision_untouched(family):
    factory, make_batches, lm_prefix, vision_prefixes = FAMILIES[family]
    model = factory()
    batches = make_batches(n_batches=2)
    lm_names = {n for n in linears(model) if n.startswith(lm_prefix)}

    # Collecting only the language model: no vision module, and no warning (every collected row is a text token).
    lm_covs = collect_quietly(model, batches, targets=[lm_prefix + "*"])
    assert set(lm_covs) == lm_names
    ref, counts = reference_covariances(model, batches, sorted(lm_names))
    for n in lm_names:
        assert rel(lm_covs[n], ref[n]) < 1e-5, n
        assert lm_covs.token_counts[n] == counts[n] == sum(int(b["attention_mask"].sum()) for b in batches)

    # Building from full covariances but with targets= restricted by a regex.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_covs = ck.collect_cov(model, batches, progress=False)
    for n in lm_names:
        assert rel(lm_covs[n], all_covs[n]) < 1e-6, n
    vision_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(vision_prefixes)}
    assert vision_state
    before = logits(model, batches)
    ck.build_corda(model, all_covs, rank=4, mode="kpm", targets=["re:" + re.escape(lm_prefix) + r".*_proj"])
    assert_logits_close(logits(model, batches), before)
    assert set(ck.corda_layers(model)) == lm_names
    modules = dict(model.named_modules())
    for n in linears(model):
        if n.startswith(vision_prefixes):
            assert type(modules[n]) is nn.Linear, n
    for k, v in model.state_dict().items():
        if k.startswith(vision_prefixes):
            assert torch.equal(v, vision_state[k]), k
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.startswith(lm_prefix) and n.endswith((".lora_A", ".lora_B"))), n

    # The same restriction through the covariances alone (build's default targets are the covariances' modules).
    model2 = factory()
    ck.build_corda(model2, lm_covs, rank=3, mode="ipm")
    assert set(ck.corda_layers(model2)) == lm_names
    assert_logits_close(logits(model2, batches), before)


# ---------------------------------------------------------------------- 4. CorDA++
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_cordapp_select_allocate_build_keeps_logits(family):
    factory, make_batches, _, _ = FAMILIES[family]
    model = factory()
    batches = make_batches(n_batches=4)
    cands, listed = collect_expecting_unmasked_warning(model, batches, candidates=2)
    assert isinstance(cands, ck.CovarianceCandidates)
    assert cands.rounds == 2 and cands.round_batches == [2, 2]
    covs = ck.select_covariances(model, cands)
    assert set(covs) == {n for n in linears(model) if n != "lm_head"}
    assert_unmasked_rows_reported(covs, listed)

    # Each selected covariance is its chosen round's covariance (batches 2k, 2k+1).
    rounds = [reference_covariances(model, batches[2 * k : 2 * k + 2], sorted(covs)) for k in range(2)]
    for n, k in cands.chosen_round.items():
        assert rel(covs[n], rounds[k][0][n]) < 1e-5, (n, k)
        assert covs.token_counts[n] == rounds[k][1][n], (n, k)

    ranks = ck.allocate_ranks(model, covs, budget=1.0, rank=4)
    assert set(ranks) == set(covs)
    assert all(1 <= r <= min(weight_shape(dict(model.named_modules())[n])) for n, r in ranks.items())
    assert ranks.used <= ranks.budget
    assert ranks.used == sum(r * ranks.costs[n] for n, r in ranks.items())

    before = logits(model, batches[:2])
    ck.build_corda(model, covs, ranks=ranks, mode="kpm")
    assert_logits_close(logits(model, batches[:2]), before)
    layers = ck.corda_layers(model)
    assert {n: layer.rank for n, layer in layers.items()} == dict(ranks)
    assert ck.trainable_parameters(model) == ranks.used


# ---------------------------------------------------------------------- 5. training
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_training_step_grads_only_on_adapters(family):
    factory, make_batches, _, _ = FAMILIES[family]
    model = factory()
    batches = make_batches(n_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covs = ck.collect_cov(model, batches, progress=False)
    ck.build_corda(model, covs, rank=4, mode="kpm")
    layers = ck.corda_layers(model)
    before = logits(model, batches[:1])

    model.train()
    b = batches[0]
    image_token = LLAVA_IMAGE_TOKEN if family == "llava" else QWEN_IMAGE
    labels = b["input_ids"].masked_fill((b["attention_mask"] == 0) | (b["input_ids"] == image_token), -100)
    # The loss is taken here, not through labels=: transformers 4.52's Qwen2-VL reads a vocab_size
    # its nested config does not have.
    logits_ = model(**b).logits
    loss = nn.functional.cross_entropy(logits_[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.isfinite(loss)
    loss.backward()

    # With vision_feature_layer=-2 LLaVA's last CLIP layer never reaches the logits: no gradient there.
    # (transformers 4.x nests CLIP's encoder one level deeper: model.vision_tower.vision_model.encoder)
    unused = {
        n for n in layers if family == "llava" and n.startswith("model.vision_tower.") and ".encoder.layers.1." in n
    }
    if family == "llava":
        assert len(unused) == 6
    for name, layer in layers.items():
        if name in unused:
            assert layer.lora_A.grad is None and layer.lora_B.grad is None, name
            continue
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert any(not is_lm(n) for n in layers if n not in unused)  # gradients reach the vision side too
    for n, p in model.named_parameters():
        if not n.endswith((".lora_A", ".lora_B")):
            assert p.grad is None, n

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    opt.step()
    model.eval()
    after = logits(model, batches[:1])
    assert torch.isfinite(after[0]).all() and rel(after[0], before[0]) > 1e-6  # the adapters did move
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
