"""A tiny ImageFolder tree, a tiny CrossFormer config and the reference's checkpoint layout, for the tests."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossformer.train.config import load_config

DIGITS = load_config()

CLASSES = ('checks', 'horizontal', 'vertical')


def _pattern(name: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    period = int(rng.integers(2, 5))
    base = {'horizontal': yy // period % 2, 'vertical': xx // period % 2,
            'checks': (yy // period + xx // period) % 2}[name]
    img = base * 200 + rng.integers(0, 55, (size, size))
    return np.repeat(img[..., None], 3, axis=-1).astype(np.uint8)


def write_image_folder(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """``root/{train,val}/CLASS/*.png``: 16x16 stripes and checks, deterministic."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_pattern(name, rng)).save(folder / f'{i}.png')
    return root


# A CrossFormer small enough to train for a few steps in well under a second; it still has
# SDA and LDA blocks (stage 1: a 4x4 map, groups of 2, LDA interval 2).
TINY_MODEL = dict(embed_dim=16, depths=[2, 1, 1, 1], num_heads=[1, 1, 2, 2], group_size=2, interval=[2, 1, 1, 1])


def tiny_config(data_dir: Path, output: Path, **changes):
    """The digits recipe shrunk to the tiny folder data: 16 px, batch 4, 2 epochs."""
    return DIGITS.replace(**dict(dict(model_kwargs=TINY_MODEL, dataset='folder', data_dir=str(data_dir),
                                      output=str(output), img_size=16, batch_size=4, epochs=2, warmup_epochs=1,
                                      threads=None),  # leave the test process's thread count alone
                                 **changes))


def reference_layout(state_dict):
    """This library's keys -> the reference's: merges at the end of a stage, a bare head, v1's derived buffers."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'layers\.(\d+)\.downsample\.(projs|norm)\.(.*)', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2).replace("projs", "reductions")}.{m.group(3)}'
        out[k.replace('head.fc.', 'head.')] = v
        if k.endswith('attn.qkv.weight'):
            out[k.replace('qkv.weight', 'biases')] = torch.zeros(9, 2)
            out[k.replace('qkv.weight', 'relative_position_index')] = torch.zeros(4, 4, dtype=torch.long)
    return out
