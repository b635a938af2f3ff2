"""Train transformers' UperNet on a CrossFormer-T backbone to segment circles, squares and triangles.

A CPU-sized demonstration of CrossFormer as a Hugging Face transformers backbone: transformers
builds it through its timm path (``TimmBackboneConfig``; ``import crossformer`` registers the
models with timm) and puts its UperNet head (PSP + FPN, Xiao et al. 2018) on the four stages
(strides 4-32). The images are generated on the fly: 64x64, 1-8 non-overlapping circles,
squares and triangles of 10-28 px (log-uniform) in random colours on a noisy plain background,
as in detect_shapes.py but denser. Every pixel is background or one of the three shapes. The
backbone starts from random weights (nothing is downloaded), so the model learns everything here.
At the end it reports the IoU of each class and their mean (mIoU, background included) on
held-out images, and draws a few of them with their ground truth and prediction into a PNG. The
run is deterministic given ``--seed`` and the number of threads (``OMP_NUM_THREADS``, else the
usable cores).

The backbone is CrossFormer-T's architecture (cross-scale embeddings, group size 7, LDA
intervals 8/4/2/1) narrowed and shortened for a CPU: widths 32/64/128/256 and 1/1/2/2 blocks
(CrossFormer-T: 64-512 and 1/1/8/6), no stochastic depth; it is registered below with timm as
``crossformer_t_narrow`` because transformers' backbone config has no field for timm model
arguments. ``--backbone crossformer_t`` trains the full CrossFormer-T instead (3.5 times slower
a step; with its stochastic depth, 0.1). The head is 64 channels wide, without UperNet's auxiliary FCN head.

What mattered (runs of 1 thread; mIoU on 32 held-out images of each run's own scenes):
- the loss. UperNet's built-in loss (``labels=``: cross-entropy plus 0.4 x that of an auxiliary
  FCN head) let the background, 86% of the pixels of scenes like detect_shapes.py's (1-4 shapes
  of 8-40 px), dominate: after 2000 steps mIoU 0.54 (circles 0.01). Cross-entropy on the logits
  with the shapes weighted 3 times: 0.76 (weight 5: no better).
- width and depth against time. A step of 8 images takes 0.39 s on one core with the full
  CrossFormer-T, 0.11 s with the narrow one. Widths 48-384 learnt more a step but less a second
  (0.59 after 1200 steps against 0.80 after 1500, in about the same time); 1/1/8/6 blocks at
  width 32 learnt no faster a step.
- the scenes: more shapes give more labelled shape pixels a step, and below ~10 px a circle and
  a square differ by a pixel or two at stride 4. 1500 steps: 1-6 shapes of 8-32 px 0.80, 1-8 of
  8-28 px 0.76, 1-8 of 10-28 px 0.87 (seed 1: 0.86).
- the learning rate: 5e-4 (3e-4: 0.64 against 0.80; 1e-3 with 100 warm-up steps: 0.71 against 0.76), 50 warm-up steps,
  cosine decay to 0.
Circles and squares are told apart last (between steps 750 and 1000); boundaries are rounded
because the logits are computed at stride 4 and upsampled.

Measured on a 2-core CPU (``OMP_NUM_THREADS=2 python examples/segment_shapes.py``): 1500 steps
of 8 images in 162-186 s (2 min 49 s - 3 min 14 s in all, two runs), loss (mean of 10 steps)
1.368 -> 0.154; on 64 held-out images mIoU 0.886: background 0.974, circle 0.866, square 0.870,
triangle 0.837 (pixel accuracy 0.974). The second run gave the same numbers and the same PNG.
Shapes that touch tend to merge, and a few low-contrast ones are missed.

    python examples/segment_shapes.py                      # 1500 steps: ~3 minutes on 2 cores
    python examples/segment_shapes.py --steps 3000         # longer training
    python examples/segment_shapes.py --steps 20           # a quick check
"""
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F
from timm.models import model_entrypoint, register_model
from torchvision.utils import make_grid, save_image
from transformers import TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation

import crossformer  # noqa: F401  (registers the CrossFormer models with timm, through which transformers builds them)
from shapes import CLASSES, SIZE, make_scene, seeded, train, training_arguments  # examples/shapes.py

PALETTE = torch.tensor([(0, 0, 0), (255, 0, 0), (255, 255, 0), (0, 255, 255)]) / 255  # black, red, yellow, cyan
STEPS, BATCH, LR = 1500, 8, 5e-4  # the default run
SHAPE_WEIGHT = 3.0  # cross-entropy weight of the shape classes (background: 1)
MEAN, STD = 0.5, 0.3  # the generated images' statistics, not ImageNet's

# CrossFormer-T narrowed (widths 32-256 instead of 64-512) and shortened (1/1/2/2 blocks instead of 1/1/8/6)
NARROW_T = dict(embed_dim=32, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


@register_model
def crossformer_t_narrow(pretrained: bool = False, **kwargs):
    """CrossFormer-T's design at half width and 6 blocks, for CPU demonstrations; no published weights."""
    if pretrained:
        raise ValueError('crossformer_t_narrow has no pretrained weights')
    return model_entrypoint('crossformer_t')(pretrained=False, **dict(NARROW_T, **kwargs))


# ---------------------------------------------------------------- data

def make_image(gen: torch.Generator, size: int = SIZE, min_side: int = 10, max_side: int = 28,
               max_shapes: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ``(3, size, size)`` image in [0, 1] and its ``(size, size)`` int64 label map (0 background, 1-3 shapes)."""
    image, shapes = make_scene(gen, size, min_side, max_side, max_shapes)
    labels = torch.zeros(size, size, dtype=torch.int64)
    for kind, mask in shapes:
        labels[mask] = kind
    return image, labels


def make_batch(gen: torch.Generator, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(make_image(gen) for _ in range(n)))
    return torch.stack(images), torch.stack(labels)


# ---------------------------------------------------------------- metric

def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` pixel counts over all images; rows: true class, columns: predicted class."""
    return torch.bincount(target.flatten() * num_classes + predicted.flatten(),
                          minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> List[float]:
    """Intersection over union of each class, over all pixels of all images: TP / (TP + FP + FN)."""
    tp = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return (tp / union.clamp(min=1)).tolist()


# ---------------------------------------------------------------- main

def build_model(backbone: str = 'crossformer_t_narrow', hidden_size: int = 64) -> UperNetForSemanticSegmentation:
    """UperNet (``hidden_size`` channels) on the backbone's four stages (strides 4, 8, 16, 32), from random weights."""
    config = UperNetConfig(
        backbone_config=TimmBackboneConfig(backbone=backbone, out_indices=(0, 1, 2, 3), use_pretrained_backbone=False),
        hidden_size=hidden_size, use_auxiliary_head=False,  # the auxiliary head only serves the built-in loss
        num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return UperNetForSemanticSegmentation(config)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the shapes weighted ``SHAPE_WEIGHT`` times the background (most of the pixels)."""
    weight = torch.tensor([1.0] + [SHAPE_WEIGHT] * (len(CLASSES) - 1))
    return F.cross_entropy(logits, labels, weight=weight)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [0, 1] -> ``(N, H, W)`` predicted classes."""
    return torch.cat([model(pixel_values=(images[i:i + batch] - MEAN) / STD).logits.argmax(1)
                      for i in range(0, len(images), batch)])


def draw(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor, path: Path, scale: int = 3) -> None:
    """Save, for each image, the image, its ground truth and the prediction side by side (upscaled ``scale``
    times; black background, red circles, yellow squares, cyan triangles), two images a row."""
    tiles = []
    for image, t, p in zip(images, truth, predicted):
        gap = torch.ones(3, image.shape[1], 2)
        tiles.append(torch.cat([image, gap, PALETTE[t].permute(2, 0, 1), gap, PALETTE[p].permute(2, 0, 1)], dim=2))
    grid = make_grid(tiles, nrow=2, padding=4, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(F.interpolate(grid[None], scale_factor=scale, mode='nearest')[0], path)


def main() -> None:
    parser = training_arguments(__doc__.split('\n\n')[0], STEPS, BATCH, LR, eval_images=64)
    parser.add_argument('--backbone', default='crossformer_t_narrow',
                        help='timm name of the backbone (default crossformer_t_narrow; crossformer_t: the full one)')
    parser.add_argument('--out', '--output', type=Path,
                        default=Path(__file__).resolve().parent / 'segment_shapes_predictions.png')
    args = parser.parse_args()

    train_gen, eval_gen = seeded(args.seed)
    model = build_model(args.backbone)

    def batch_loss() -> torch.Tensor:
        images, labels = make_batch(train_gen, args.batch_size)
        return loss_fn(model(pixel_values=(images - MEAN) / STD).logits, labels)

    train(model, batch_loss, args.steps, args.batch_size, args.lr, warmup=50)

    model.eval()
    images, labels = make_batch(eval_gen, args.eval_images)
    predicted = predict(model, images)
    ious = iou_per_class(confusion_matrix(predicted, labels, len(CLASSES)))
    per_class = ', '.join(f'{c} {iou:.3f}' for c, iou in zip(CLASSES, ious))
    print(f'held-out: {len(images)} images: mIoU {sum(ious) / len(ious):.3f} ({per_class}); '
          f'pixel accuracy {(predicted == labels).double().mean():.3f}')
    shown = min(8, len(images))
    draw(images[:shown], labels[:shown], predicted[:shown], args.out)
    print(f'image | ground truth | prediction (black background, red circle, yellow square, cyan triangle) '
          f'for {shown} held-out images: {args.out}')


if __name__ == '__main__':
    main()
