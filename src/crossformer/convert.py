"""Converting a checkpoint of the reference implementation to this library's ``.safetensors``,
or to a Hub model folder."""
from pathlib import Path
from typing import Dict, Optional

import torch
from timm.data import ImageNetInfo

from .errors import ConfigError
from .files import PathLike
from .hub import model_card, paper_metrics, write_model_folder
from .models import check_variant, create_model
from .models.crossformer import checkpoint_filter_fn
from .weights import load_checkpoint, read_checkpoint, save_weights

__all__ = ['convert_checkpoint', 'convert_to_model_folder']


def convert_checkpoint(src: PathLike, dst: PathLike, model_name: str = '') -> Dict[str, torch.Tensor]:
    """Convert a checkpoint (reference or this layout) to this library's layout as ``.safetensors``.

    With ``model_name`` (e.g. ``'crossformer_s'``) the result is first loaded strictly into that
    variant, so a file that does not fit fails here rather than later. Returns the state dict.
    """
    if Path(dst).suffix != '.safetensors':
        raise ConfigError(f'the destination must end in .safetensors, got {dst}')
    state_dict = checkpoint_filter_fn(read_checkpoint(src))
    if model_name:
        head = state_dict.get('head.fc.weight')
        model = create_model(check_variant(model_name), num_classes=head.shape[0] if head is not None else 0)
        load_checkpoint(model, state_dict)
    save_weights(dst, state_dict)
    return state_dict


def convert_to_model_folder(src: PathLike, directory: PathLike, model_name: str,
                            label_names: Optional[list] = None) -> Path:
    """Convert a checkpoint into a Hub model folder for ``model_name`` (checked by a strict load).

    The folder's data settings are the variant's (ImageNet-1k at 224 unless the head says
    otherwise); a 1000-class head gets ImageNet-1k's class descriptions as ``label_names``. The
    model card gives the paper's figures, labelled as the paper's.
    """
    name = check_variant(model_name)
    state_dict = checkpoint_filter_fn(read_checkpoint(src))
    head = state_dict.get('head.fc.weight')
    num_classes = int(head.shape[0]) if head is not None else 0
    model = create_model(name, num_classes=num_classes)
    load_checkpoint(model, state_dict)
    cfg = model.pretrained_cfg
    data = dict(img_size=cfg['input_size'][-1], interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'],
                mean=cfg['mean'], std=cfg['std'])
    if label_names is None and num_classes == 1000:
        info = ImageNetInfo()
        label_names = [info.index_to_description(i) for i in range(1000)]
    dataset = 'ImageNet-1k' if num_classes == 1000 else f'{num_classes} classes'
    card = model_card(name, dataset=dataset, num_classes=num_classes,
                      metrics=paper_metrics(name) if num_classes == 1000 else None,
                      notes=[f'Converted with `crossformer convert` from `{Path(src).name}`, a checkpoint of the '
                             'reference implementation (github.com/cheerss/CrossFormer).', ''])
    return write_model_folder(directory, model.state_dict(), architecture=name, model_args={},
                              num_classes=num_classes, data=data, label_names=label_names, card=card)
