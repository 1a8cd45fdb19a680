"""A PEFT LoRA ``Linear`` around a given ``nn.Linear``, built through PEFT's public API.

``peft.tuners.lora.layer.Linear``'s constructor changed between releases (a
``config`` argument arrived in late 2025), so the benchmarks never call it
directly: they wrap the base layer in a one-child module and let
``get_peft_model`` build the adapter, whichever PEFT version is installed.
"""

from __future__ import annotations

from torch import nn


class _Holder(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x)


def peft_lora_linear(base: nn.Linear, r: int, alpha: float | None = None) -> nn.Module:
    """PEFT's LoRA layer wrapping ``base`` (frozen), rank ``r``, no dropout, lora_B left at PEFT's zeros."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=0.0, target_modules=["base"])
    model = get_peft_model(_Holder(base), cfg)
    layer = model.base_model.model.base
    layer.base_layer.requires_grad_(False)
    return layer
