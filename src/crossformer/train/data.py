"""Datasets, transforms and loaders for training and validation.

Two sources:
- ``digits``: the 8x8 hand-written digits that ship with scikit-learn (1,797 images, 10
  classes), as RGB PIL images, so no download is needed. A fixed split: every fifth image
  (index % 5 == 0, 360 images) is validation, the other 1,437 are training.
- ``folder``: an ImageFolder tree ``DIR/train/CLASS/*.jpg`` and ``DIR/val/CLASS/*.jpg``, read by
  timm's ``create_dataset``. Validation uses the training class indices.

Transforms are timm's ``create_transform``; shuffling is a ``DistributedSampler`` in every case
(one replica when not distributed), so the order of an epoch depends only on the seed and the
epoch, and a resumed or a multi-process run sees the same global batches.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..errors import ConfigError, MissingExtraError
from .config import TrainConfig

__all__ = ['DigitsDataset', 'Datasets', 'build_datasets', 'build_transform', 'train_loader', 'val_loader',
           'VAL_SPLITS']

VAL_SPLITS = ('val', 'validation', 'eval', 'test')


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as ``(PIL RGB image, label)``; ``split`` is 'train' or 'val'."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', transform=None):
        if split not in ('train', 'val'):
            raise ConfigError(f"digits split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise MissingExtraError("the embedded digits dataset needs scikit-learn: pip install 'crossformer[train]' "
                              "(or pass --data-dir with an ImageFolder tree)") from None
        digits = load_digits()
        keep = [i for i in range(len(digits.target)) if (i % 5 == 0) == (split == 'val')]
        pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype('uint8')  # 0..16 -> 0..255
        self.images = [Image.fromarray(pixels[i]).convert('RGB') for i in keep]
        self.targets = [int(digits.target[i]) for i in keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


@dataclass
class Datasets:
    train: Optional[Dataset]
    val: Dataset
    class_names: List[str]


def _split_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f'{root} has no {" or ".join(repr(n + "/") for n in names)} folder; expected an ImageFolder '
                      f'tree: {root}/train/CLASS/*.jpg and {root}/val/CLASS/*.jpg')


def _folder(path: Path, transform, class_map: Optional[Dict[str, int]] = None):
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f'{path} has no class folders; expected {path}/CLASS/*.jpg')
    if class_map is not None:
        unknown = sorted(set(classes) - set(class_map))
        if unknown:
            raise ConfigError(f'{path} has classes that are not among the {len(class_map)} known ones '
                              f'(training set or checkpoint): {", ".join(unknown[:10])}')
    try:
        ds = create_dataset('', root=str(path), split='', search_split=False, class_map=class_map or None)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise ConfigError(f'{path}: empty dataset ({e})') from None
    if len(ds) == 0:
        raise ConfigError(f'{path}: empty dataset, no images found in its class folders')
    ds.transform = transform
    return ds


def build_datasets(cfg: TrainConfig, train_transform, val_transform, train: bool = True,
                   class_names: Optional[Sequence[str]] = None) -> Datasets:
    """Training (if ``train``) and validation datasets for ``cfg.dataset``.

    ``class_names`` (from a checkpoint) fixes the class indices of a folder dataset.
    """
    if cfg.dataset == 'digits':
        return Datasets(DigitsDataset('train', train_transform) if train else None,
                        DigitsDataset('val', val_transform), list(DigitsDataset.classes))
    if not cfg.data_dir:
        raise ConfigError("dataset 'folder' needs a data directory: pass --data-dir DIR (or data_dir=DIR)")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise ConfigError(f'data directory {root} does not exist')
    class_map = {name: i for i, name in enumerate(class_names)} if class_names else None
    train_ds = None
    if train:
        train_ds = _folder(_split_dir(root, ('train',)), train_transform, class_map)
        class_map = dict(train_ds.reader.class_to_idx)
    val_ds = _folder(_split_dir(root, VAL_SPLITS), val_transform, class_map)
    class_map = class_map or dict(val_ds.reader.class_to_idx)
    return Datasets(train_ds, val_ds, [name for name, _ in sorted(class_map.items(), key=lambda kv: kv[1])])


def build_transform(cfg: TrainConfig, data_config: Dict[str, Any], training: bool):
    """timm's train or eval transform; ``data_config`` gives mean, std (see ``resolve_data_config``)."""
    common = dict(input_size=cfg.img_size, interpolation=cfg.interpolation,
                  mean=tuple(cfg.mean or data_config['mean']), std=tuple(cfg.std or data_config['std']))
    if not training:
        return create_transform(**common, crop_pct=cfg.crop_pct)
    return create_transform(
        **common, is_training=True, no_aug=cfg.no_aug, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
        re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)


def train_loader(dataset: Dataset, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> DataLoader:
    """Shuffled batches of ``cfg.batch_size``, the last incomplete one dropped.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. Rank ``r`` of ``n`` takes
    positions ``r, r + n, ...`` of the epoch's permutation, so the union of the ranks' k-th
    batches is the k-th batch of a single process with ``n * batch_size``.
    """
    if len(dataset) < cfg.batch_size * world_size:
        raise ConfigError(f'the training set has {len(dataset)} images, fewer than one global batch '
                          f'({cfg.batch_size} x {world_size} processes); lower batch_size')
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=False)


def val_loader(dataset: Dataset, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> DataLoader:
    """This rank's share of the validation set (every ``world_size``-th image, none repeated)."""
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=cfg.val_batch_size or 2 * cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers, pin_memory=pin_memory)
