"""Building models by name, with errors that name close matches; their default normalization."""
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torch import nn

from ..errors import ConfigError
from ..files import did_you_mean

__all__ = ['variant_names', 'check_variant', 'create_model', 'default_normalization']


def variant_names() -> List[str]:
    """The CrossFormer variants registered with timm (``crossformer_t`` ... ``crossformerpp_h``)."""
    return timm.list_models('crossformer*')


def check_variant(name: str) -> str:
    """``name`` if it is a CrossFormer variant, else a :class:`ConfigError` naming close matches."""
    names = variant_names()
    if name not in names:
        raise ConfigError(f'unknown model {name!r}{did_you_mean(name, names, cutoff=0.5)} Known: {", ".join(names)}')
    return name


def create_model(model: str, num_classes: int, model_kwargs: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model(model, num_classes=..., **model_kwargs, **kwargs)`` (``None`` kwargs left out),
    with a :class:`ConfigError` for an unknown model name or constructor argument."""
    if not timm.is_model(model):
        raise ConfigError(f'unknown model {model!r}{did_you_mean(model, timm.list_models())} '
                          f'CrossFormer models: {", ".join(variant_names())}')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return timm.create_model(model, num_classes=num_classes, **dict(model_kwargs or {}), **kwargs)
    except TypeError as e:  # an unknown constructor argument
        raise ConfigError(f'model {model!r} does not accept these arguments: {e}') from None


def default_normalization(model: str) -> Dict[str, Tuple[float, ...]]:
    """``mean`` and ``std`` of the model's timm pretrained config, else ImageNet's."""
    cfg = get_pretrained_cfg(model, allow_unregistered=True)
    return dict(mean=tuple(getattr(cfg, 'mean', None) or IMAGENET_DEFAULT_MEAN),
                std=tuple(getattr(cfg, 'std', None) or IMAGENET_DEFAULT_STD))
