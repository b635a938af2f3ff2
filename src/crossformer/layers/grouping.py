"""Grouping of a token map for SDA and LDA attention (pure functions).

A group is ``Gh x Gw`` tokens. Regular groups are ``G x G``: SDA takes adjacent tokens; LDA takes
tokens ``I`` apart, so a region of ``(Gh*I) x (Gw*I)`` tokens holds ``I x I`` interleaved groups.
SDA is LDA with ``I == 1``, so one pair of functions serves both:

    (B, Hp, Wp, C) -> (B, Hp/(Gh*I), Gh, I, Wp/(Gw*I), Gw, I, C) -> (B * groups, Gh*Gw, C)

where group ``(ih, iw)`` of region ``(rh, rw)`` holds the tokens at
``(rh*Gh*I + gh*I + ih, rw*Gw*I + gw*I + iw)``, ordered row-major by ``(gh, gw)``.

A map whose short side is at most ``G`` is one group of exactly its ``H x W`` tokens. The
reference pads such a map to a square of its long side and masks the padded keys with -1e6;
their softmax weights underflow to exactly zero and the padded queries are cropped, so the real
tokens see only each other, with the bias of their real offsets: what an ``H x W`` group computes.

Under ``torch.jit.trace`` (and so the TorchScript-based ONNX exporter) sizes are 0-dim tensors:
:func:`group_layout` then computes with tensor ops instead of Python branches, and the padding
mask is always built, so a traced or exported graph follows the input size. Under
``torch.export`` with dynamic shapes sizes are symbols (``SymInt``): the block then decides between the two layouts with ``torch.cond`` on :func:`is_whole_map`, and the
regular layout (:func:`grid_layout`) always pads and builds the mask (:func:`key_padding_mask`),
so no size becomes a guard of the graph.
"""
from typing import Optional, Tuple

import torch

__all__ = ['group_layout', 'grid_layout', 'is_whole_map', 'symbolic_sizes', 'exporting', 'group_tokens',
           'ungroup_tokens', 'build_padding_mask', 'key_padding_mask', 'contiguous_if_exporting', 'MASK_VALUE']

# Added to the logits of padded keys. Large but finite, as in the reference: a group made only
# of padding then gets uniform weights instead of NaN.
MASK_VALUE = -1e6


def group_layout(height: int, width: int, group_size: int, interval: int) -> Tuple[int, int, int, int, int]:
    """Group shape, interval and padded map size used for a ``height x width`` map.

    Returns ``(Gh, Gw, I, Hp, Wp)``, ``Hp`` a multiple of ``Gh * I`` and ``Wp`` of ``Gw * I``.
    Regular groups are ``G x G``; when the map's short side is at most ``G`` the whole map is
    one SDA group of ``height x width`` tokens, with no padding.
    """
    if not torch.jit.is_scripting() and isinstance(height, torch.Tensor):  # traced
        return _traced_group_layout(height, width, group_size, interval)
    if min(height, width) <= group_size:
        return height, width, 1, height, width
    return grid_layout(height, width, group_size, interval)


def grid_layout(height: int, width: int, group_size: int, interval: int) -> Tuple[int, int, int, int, int]:
    """:func:`group_layout` of a map whose short side exceeds ``G``: ``(G, G, I, Hp, Wp)``."""
    span = group_size * interval
    # (n + span - 1) // span, not -(-n // span): traced exporters truncate negative division, and
    # symbolic shapes keep a floor division simpler than a modulo
    return group_size, group_size, interval, (height + span - 1) // span * span, (width + span - 1) // span * span


@torch.jit.unused
def symbolic_sizes(height: int, width: int) -> bool:
    """The sizes may be symbols under ``torch.export``: ``SymInt`` (non-strict), or any size under
    strict export, where dynamo shows a ``SymInt`` as an int."""
    if isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt):
        return True
    return torch.compiler.is_exporting() and torch.compiler.is_dynamo_compiling()


@torch.jit.unused
def exporting() -> bool:
    """Under ``torch.export``, strict or not (TorchScript cannot compile ``torch.compiler.is_exporting``)."""
    return torch.compiler.is_exporting()


@torch.jit.unused
def is_whole_map(height: int, width: int, group_size: int) -> bool:
    """``min(height, width) <= group_size``, kept symbolic (a ``SymBool``) for symbolic sizes."""
    return torch.sym_min(height, width) <= group_size


@torch.jit.unused
def _traced_group_layout(height: int, width: int, group_size: int,
                         interval: int) -> Tuple[int, int, int, int, int]:
    """:func:`group_layout` in tensor ops on traced 0-dim sizes: the branch becomes data.

    Returns 0-dim tensors (annotated as ints for TorchScript, which never calls it).
    """
    whole = torch.minimum(height, width) <= group_size
    Gh = torch.where(whole, height, group_size)
    Gw = torch.where(whole, width, group_size)
    I = torch.where(whole, 1, interval)
    span_h, span_w = Gh * I, Gw * I
    return Gh, Gw, I, (height + span_h - 1) // span_h * span_h, (width + span_w - 1) // span_w * span_w


def group_tokens(x: torch.Tensor, group_h: int, group_w: int, interval: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * num_groups, Gh*Gw, C)``; Hp a multiple of ``Gh * I``, Wp of ``Gw * I``."""
    B, Hp, Wp, C = x.shape
    Gh, Gw, I = group_h, group_w, interval
    x = x.view(B, Hp // (Gh * I), Gh, I, Wp // (Gw * I), Gw, I, C)  # B, Rh, Gh, Ih, Rw, Gw, Iw, C
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)  # B, Rh, Rw, Ih, Iw, Gh, Gw, C
    return contiguous_if_exporting(x).reshape(-1, Gh * Gw, C)


def ungroup_tokens(x: torch.Tensor, group_h: int, group_w: int, interval: int, height: int,
                   width: int) -> torch.Tensor:
    """Inverse of :func:`group_tokens`: ``(B * num_groups, Gh*Gw, C)`` -> ``(B, Hp, Wp, C)``."""
    Gh, Gw, I = group_h, group_w, interval
    C = x.shape[-1]
    x = x.view(-1, height // (Gh * I), width // (Gw * I), I, I, Gh, Gw, C)  # B, Rh, Rw, Ih, Iw, Gh, Gw, C
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)  # B, Rh, Gh, Ih, Rw, Gw, Iw, C
    return contiguous_if_exporting(x).reshape(-1, height, width, C)


def contiguous_if_exporting(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied to a contiguous tensor under ``torch.export``.

    With symbolic sizes, whether ``reshape`` can return a view (or which memory format an op
    picks) depends on which sizes are 1 (a single group, ``I == 1``, a 1-pixel map): a guard on
    the sizes. After a copy there is nothing to decide. Eager code and torch.compile keep their views.
    """
    if not torch.jit.is_scripting() and exporting():
        return x.clone(memory_format=torch.contiguous_format)
    return x


def build_padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int,
                       padded_w: int, device: torch.device) -> Optional[torch.Tensor]:
    """Additive mask for padded keys, ``(num_groups, 1, 1, Gh*Gw)`` float, or None without padding.

    Queries are not masked: padded queries are cropped away after attention. When traced, the
    mask is always built (zeros where nothing is padded), from the traced sizes.
    """
    if not torch.jit.is_tracing() and height == padded_h and width == padded_w:
        return None
    return key_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w, device)


def key_padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int,
                     padded_w: int, device: torch.device) -> torch.Tensor:
    """:func:`build_padding_mask`, built also where nothing is padded (zeros): ``(num_groups, 1, 1, Gh*Gw)``."""
    rows = torch.arange(padded_h, device=device) >= height  # Hp
    cols = torch.arange(padded_w, device=device) >= width  # Wp
    pad = (rows[:, None] | cols[None, :]).float()[None, :, :, None]  # 1, Hp, Wp, 1
    pad = group_tokens(pad, group_h, group_w, interval).squeeze(-1)  # groups, Gh*Gw
    return (pad * -1e6)[:, None, None, :]  # groups, 1, 1, Gh*Gw; -1e6 is MASK_VALUE (TorchScript reads no float globals)
