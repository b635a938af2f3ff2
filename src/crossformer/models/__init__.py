"""Networks and their timm registration."""
from .crossformer import CrossFormer, checkpoint_filter_fn

__all__ = ["CrossFormer", "checkpoint_filter_fn"]
