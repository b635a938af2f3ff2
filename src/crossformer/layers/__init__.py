"""Building blocks of CrossFormer; no model registry here.

Each layer's ``forward`` is the definition; :mod:`.speedups` holds every eager-only speed-up and
``set_speedups(model, False)`` turns them all off.
"""
from .attention import GroupAttention, dpb_hidden_dim, group_attention
from .block import CrossFormerBlock, Stage, has_cooling
from .cross_embed import CrossEmbedLayer, split_dims
from .grouping import MASK_VALUE, build_padding_mask, group_layout, group_tokens, ungroup_tokens
from .pos_bias import DynamicPosBias, gather_bias, relative_offsets, relative_position_index
from .speedups import capturing, gelu_linear, set_cache_limits, set_speedups, space_to_depth_conv

__all__ = [
    'CrossEmbedLayer', 'split_dims',
    'DynamicPosBias', 'relative_offsets', 'relative_position_index', 'gather_bias',
    'group_layout', 'group_tokens', 'ungroup_tokens', 'build_padding_mask', 'MASK_VALUE',
    'GroupAttention', 'dpb_hidden_dim', 'group_attention',
    'CrossFormerBlock', 'Stage', 'has_cooling',
    'set_speedups', 'set_cache_limits', 'capturing', 'gelu_linear', 'space_to_depth_conv',
]
