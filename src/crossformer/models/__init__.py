"""Networks, their timm registration, and building them by name."""
from .crossformer import CrossFormer, checkpoint_filter_fn
from .factory import check_variant, create_model, default_normalization, variant_names

__all__ = ['CrossFormer', 'checkpoint_filter_fn', 'check_variant', 'create_model', 'default_normalization',
           'variant_names']
