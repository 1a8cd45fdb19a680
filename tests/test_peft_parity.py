"""With normalize="peft" we reproduce PEFT's CorDA (preprocess_corda + get_peft_model)."""

import copy

import pytest
import torch
from tiny import padded_batches, rel, tiny_llama

import corda_kernels as ck

peft = pytest.importorskip("peft")
pytest.importorskip("attr")


def _peft_corda(model, sequences, mode, r, alpha, targets):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )

    def run_model():
        for ids in sequences:
            model(input_ids=ids.unsqueeze(0))

    preprocess_corda(model, cfg, run_model=run_model)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_adapter_product_and_residual_match_peft(mode):
    base = tiny_llama(hidden=32, inter=48, layers=1)
    batches = padded_batches(128, n_batches=2, batch=3, seq=40)
    sequences = [b["input_ids"][i][b["attention_mask"][i].bool()] for b in batches for i in range(3)]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    r, alpha = 4, 8

    ours = copy.deepcopy(base)
    covs = ck.collect_cov(ours, batches, normalize="peft", progress=False)
    ck.build_corda(ours, covs, rank=r, mode=mode, alpha=alpha)
    layers = ck.corda_layers(ours)

    theirs = _peft_corda(copy.deepcopy(base), sequences, mode, r, alpha, targets)
    compared = 0
    for name, module in theirs.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix("base_model.model.")
        mine = layers[key]
        s = module.scaling["default"]
        assert s == pytest.approx(mine.scaling)
        delta_peft = (
            s * module.lora_B["default"].weight.detach().double() @ module.lora_A["default"].weight.detach().double()
        )
        delta_ours = mine.scaling * mine.lora_B.detach().double() @ mine.lora_A.detach().double()
        w = module.base_layer.weight.double() + delta_peft
        # PEFT's fp32 SVD resolves tail components less exactly; compare relative to the weight.
        assert float((delta_ours - delta_peft).norm() / w.norm()) < 1e-3, key
        assert float((mine.weight.double() - module.base_layer.weight.double()).norm() / w.norm()) < 1e-3, key
        # The split between A and B depends on the covariance's absolute scale (B ~ sqrt(sigma)):
        # it pins down the normalization, which the product alone would not.
        bn_peft = module.lora_B["default"].weight.double().norm(dim=0)
        assert rel(mine.lora_B.double().norm(dim=0), bn_peft) < 1e-2, key
        compared += 1
    assert compared == 7
    with torch.no_grad():
        x = batches[0]["input_ids"][:1]
        assert rel(ours(input_ids=x).logits, theirs(input_ids=x).logits) < 1e-4
