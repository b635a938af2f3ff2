"""Building blocks of CrossFormer; no model registry here."""
from .attention import GroupAttention, dpb_hidden_dim
from .block import CrossFormerBlock, Stage, has_cooling
from .capture import capturing
from .cross_embed import CrossEmbedLayer, space_to_depth_conv, split_dims
from .grouping import MASK_VALUE, group_layout, group_tokens, padding_mask, ungroup_tokens
from .mlp import LeanMlp, gelu_linear
from .pos_bias import DynamicPosBias, relative_offsets, relative_position_index

__all__ = [
    'capturing',
    'CrossEmbedLayer', 'space_to_depth_conv', 'split_dims',
    'DynamicPosBias', 'relative_offsets', 'relative_position_index',
    'group_layout', 'group_tokens', 'ungroup_tokens', 'padding_mask', 'MASK_VALUE',
    'GroupAttention', 'dpb_hidden_dim',
    'LeanMlp', 'gelu_linear',
    'CrossFormerBlock', 'Stage', 'has_cooling',
]
