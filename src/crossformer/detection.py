"""CrossFormer backbones for torchvision's detectors: Faster R-CNN, Mask R-CNN and RetinaNet.

The paper's COCO experiments put a feature pyramid network (FPN) on the four stage outputs of
CrossFormer. This module does the same with torchvision's pieces:

    CrossFormerBackbone   image -> OrderedDict of NCHW stage maps (strides 4/8/16/32)
    CrossFormerFPN        image -> OrderedDict of FPN maps; what torchvision's detectors call a backbone
    *_crossformer         Faster R-CNN / Mask R-CNN / RetinaNet built on a CrossFormerFPN

Example::

    import torch
    from crossformer.detection import fasterrcnn_crossformer

    model = fasterrcnn_crossformer('crossformer_s', num_classes=91,
                                   pretrained_backbone_file='crossformer-s.pth').eval()
    detections = model([torch.rand(3, 480, 640)])  # [{'boxes', 'labels', 'scores'}]

Weights: no checkpoint is downloaded. Pass a classifier checkpoint published with the paper
(https://github.com/cheerss/CrossFormer), or a file of this library's layout, as
``pretrained_file`` / ``pretrained_backbone_file``.
"""
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7)

from .errors import ConfigError
from .files import PathLike
from .models.crossformer import CrossFormer
from .weights import load_checkpoint

__all__ = [
    'CrossFormerBackbone', 'CrossFormerFPN', 'crossformer_fpn_backbone', 'load_backbone_weights',
    'fasterrcnn_crossformer', 'maskrcnn_crossformer', 'retinanet_crossformer',
]

ModelArg = Union[str, CrossFormer]

# Parameters a backbone uses; the final norm, the classifier and a detector's neck and heads are not.
BACKBONE_PREFIXES = ('patch_embed.', 'layers.')


def load_backbone_weights(model: CrossFormer, path: PathLike) -> None:
    """Load the stem and stage weights of a checkpoint file into ``model``, strictly.

    The file may be a classifier checkpoint (reference or this library's layout) or a detector's
    (keys under ``backbone.``): keys outside the stem and stages are ignored, every stem and
    stage parameter of ``model`` must be in the file with its shape.
    """
    load_checkpoint(model, path, only=BACKBONE_PREFIXES)


def _trainable_to_frozen(trainable_stages: Optional[int], num_stages: int) -> int:
    """torchvision's ``trainable_layers`` counted on CrossFormer (stem + stages, from the last) as
    the number of leading parts to freeze: -1 none, ``k`` the stem and stages ``0 .. k-1``."""
    if trainable_stages is None:
        return -1
    if not 0 <= trainable_stages <= num_stages + 1:
        raise ConfigError(f'trainable_stages must be in [0, {num_stages + 1}] (stages from the last; '
                          f'{num_stages + 1} also trains the patch embedding), got {trainable_stages}')
    return num_stages - trainable_stages


class CrossFormerBackbone(nn.Module):
    """CrossFormer stage outputs as an ordered dict of NCHW maps, for detection and segmentation necks.

    ``(B, 3, H, W) -> OrderedDict({'0': (B, C_0, h_0, w_0), '1': ...})``: map ``'k'`` is the raw
    output of stage ``i = out_indices[k]``, with ``C_k = dims[i]`` channels (``out_channels[k]``)
    and ``h_k = ceil(H / s_k)``, ``w_k = ceil(W / s_k)`` at stride ``s_k = 4 * 2**i``
    (``strides[k]``). Any ``H, W >= 1`` is accepted: nothing needs to be a multiple of 32.
    Keys count the returned maps, as torchvision's ``IntermediateLayerGetter`` names them.

    The final norm and the classifier of the wrapped model are removed, and so are the stages
    after the last one returned.
    """

    def __init__(
            self,
            model: ModelArg = 'crossformer_t',
            *,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            trainable_stages: Optional[int] = None,
            norm_outputs: bool = False,
            pretrained_file: Optional[PathLike] = None,
            **model_kwargs: Any,
    ):
        """
        Args:
            model: a CrossFormer variant name (``'crossformer_t'``, ``'crossformerpp_s'``, ...) or a
                :class:`CrossFormer`. An instance is used, not copied: it is pruned in place.
            out_indices: the stages whose outputs are returned, increasing, in ``[0, num_stages)``.
            trainable_stages: how many of stem + stages are trained, counted from the last stage, as
                torchvision's ``trainable_layers``: None or ``num_stages + 1`` trains everything, 0
                nothing. Frozen parts get ``requires_grad=False`` and stay in eval mode (no
                drop-path) under ``train()``.
            norm_outputs: add a LayerNorm over channels to each returned map.
            pretrained_file: checkpoint whose stem and stage weights are loaded first
                (see :func:`load_backbone_weights`).
            **model_kwargs: passed to ``timm.create_model`` with a variant name (e.g. ``drop_path_rate``).
        """
        super().__init__()
        if isinstance(model, str):
            model = timm.create_model(model, num_classes=0, **model_kwargs)
        elif model_kwargs:
            raise ConfigError(f'model kwargs {sorted(model_kwargs)} can only be used with a variant name, '
                             f'not with a {type(model).__name__} instance')
        if not isinstance(model, CrossFormer):
            raise ConfigError(f'model must be a CrossFormer variant name or a CrossFormer, got {type(model).__name__}')
        num_stages = len(model.layers)
        out_indices = tuple(out_indices)
        valid = all(isinstance(i, int) and 0 <= i < num_stages for i in out_indices)
        if not out_indices or not valid or list(out_indices) != sorted(set(out_indices)):
            raise ConfigError(f'out_indices must be increasing stage indices in [0, {num_stages - 1}], got {out_indices}')
        frozen_stages = _trainable_to_frozen(trainable_stages, num_stages)

        model.prune_intermediate_layers(list(range(num_stages)), prune_norm=True, prune_head=True)
        if pretrained_file is not None:
            load_backbone_weights(model, pretrained_file)
        model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.model = model
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.out_channels: List[int] = [model.feature_info[i]['num_chs'] for i in out_indices]
        self.strides: List[int] = [model.feature_info[i]['reduction'] for i in out_indices]
        self.norms = nn.ModuleList([LayerNorm2d(c, eps=1e-5) for c in self.out_channels]) if norm_outputs else None

        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.model.patch_embed, *self.model.layers[:self.frozen_stages]]

    def train(self, mode: bool = True) -> 'CrossFormerBackbone':
        """Set train/eval mode as usual, but keep the frozen stages in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{'k': (B, out_channels[k], ceil(H / strides[k]), ceil(W / strides[k]))}``."""
        maps = self.model.forward_intermediates(
            x, indices=list(self.out_indices), stop_early=True, intermediates_only=True)
        if self.norms is not None:
            maps = [norm(m) for norm, m in zip(self.norms, maps)]
        return OrderedDict((str(k), m) for k, m in enumerate(maps))


class CrossFormerFPN(nn.Module):
    """A :class:`CrossFormerBackbone` followed by torchvision's ``FeaturePyramidNetwork``.

    ``(B, 3, H, W) -> OrderedDict`` of ``(B, out_channels, h_k, w_k)`` maps: one per backbone map,
    same keys and sizes, then the extra levels (``'pool'`` for ``LastLevelMaxPool``, ``'p6'``,
    ``'p7'`` for ``LastLevelP6P7``). The layout of torchvision's ``BackboneWithFPN``
    (``body``, ``fpn``, ``out_channels``), which its detectors expect.
    """

    def __init__(
            self,
            body: CrossFormerBackbone,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.out_channels, out_channels=out_channels,
            extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def crossformer_fpn_backbone(
        name: ModelArg = 'crossformer_t',
        *,
        trainable_stages: Optional[int] = None,
        returned_stages: Sequence[int] = (0, 1, 2, 3),
        extra_blocks: Union[str, ExtraFPNBlock, None] = 'pool',
        out_channels: int = 256,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        norm_outputs: bool = False,
        pretrained_file: Optional[PathLike] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> CrossFormerFPN:
    """A CrossFormer with an FPN on top, usable as ``backbone`` of torchvision's detectors.

    ``(B, 3, H, W) -> OrderedDict`` of ``(B, out_channels, ceil(H / s), ceil(W / s))`` maps, one per
    returned stage (stride ``s = 4 * 2**i``), then the extra levels.

    Args:
        name: CrossFormer variant name, or a :class:`CrossFormer` instance.
        trainable_stages: how many of stem + stages are trained, counted from the last stage, as
            torchvision's ``trainable_layers``: 0 freezes everything, ``num_stages + 1`` (5)
            nothing. Default: 3 with ``pretrained_file``, else all.
        returned_stages: stages fed to the FPN.
        extra_blocks: ``'pool'`` (``LastLevelMaxPool``, Faster/Mask R-CNN), ``'p6p7'``
            (``LastLevelP6P7`` from the last stage output, RetinaNet), an ``ExtraFPNBlock``, or None.
        out_channels: FPN width.
        norm_layer: norm inside the FPN convolutions (None: none, as torchvision).
        norm_outputs: LayerNorm over channels on each stage output before the FPN.
        pretrained_file: checkpoint for the CrossFormer (see :func:`load_backbone_weights`).
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``dict(drop_path_rate=0.2)``).
    """
    if isinstance(name, str):
        model = timm.create_model(name, num_classes=0, **(backbone_kwargs or {}))
    elif backbone_kwargs:
        raise ConfigError('backbone_kwargs can only be used with a variant name, not with a model instance')
    else:
        model = name
    if not isinstance(model, CrossFormer):
        raise ConfigError(f'name must be a CrossFormer variant name or a CrossFormer, got {type(model).__name__}')
    if trainable_stages is None and pretrained_file is not None:
        trainable_stages = 3  # as torchvision: the last stages train on top of pretrained weights
    body = CrossFormerBackbone(model, out_indices=returned_stages, trainable_stages=trainable_stages,
                               norm_outputs=norm_outputs, pretrained_file=pretrained_file)
    if isinstance(extra_blocks, str):
        if extra_blocks == 'pool':
            extra_blocks = LastLevelMaxPool()
        elif extra_blocks == 'p6p7':
            extra_blocks = LastLevelP6P7(body.out_channels[-1], out_channels)
        else:
            raise ConfigError(f"extra_blocks must be 'pool', 'p6p7', an ExtraFPNBlock or None, got {extra_blocks!r}")
    return CrossFormerFPN(body, out_channels=out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)


def _detector(detector: Type[nn.Module], name: ModelArg, num_classes: int, trainable_stages: Optional[int],
              pretrained_backbone_file: Optional[PathLike], norm_outputs: bool,
              backbone_kwargs: Optional[Dict[str, Any]], detector_kwargs: Dict[str, Any], **fpn: Any) -> nn.Module:
    backbone = crossformer_fpn_backbone(
        name, trainable_stages=trainable_stages, pretrained_file=pretrained_backbone_file,
        norm_outputs=norm_outputs, backbone_kwargs=backbone_kwargs, **fpn)
    return detector(backbone, num_classes=num_classes, **detector_kwargs)


def fasterrcnn_crossformer(
        name: ModelArg = 'crossformer_t',
        *,
        num_classes: int,
        trainable_stages: Optional[int] = None,
        pretrained_backbone_file: Optional[PathLike] = None,
        norm_outputs: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN on a CrossFormer + FPN backbone (stages 0-3 and a max-pooled level: strides 4-64).

    Args:
        name: CrossFormer variant name, or a :class:`CrossFormer` instance.
        num_classes: number of classes, background (label 0) included.
        trainable_stages: see :func:`crossformer_fpn_backbone`.
        pretrained_backbone_file: checkpoint for the CrossFormer (see :func:`load_backbone_weights`).
        norm_outputs: LayerNorm over channels on each stage output before the FPN (as mmdetection's
            Swin); the reference CrossFormer detectors have none.
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``dict(drop_path_rate=0.2)``).
        **detector_kwargs: passed to ``torchvision.models.detection.FasterRCNN`` (``min_size``,
            ``max_size``, ``rpn_anchor_generator``, ``box_score_thresh``, ...).

    Train mode: ``model(images, targets)`` -> dict of scalar losses. ``images``: list of
    ``(3, H_i, W_i)`` floats in [0, 1]; ``targets``: list of dicts with ``boxes`` ``(N_i, 4)``
    float ``x1, y1, x2, y2`` in pixels and ``labels`` ``(N_i,)`` int64.
    Eval mode: ``model(images)`` -> one dict per image: ``boxes`` ``(D, 4)``, ``labels`` ``(D,)``,
    ``scores`` ``(D,)``. The detector normalises the images (ImageNet mean and std) and resizes
    them to ``min_size`` / ``max_size`` (800 / 1333 by default).
    """
    return _detector(FasterRCNN, name, num_classes, trainable_stages, pretrained_backbone_file, norm_outputs,
                     backbone_kwargs, detector_kwargs)


def maskrcnn_crossformer(
        name: ModelArg = 'crossformer_t',
        *,
        num_classes: int,
        trainable_stages: Optional[int] = None,
        pretrained_backbone_file: Optional[PathLike] = None,
        norm_outputs: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on a CrossFormer + FPN backbone (stages 0-3 and a max-pooled level: strides 4-64).

    Arguments as :func:`fasterrcnn_crossformer`; ``**detector_kwargs`` go to
    ``torchvision.models.detection.MaskRCNN``. Inputs and outputs as there, plus instance masks:
    targets carry ``masks`` ``(N_i, H_i, W_i)`` uint8, detections ``masks`` ``(D, 1, H_i, W_i)``
    float in [0, 1].
    """
    return _detector(MaskRCNN, name, num_classes, trainable_stages, pretrained_backbone_file, norm_outputs,
                     backbone_kwargs, detector_kwargs)


def retinanet_crossformer(
        name: ModelArg = 'crossformer_t',
        *,
        num_classes: int,
        trainable_stages: Optional[int] = None,
        pretrained_backbone_file: Optional[PathLike] = None,
        norm_outputs: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
) -> RetinaNet:
    """RetinaNet on a CrossFormer + FPN backbone: stages 1-3, then P6 and P7 from the last stage's
    output (strides 8-128), as the paper's RetinaNet (mmdetection ``start_level=1``,
    ``add_extra_convs='on_input'``).

    Arguments, inputs and outputs as :func:`fasterrcnn_crossformer`; ``**detector_kwargs`` go to
    ``torchvision.models.detection.RetinaNet``.
    """
    return _detector(RetinaNet, name, num_classes, trainable_stages, pretrained_backbone_file, norm_outputs,
                     backbone_kwargs, detector_kwargs, returned_stages=(1, 2, 3), extra_blocks='p6p7')
