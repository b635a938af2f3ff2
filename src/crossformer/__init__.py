"""CrossFormer and CrossFormer++ vision transformers for PyTorch and timm.

Importing this package registers the models with timm's factory
(``timm.create_model('crossformer_s')``).
"""
from .convert import convert_checkpoint
from .errors import CheckpointError, ConfigError, CrossFormerError, InputError
from .layers import CrossEmbedLayer, CrossFormerBlock, DynamicPosBias, GroupAttention, Stage, set_cache_limits, set_speedups
from .models import CrossFormer, checkpoint_filter_fn
from .weights import load_checkpoint, read_checkpoint

__version__ = '0.1.0'

__all__ = [
    'CrossFormer', 'checkpoint_filter_fn', 'set_speedups', 'set_cache_limits',
    'CrossEmbedLayer', 'DynamicPosBias', 'GroupAttention', 'CrossFormerBlock', 'Stage',
    'CrossFormerError', 'ConfigError', 'CheckpointError', 'InputError',
    'read_checkpoint', 'load_checkpoint', 'convert_checkpoint',
]
