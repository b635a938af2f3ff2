"""Fine-tuning, measured offline: pretrain on the digits 0-4, fine-tune on 5-9 from 20 images per class.

Writes ImageFolder trees of scikit-learn's 8x8 hand-written digits (PNG files), then
1. pretrains the digits recipe's reduced CrossFormer (1.7M parameters, 32 px) on the digits 0-4;
2. fine-tunes it on the digits 5-9 with 20 training images per class, with the fine-tuning recipe
   (``configs/finetune.yaml``: its optimizer, layer-wise lr decay, schedule and regularisation), its
   data settings shrunk to the digits (32 px, no flips, the digits recipe's light crops);
3. runs the same fine-tuning from random weights;
and prints the validation top-1 (the 5-9 images not trained on, 796 of them) and the run time of
each, and before each fine-tuning a linear probe of its starting features (logistic regression on
the pooled features of the 100 training images, scored on the same validation images).

    python examples/finetune_digits.py                 # about 4 minutes on 2 shared CPU cores
    python examples/finetune_digits.py --quick         # a few seconds: fewer images and epochs (the test)
    python examples/finetune_digits.py lr=1e-3         # overrides for both fine-tuning runs

The same steps on your own images are three commands (see the README): ``crossformer train
--data-dir DIR --pretrained FILE`` and ``crossformer predict``.
"""
import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossformer.train import DIGITS_RECIPE, FINETUNE_RECIPE, Trainer, load_config, parse_overrides, train
from crossformer.train.data import build_datasets, build_transform

TRAIN_PER_CLASS = 20
PRETRAIN_CLASSES, FINETUNE_CLASSES = range(0, 5), range(5, 10)
DIGIT_DATA = dict(img_size=32, interpolation='bilinear', crop_pct=1.0, scale=[0.75, 1.0], ratio=[0.9, 1.1],
                  hflip=0.0, color_jitter=0.0, auto_augment=None, workers=0, threads=1, amp=False)


def write_folders(root: Path, quick: bool) -> tuple:
    """``root/pretrain`` (0-4, every fifth image held out) and ``root/finetune`` (5-9: 20 per class to train on)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype('uint8')
    seen = {label: 0 for label in range(10)}
    for index, label in enumerate(digits.target.tolist()):
        if label in PRETRAIN_CLASSES:
            split = 'val' if index % 5 == 0 else 'train'
            tree = 'pretrain'
        else:
            split = 'train' if seen[label] < TRAIN_PER_CLASS else 'val'
            tree = 'finetune'
        seen[label] += 1
        if quick and seen[label] > TRAIN_PER_CLASS + 4:
            continue
        folder = root / tree / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(pixels[index][..., None], 3, axis=-1)).save(folder / f'{index}.png')
    return root / 'pretrain', root / 'finetune'


def timed(cfg):
    start = time.perf_counter()
    trainer = train(cfg, progress=False)
    return trainer, time.perf_counter() - start


@torch.no_grad()
def linear_probe(trainer: Trainer) -> float:
    """Val accuracy (%) of a logistic regression on the model's pooled features, train images unaugmented."""
    from sklearn.linear_model import LogisticRegression
    model, cfg = trainer.model.eval(), trainer.cfg
    plain = build_transform(cfg, dict(mean=trainer.mean, std=trainer.std), training=False)
    data = build_datasets(cfg, plain, plain)

    def features(dataset):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        pooled = model.forward_head(model.forward_features(torch.stack(images)), pre_logits=True)
        return pooled.numpy(), np.array(labels)

    probe = LogisticRegression(max_iter=5000).fit(*features(data.train))
    return 100.0 * probe.score(*features(data.val))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='outputs/finetune_digits', help='where the folders and runs go')
    parser.add_argument('--quick', action='store_true', help='a few images and epochs: checks that it runs')
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='fine-tuning config overrides')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.output)
    pretrain_dir, finetune_dir = write_folders(out / 'data', args.quick)
    epochs = dict(pretrain=1, finetune=2) if args.quick else dict(pretrain=15, finetune=30)

    digits = load_config(DIGITS_RECIPE)
    pretrain = load_config(DIGITS_RECIPE, dict(dataset='folder', data_dir=str(pretrain_dir), epochs=epochs['pretrain'],
                                               output=str(out / 'pretrain')))
    trainer, seconds = timed(pretrain)
    print(f'pretrained on 0-4: val top-1 {trainer.best["top1"]:.2f}% after {trainer.epoch} epochs, {seconds:.1f} s')

    # the fine-tuning recipe with the digits' model and data settings; a folder run is a model folder
    common = dict(DIGIT_DATA, model=digits.model, model_kwargs=digits.model_kwargs, data_dir=str(finetune_dir),
                  epochs=epochs['finetune'], **parse_overrides(args.overrides))
    for start, weights in (('pretrained', str(out / 'pretrain')), ('random', None)):
        cfg = load_config(FINETUNE_RECIPE, dict(common, initial_checkpoint=weights, output=str(out / start)))
        probe = linear_probe(Trainer(cfg, progress=False))
        print(f'{start} weights: linear probe of the starting features {probe:.2f}%')
        trainer, seconds = timed(cfg)
        last = trainer.history[-1]
        print(f'{start} weights: val top-1 {last["val_top1"]:.2f}% after {trainer.epoch} epochs, {seconds:.1f} s')


if __name__ == '__main__':
    main()
