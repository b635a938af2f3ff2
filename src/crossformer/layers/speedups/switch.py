"""The one switch: every speed-up of a model on or off."""
from timm.layers import use_fused_attn
from torch import nn

from .caches import dpb_cache
from .gates import Speedup
from .mixins import AttentionSpeedups, PosBiasSpeedups
from .products import drop_packs

__all__ = ['set_speedups']


def set_speedups(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn every speed-up of ``model``'s CrossFormer layers on or off; returns ``model``.

    Off, every layer runs its definition, with explicit attention, and the model's packed weights
    and cached DPB biases are dropped; on, fused attention follows timm's ``use_fused_attn()``
    (``TIMM_FUSED_ATTN``).
    """
    for module in model.modules():
        if isinstance(module, Speedup):
            module.speedups = enabled
        if not enabled:
            drop_packs(module)
            if isinstance(module, PosBiasSpeedups):
                dpb_cache.discard(lambda key, module=module: key[0]() is module)
        if isinstance(module, AttentionSpeedups):
            module.fused_attn = enabled and use_fused_attn()
    return model
