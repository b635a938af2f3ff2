"""CrossFormer and CrossFormer++.

- CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention (ICLR 2022),
  https://arxiv.org/abs/2108.00154
- CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention (TPAMI),
  https://arxiv.org/abs/2303.06908

The weights published with the papers (MIT license) are linked from
https://github.com/cheerss/CrossFormer; pass a downloaded file with
``pretrained_cfg_overlay=dict(file=PATH)``. ``checkpoint_filter_fn`` maps their layout to this one.
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import ClassifierHead, get_device_dtype, to_ntuple, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg

from ..errors import CheckpointError, ConfigError, InputError
from ..layers import CrossEmbedLayer, Stage
from ..layers.grouping import contiguous_if_exporting
from ..weights import load_checkpoint

__all__ = ['CrossFormer', 'checkpoint_filter_fn', 'check_file_model_args', 'FILE_MODEL_ARGS', 'PAPER_RESULTS']

WEIGHTS_URL = 'https://github.com/cheerss/CrossFormer#model-zoo'


def check_image(x: torch.Tensor, in_chans: int) -> None:
    """Raise an error naming what is wrong with an input batch: ``(B, in_chans, H, W)`` floats."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise InputError('expected an image batch of shape (B, ' + str(in_chans) + ', H, W), got shape '
                         + str(list(x.shape)))
    if not x.is_floating_point():
        raise InputError('expected a floating-point image batch, got ' + str(x.dtype))
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise InputError('expected images of at least 1 x 1 pixels (every size from 1 x 1 up is accepted), got '
                         + str(x.shape[2]) + ' x ' + str(x.shape[3]))


torch.fx.wrap('check_image')


def _stage_settings(embed_dim, depths, num_heads, group_size, interval) -> Tuple[List[int], ...]:
    """Per-stage widths, group sizes and intervals, checked; errors name the argument at fault."""
    num_stages = len(depths)
    if num_stages < 1:
        raise ConfigError('depths must have one entry per stage, got none')
    if isinstance(embed_dim, (list, tuple)):
        dims = list(embed_dim)
    else:
        dims = [embed_dim * 2 ** i for i in range(num_stages)]  # doubled at each stage
    per_stage = dict(embed_dim=dims, depths=depths, num_heads=num_heads,
                     group_size=to_ntuple(num_stages)(group_size), interval=to_ntuple(num_stages)(interval))
    for name, value in per_stage.items():
        if len(value) != num_stages:
            raise ConfigError(f'{name} has {len(value)} entries but depths has {num_stages} stages')
        if not all(isinstance(v, int) for v in value):
            raise ConfigError(f'{name} must be integers, got {tuple(value)}')
    group_size, interval = per_stage['group_size'], per_stage['interval']
    if min(group_size) < 1 or min(interval) < 1:
        raise ConfigError(f'group_size and interval must be >= 1, got {tuple(group_size)} and {tuple(interval)}')
    for name in ('depths', 'num_heads'):
        if min(per_stage[name]) < 1:
            raise ConfigError(f'{name} must be integers >= 1, got {tuple(per_stage[name])}')
    return dims, list(group_size), list(interval)


def _check_settings(stem_kernel_sizes, merge_kernel_sizes, in_chans, stem_stride, num_classes, mlp_ratio,
                    rates: Dict[str, float]) -> None:
    """The model-wide arguments; widths and heads are checked by the layers that use them."""
    for name, kernels in (('stem_kernel_sizes', stem_kernel_sizes), ('merge_kernel_sizes', merge_kernel_sizes)):
        if len(kernels) == 0:
            raise ConfigError(f'{name} needs at least one kernel size')
    if in_chans < 1 or stem_stride < 1:
        raise ConfigError(f'in_chans and stem_stride must be >= 1, got {in_chans} and {stem_stride}')
    if num_classes < 0:
        raise ConfigError(f'num_classes must be >= 0 (0: no classifier), got {num_classes}')
    if mlp_ratio <= 0:
        raise ConfigError(f'mlp_ratio must be > 0, got {mlp_ratio}')
    for name, rate in rates.items():
        if not 0. <= rate <= 1.:
            raise ConfigError(f'{name} must be in [0, 1], got {rate}')


# The stem's kernels: the paper's cross-scale embedding samples 4x4 to 32x32 patches at stride 4.
STEM_KERNEL_SIZES = (4, 8, 16, 32)
_DEFAULT_DEPTHS = (2, 2, 6, 2)


class CrossFormer(nn.Module):
    """CrossFormer / CrossFormer++ for image classification and dense features.

    ``(B, in_chans, H, W) -> (B, num_classes)`` for any ``H, W >= 1``. Stage ``i`` produces a
    ``ceil(H / r_i) x ceil(W / r_i)`` map with ``dims[i]`` channels, at reduction
    ``r_i = stem_stride * 2**i`` (``feature_info[i]['reduction']``: 4, 8, 16, 32 by default).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Union[int, Sequence[int]] = 96,
            depths: Sequence[int] = _DEFAULT_DEPTHS,
            num_heads: Sequence[int] = (3, 6, 12, 24),
            group_size: Union[int, Sequence[int]] = 7,
            interval: Union[int, Sequence[int]] = (8, 4, 2, 1),
            stem_kernel_sizes: Sequence[int] = STEM_KERNEL_SIZES,
            stem_stride: int = 4,
            merge_kernel_sizes: Sequence[int] = (2, 4),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            use_acl: bool = False,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dim: width of stage 1 (doubled at each later stage), or one width per stage.
            depths: blocks per stage; the number of stages is ``len(depths)``.
            num_heads: attention heads per stage.
            group_size: G, the side of an attention group, per stage (or one for all).
            interval: I, the LDA sampling interval, per stage (or one for all).
            stem_kernel_sizes: kernels of the cross-scale patch embedding.
            merge_kernel_sizes: kernels of the cross-scale down-sampling between stages.
            use_acl: add the CrossFormer++ activation cooling layers.
            device, dtype: where and in which dtype parameters and buffers are created (timm's factory kwargs).
        """
        super().__init__()
        dims, group_size, interval = _stage_settings(embed_dim, depths, num_heads, group_size, interval)
        _check_settings(stem_kernel_sizes, merge_kernel_sizes, in_chans, stem_stride, num_classes, mlp_ratio,
                        dict(drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
                             drop_path_rate=drop_path_rate))
        num_stages = len(depths)
        dd = dict(device=device, dtype=dtype)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = 'NCHW'
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = CrossEmbedLayer(in_chans, dims[0], stem_kernel_sizes, stride=stem_stride, **dd)
        total = sum(depths)
        drop_path = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # rises linearly block by block
        self.layers = nn.Sequential()
        self.feature_info = []
        reduction = stem_stride
        for i in range(num_stages):
            self.layers.append(Stage(
                in_dim=dims[max(i - 1, 0)],
                dim=dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                group_size=group_size[i],
                interval=interval[i],
                downsample_kernel_sizes=merge_kernel_sizes if i > 0 else None,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                cooling=use_acl,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path[sum(depths[:i]):sum(depths[:i + 1])],
                **dd,
            ))
            reduction *= 2 if i > 0 else 1
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f'layers.{i}'))
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Like the reference: 1-D parameters (norms, biases) are left out by timm's optimizer factory.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.downsample', (0,)),
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def grouped_min_size(self) -> int:
        """The smallest image side at which every stage attends in ``G x G`` groups, never in one
        whole-map group: ``max_i(G_i * r_i) + 1`` (225 for the published variants).

        A ``torch.export`` whose height and width ``Dim`` start there holds no ``torch.cond``.
        """
        return max(stage.blocks[0].group_size * info['reduction']
                   for stage, info in zip(self.layers, self.feature_info)) + 1

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier (``num_classes=0``: none) on the same device, dtype and train/eval mode."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    @torch.jit.ignore
    def filter_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """:func:`checkpoint_filter_fn` for this model; :func:`crossformer.load_checkpoint` calls it."""
        return checkpoint_filter_fn(state_dict, self)

    @torch.jit.ignore
    def load_pretrained(self, path: str) -> None:
        """Load a checkpoint file (reference or this library's layout); timm calls this for ``file=``."""
        load_checkpoint(self, path)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (raw, before the next down-sampling), as timm's hierarchical models give them.

        Args:
            indices: stages to return (None: all; int n: the last n).
            norm: apply the final norm to the last stage's map.
            stop_early: skip the stages after the last one asked for.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of maps.
        Returns:
            maps, or ``(forward_features(x), maps)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[:max_index + 1]
        last = len(self.layers) - 1
        intermediates = []
        check_image(x, self.in_chans)
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x_inter)
        if intermediates_only:
            return intermediates
        return self.norm(x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index asked for (and the norm/head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` image -> ``(B, num_features, ceil(H / r), ceil(W / r))`` normed map, ``r`` the last reduction."""
        check_image(x, self.in_chans)
        x = self.layers(self.patch_embed(x))
        # a copy under torch.export: the pooling would pick a memory format from these strides, guarding on sizes of 1
        return contiguous_if_exporting(self.norm(x).permute(0, 3, 1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[CrossFormer] = None) -> Dict[str, torch.Tensor]:
    """Map a state dict of a reference checkpoint (classifier or dense backbone, v1 or ++) to this layout.

    - strip ``module.`` / ``backbone.`` prefixes;
    - drop the derived v1 buffers ``attn.biases`` and ``attn.relative_position_index``;
    - the reference merges at the end of stage i (``layers.i.downsample.reductions``); here
      stage i+1 merges first (``layers.{i+1}.downsample.projs``);
    - ``head.*`` becomes ``head.fc.*``.

    With ``model``, the head follows the model as timm's loaders do: dropped when the model has
    none, the model's own kept when the file has none or one for another ``num_classes``; and the
    stem is adapted to another ``in_chans``. Files already in this layout pass through unchanged.
    Two keys that map to one name raise :class:`~crossformer.errors.CheckpointError`.
    """
    if 'patch_embed.projs.0.weight' not in state_dict:
        state_dict = _renamed(state_dict, lambda k: re.sub(r'^(module\.|backbone\.)', '', k))
    reference_layout = any('.downsample.reductions.' in k for k in state_dict)

    def rename(k: str) -> str:
        if reference_layout:
            m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
            if m:
                k = f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2).replace("reductions.", "projs.")}'
        return re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', k)

    derived = ('attn.biases', 'attn.relative_position_index')
    out = _renamed({k: v for k, v in state_dict.items() if not k.endswith(derived)}, rename)
    if model is None:
        return out
    own = model.state_dict()
    for k in [k for k in out if k.startswith('head.')]:
        if k not in own:
            del out[k]
    for k in [k for k in own if k.startswith('head.')]:
        if k not in out or out[k].shape != own[k].shape:
            out[k] = own[k]
    for k, v in out.items():
        if k.startswith('patch_embed.projs.') and k.endswith('.weight') and k in own and v.ndim == 4 \
                and v.shape[1] != own[k].shape[1] and v.is_floating_point():
            out[k] = adapt_input_conv(own[k].shape[1], v)
    return out


def _renamed(state_dict: Dict[str, torch.Tensor], rename) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = rename(k)
        if new in out:
            raise CheckpointError(f'two keys of the checkpoint map to {new!r} (one of them is {k!r}); keep one')
        out[new] = v
    return out


# Constructor arguments a file may carry (a run's weights metadata, a model folder's config.json),
# with the range each value must be in: a file describes a model, it never steers loading.
FILE_MODEL_ARGS: Dict[str, Tuple[type, float, float]] = {
    'in_chans': (int, 1, 64),
    'embed_dim': (int, 16, 4096),
    'depths': (int, 1, 64),
    'num_heads': (int, 1, 256),
    'group_size': (int, 1, 64),
    'interval': (int, 1, 64),
    'stem_kernel_sizes': (int, 1, 64),
    'stem_stride': (int, 1, 32),
    'merge_kernel_sizes': (int, 1, 16),
    'mlp_ratio': (float, 0.25, 16),
    'qkv_bias': (bool, 0, 1),
    'use_acl': (bool, 0, 1),
    'global_pool': (str, 0, 0),
    'drop_rate': (float, 0, 1),
    'proj_drop_rate': (float, 0, 1),
    'attn_drop_rate': (float, 0, 1),
    'drop_path_rate': (float, 0, 1),
}
MAX_STAGES = 8


def check_file_model_args(args: Any, source: str) -> Dict[str, Any]:
    """``args`` from a file, checked against :data:`FILE_MODEL_ARGS`; a :class:`CheckpointError` names
    any other key (``pretrained``, ``pretrained_cfg``, ``checkpoint_path``...) or a value out of range."""
    if not isinstance(args, dict):
        raise CheckpointError(f'{source}: model arguments must be a mapping, got {type(args).__name__}')
    unknown = sorted(str(k) for k in args if k not in FILE_MODEL_ARGS)
    if unknown:
        raise CheckpointError(f'{source}: refused model arguments {unknown}; a file may set only '
                              f'{", ".join(FILE_MODEL_ARGS)}')
    out = {}
    for key, value in args.items():
        kind, low, high = FILE_MODEL_ARGS[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        per_stage = isinstance(value, (list, tuple))
        if per_stage and not 1 <= len(values) <= MAX_STAGES:
            raise CheckpointError(f'{source}: {key} must have 1 to {MAX_STAGES} entries, got {len(values)}')
        for v in values:
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            ok = type(v) is kind and (kind in (bool, str) or low <= v <= high)
            if kind is str:
                ok = ok and v in ('avg', 'max', 'avgmax', 'catavgmax', '')
            if not ok:
                raise CheckpointError(f'{source}: {key}={value!r} is not a {kind.__name__}'
                                      + (f' in [{low}, {high}]' if kind in (int, float) else ''))
        out[key] = tuple(value) if per_stage else value
    return out


def _create_crossformer(variant: str, pretrained: bool = False, **kwargs) -> CrossFormer:
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = kwargs.get('pretrained_cfg') or get_pretrained_cfg(variant)
        cfg = dict(cfg.to_dict() if isinstance(cfg, PretrainedCfg) else cfg or {}, **overlay)
        if cfg.get('file'):
            # timm resets custom_load for a user's file; keep ours: safe reading of reference files
            kwargs['pretrained_cfg_overlay'] = dict(overlay, custom_load=overlay.get('custom_load', True))
        elif not cfg.get('state_dict'):
            raise ConfigError(
                f'{variant}: the weights published with the paper are not downloaded automatically. Get the file '
                f'from {WEIGHTS_URL} and pass it: timm.create_model({variant!r}, pretrained=True, '
                f"pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth'))")
    return build_model_with_cfg(
        CrossFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(len(kwargs.get('depths', _DEFAULT_DEPTHS)))), feature_cls='getter'),
        **kwargs,
    )


# The papers' figures: ImageNet-1k top-1 (%) at 224, params (M), GFLOPs (multiply-accumulates).
PAPER_RESULTS = {
    'crossformer_t': dict(top1=81.5, params_m=27.8, gflops=2.9),
    'crossformer_s': dict(top1=82.5, params_m=30.7, gflops=4.9),
    'crossformer_b': dict(top1=83.4, params_m=52.0, gflops=9.2),
    'crossformer_l': dict(top1=84.0, params_m=92.0, gflops=16.1),
    'crossformerpp_s': dict(top1=83.2, params_m=23.3, gflops=4.9),
    'crossformerpp_b': dict(top1=84.2, params_m=52.0, gflops=9.5),
    'crossformerpp_l': dict(top1=84.7, params_m=92.0, gflops=16.6),
    'crossformerpp_h': dict(top1=84.9, params_m=96.0, gflops=21.8),
}


def _cfg(variant: str) -> Dict[str, Any]:
    paper = PAPER_RESULTS[variant]
    plus_plus = variant.startswith('crossformerpp')
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': tuple(f'patch_embed.projs.{i}' for i in range(len(STEM_KERNEL_SIZES))), 'classifier': 'head.fc',
        'custom_load': True,
        'license': 'mit', 'origin_url': 'https://github.com/cheerss/CrossFormer',
        'paper_ids': 'arXiv:2303.06908' if plus_plus else 'arXiv:2108.00154',
        'paper_name': 'CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention' if plus_plus
                      else 'CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention',
        'notes': (f"ImageNet-1k top-1 {paper['top1']}% at 224, {paper['params_m']}M params, "
                  f"{paper['gflops']} GFLOPs in the paper", f'weights: {WEIGHTS_URL}'),
    }


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg(name) for name in PAPER_RESULTS})

# CrossFormer (v1): group 7 in every stage, LDA intervals 8/4/2/1.
_V1 = dict(group_size=7, interval=(8, 4, 2, 1))
# CrossFormer++: progressive group sizes (PGS) 4/4/14/7, intervals 4/2/1/1, activation cooling.
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True)


def _variant(name: str, pretrained: bool, arch: Dict[str, Any], kwargs: Dict[str, Any]) -> CrossFormer:
    return _create_crossformer(name, pretrained=pretrained, **dict(arch, **kwargs))


@register_model
def crossformer_t(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformer_t', pretrained, dict(
        embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.1, **_V1), kwargs)


@register_model
def crossformer_s(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformer_s', pretrained, dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_V1), kwargs)


@register_model
def crossformer_b(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformer_b', pretrained, dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_V1), kwargs)


@register_model
def crossformer_l(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformer_l', pretrained, dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_V1), kwargs)


@register_model
def crossformerpp_s(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformerpp_s', pretrained, dict(
        embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.2, **_PP), kwargs)


@register_model
def crossformerpp_b(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformerpp_b', pretrained, dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_PP), kwargs)


@register_model
def crossformerpp_l(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformerpp_l', pretrained, dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_PP), kwargs)


@register_model
def crossformerpp_h(pretrained: bool = False, **kwargs) -> CrossFormer:
    return _variant('crossformerpp_h', pretrained, dict(
        embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_PP), kwargs)
