"""Semantic segmentation with a CrossFormer backbone and a light FPN head.

The head follows the semantic branch of Panoptic FPN (Kirillov et al., arXiv:1901.02446), as the
paper's "Semantic FPN" experiments on ADE20K do, simplified to one 3x3 convolution per level:

    stage maps (strides 4/8/16/32) -> FPN -> 3x3 conv + GroupNorm + ReLU per level
    -> upsample to stride 4 and sum -> 1x1 classifier -> bilinear upsample to the input size

Example::

    from crossformer.segmentation import CrossFormerSegmenter

    model = CrossFormerSegmenter('crossformer_s', num_classes=150, pretrained_file='crossformer-s.pth')
    logits = model(images)  # (B, 3, H, W) normalised images -> (B, 150, H, W)
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from .detection import CrossFormerBackbone, ModelArg
from .errors import ConfigError
from .files import PathLike

__all__ = ['FPNSegmentationHead', 'CrossFormerSegmenter']

GROUPS = 32  # GroupNorm groups, as Panoptic FPN


class FPNSegmentationHead(nn.Module):
    """Per-pixel class logits from a pyramid of maps.

    ``{'0': (B, C_0, h_0, w_0), '1': ...}``, finest map first (each one about half the size of the
    previous) -> ``(B, num_classes, h_0, w_0)`` logits at the finest map's resolution.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128, dropout: float = 0.1):
        """
        Args:
            in_channels: channels of each input map, finest first.
            num_classes: number of output classes.
            channels: width of the FPN and of the fused map; a multiple of 32 (GroupNorm groups).
            dropout: dropout before the classifier.
        """
        super().__init__()
        if channels % GROUPS:
            raise ConfigError(f'channels must be a multiple of {GROUPS} (GroupNorm groups), got {channels}')
        if num_classes < 1:
            raise ConfigError(f'num_classes must be >= 1, got {num_classes}')
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.fuse = nn.ModuleList([
            Conv2dNormActivation(channels, channels, 3, norm_layer=partial(nn.GroupNorm, GROUPS))
            for _ in in_channels
        ])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        maps = list(self.fpn(features).values())  # each (B, channels, h_k, w_k)
        size = maps[0].shape[-2:]
        x = self.fuse[0](maps[0])
        for conv, m in zip(self.fuse[1:], maps[1:]):
            x = x + F.interpolate(conv(m), size=size, mode='bilinear', align_corners=False)
        return self.classifier(self.dropout(x))  # B, num_classes, h_0, w_0


class CrossFormerSegmenter(nn.Module):
    """CrossFormer backbone + :class:`FPNSegmentationHead`.

    ``(B, 3, H, W)`` normalised images (ImageNet mean and std) -> ``(B, num_classes, H, W)`` logits,
    bilinearly upsampled from stride 4. Any ``H, W >= 1``; train with
    ``F.cross_entropy(logits, (B, H, W) int64 labels)``.
    """

    def __init__(
            self,
            model: ModelArg = 'crossformer_t',
            *,
            num_classes: int,
            channels: int = 128,
            dropout: float = 0.1,
            trainable_stages: Optional[int] = None,
            pretrained_file: Optional[PathLike] = None,
            **model_kwargs: Any,
    ):
        """
        Args:
            model: a CrossFormer variant name or a :class:`CrossFormer` instance.
            num_classes: number of classes.
            channels, dropout: see :class:`FPNSegmentationHead`.
            trainable_stages, pretrained_file, model_kwargs: see :class:`CrossFormerBackbone`.
        """
        super().__init__()
        self.backbone = CrossFormerBackbone(
            model, trainable_stages=trainable_stages, pretrained_file=pretrained_file, **model_kwargs)
        self.head = FPNSegmentationHead(self.backbone.out_channels, num_classes, channels=channels, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))  # B, num_classes, ceil(H/4), ceil(W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
