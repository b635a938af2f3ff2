"""CrossFormer and CrossFormer++ vision transformers for PyTorch and timm.

Importing this package registers the models with timm's factory
(``timm.create_model('crossformer_s')``).
"""
from .checkpoint import CheckpointError, convert_checkpoint, load_checkpoint, read_checkpoint
from .layers import CrossEmbedLayer, CrossFormerBlock, DynamicPosBias, GroupAttention, Stage
from .models import CrossFormer, checkpoint_filter_fn

__version__ = '0.1.0'

__all__ = [
    'CrossFormer', 'checkpoint_filter_fn',
    'CrossEmbedLayer', 'DynamicPosBias', 'GroupAttention', 'CrossFormerBlock', 'Stage',
    'CheckpointError', 'read_checkpoint', 'load_checkpoint', 'convert_checkpoint',
]
