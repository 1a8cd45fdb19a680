"""A model spread over two devices: every accumulator and every decomposition stays on its module's device.

Needs CUDA. With one GPU the split is cuda:0 + cpu (a real two-device model,
not accelerate's CPU offload, which moves weights to the GPU to run them); with
two GPUs it is cuda:0 + cuda:1. Results are compared with the same model on a
single device.
"""

import copy

import pytest
import torch
from conftest import CUDA
from tiny import padded_batches, rel, tiny_llama

import corda_kernels as ck

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (a second device to split the model over)")


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def split(model, second: str):
    """Embeddings and layer 0 on cuda:0; layer 1, the final norm and the head on ``second``.

    Pre-hooks move each block's inputs to its own device, as a device_map
    dispatcher does; nothing is offloaded.
    """
    inner = model.model
    inner.embed_tokens.to("cuda:0")
    inner.rotary_emb.to("cuda:0")
    inner.layers[0].to("cuda:0")
    for m in (inner.layers[1], inner.norm, model.lm_head):
        m.to(second)
        m.register_forward_pre_hook(
            lambda mod, args, kwargs, dev=second: (_move(args, dev), _move(kwargs, dev)), with_kwargs=True
        )
    return model


def _devices():
    return ["cpu"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])


@pytest.mark.parametrize("second", _devices())
def test_collect_and_build_keep_each_module_on_its_device(second):
    base = tiny_llama()
    batches = padded_batches(base.config.vocab_size, n_batches=3, seed=3)
    ref = ck.collect_cov(copy.deepcopy(base), batches, progress=False)  # one device (CPU)

    model = split(copy.deepcopy(base), second)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    home = {n: model.get_submodule(n).weight.device for n in names}
    assert {str(d) for d in home.values()} == {"cuda:0", torch.device(second).__str__()}

    covs = ck.collect_cov(model, batches, progress=False)
    for n in names:
        assert covs[n].device == home[n], n  # the accumulator lived where the module's input did
        assert rel(covs[n].cpu(), ref[n]) < 1e-5, n

    probe = batches[0]
    with torch.no_grad():
        before = model(**_move(probe, "cuda:0")).logits.cpu()
    ck.build_corda(model, covs, rank=4, mode="ipm")  # IPM: its leading components are well separated
    layers = ck.corda_layers(model)
    assert set(layers) == set(names)
    for n, layer in layers.items():
        for t in (layer.weight, layer.lora_A, layer.lora_B):
            assert t.device == home[n], n  # the decomposition ran on the module's device
    with torch.no_grad():
        after = model(**_move(probe, "cuda:0")).logits.cpu()
    assert rel(after, before) < 1e-5

    # The same adapters as on one device.
    single = copy.deepcopy(base)
    ck.build_corda(single, ref, rank=4, mode="ipm")
    for n, layer in ck.corda_layers(single).items():
        got = layers[n]
        prod = (got.lora_B.double() @ got.lora_A.double()).cpu()
        assert rel(prod, layer.lora_B.double() @ layer.lora_A.double()) < 1e-3, n


def test_accumulators_on_another_device_still_mask_flattened_views():
    # collect_cov(device="cpu") for a model on the GPU: each input is copied to the CPU before its
    # update, and a copy is no longer a view; the mask must still apply to a router's h.view(-1, d).
    from test_collect import _Router

    torch.manual_seed(0)
    model = _Router().to("cuda")
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    batch = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    with pytest.warns(UserWarning, match="patches"):
        covs = ck.collect_cov(model, [batch], progress=False, normalize="sum", device="cpu")
    h = model.emb(ids.cuda()).detach().double().cpu()
    kept = h[mask.bool()]
    assert covs["router"].device.type == "cpu"
    assert covs.token_counts["router"] == int(mask.sum())
    assert rel(covs["router"], kept.T @ kept) < 1e-5
