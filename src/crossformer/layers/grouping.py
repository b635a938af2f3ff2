"""Grouping of a token map for SDA and LDA attention (pure functions).

A group is ``G x G`` tokens. SDA takes adjacent tokens; LDA takes tokens ``I`` apart, so a
region of ``(G*I) x (G*I)`` tokens holds ``I x I`` interleaved groups. SDA is LDA with
``I == 1``, so one pair of functions serves both:

    (B, Hp, Wp, C) -> (B, Hp/(G*I), G, I, Wp/(G*I), G, I, C) -> (B * groups, G*G, C)

where group ``(ih, iw)`` of region ``(rh, rw)`` holds the tokens at
``(rh*G*I + gh*I + ih, rw*G*I + gw*I + iw)``, ordered row-major by ``(gh, gw)``.

Under ``torch.jit.trace`` (and so the TorchScript-based ONNX exporter) sizes are 0-dim tensors:
:func:`group_layout` then computes with tensor ops instead of Python branches, and the padding
mask is always built, so a traced or exported graph follows the input size.
"""
from typing import Optional, Tuple

import torch

__all__ = ['group_layout', 'group_tokens', 'ungroup_tokens', 'build_padding_mask', 'MASK_VALUE']

# Added to the logits of padded keys. Large but finite, as in the reference: a group made only
# of padding then gets uniform weights instead of NaN.
MASK_VALUE = -1e6


def group_layout(height: int, width: int, group_size: int, interval: int) -> Tuple[int, int, int, int]:
    """Group size, interval and padded map size used for a ``height x width`` map.

    When the map's short side is no larger than the group, the whole map is one SDA group whose
    side is the long side (the short side is padded and masked), as the reference does.
    Returns ``(G, I, Hp, Wp)`` with ``Hp`` and ``Wp`` multiples of ``G * I``.
    """
    if not torch.jit.is_scripting() and isinstance(height, torch.Tensor):  # traced
        return _traced_group_layout(height, width, group_size, interval)
    if min(height, width) <= group_size:
        group_size, interval = max(height, width), 1
    span = group_size * interval
    # (n + span - 1) // span, not -(-n // span): traced exporters truncate negative division
    return group_size, interval, (height + span - 1) // span * span, (width + span - 1) // span * span


@torch.jit.unused
def _traced_group_layout(height: int, width: int, group_size: int, interval: int) -> Tuple[int, int, int, int]:
    """:func:`group_layout` in tensor ops on traced 0-dim sizes: the branch becomes data.

    Returns 0-dim tensors (annotated as ints for TorchScript, which never calls it).
    """
    whole = torch.minimum(height, width) <= group_size
    G = torch.where(whole, torch.maximum(height, width), group_size)
    I = torch.where(whole, 1, interval)
    span = G * I
    return G, I, (height + span - 1) // span * span, (width + span - 1) // span * span


def group_tokens(x: torch.Tensor, group_size: int, interval: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * num_groups, G*G, C)``; Hp, Wp multiples of ``G * I``."""
    B, Hp, Wp, C = x.shape
    G, I = group_size, interval
    x = x.view(B, Hp // (G * I), G, I, Wp // (G * I), G, I, C)  # B, Rh, Gh, Ih, Rw, Gw, Iw, C
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)  # B, Rh, Rw, Ih, Iw, Gh, Gw, C
    return x.reshape(-1, G * G, C)


def ungroup_tokens(x: torch.Tensor, group_size: int, interval: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`group_tokens`: ``(B * num_groups, G*G, C)`` -> ``(B, Hp, Wp, C)``."""
    G, I = group_size, interval
    C = x.shape[-1]
    x = x.view(-1, height // (G * I), width // (G * I), I, I, G, G, C)  # B, Rh, Rw, Ih, Iw, Gh, Gw, C
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)  # B, Rh, Gh, Ih, Rw, Gw, Iw, C
    return x.reshape(-1, height, width, C)


def build_padding_mask(height: int, width: int, group_size: int, interval: int, padded_h: int, padded_w: int,
                       device: torch.device) -> Optional[torch.Tensor]:
    """Additive mask for padded keys, ``(num_groups, 1, 1, G*G)`` float, or None without padding.

    Queries are not masked: padded queries are cropped away after attention. When traced, the
    mask is always built (zeros where nothing is padded), from the traced sizes.
    """
    if not torch.jit.is_tracing() and height == padded_h and width == padded_w:
        return None
    rows = torch.arange(padded_h, device=device) >= height  # Hp
    cols = torch.arange(padded_w, device=device) >= width  # Wp
    pad = (rows[:, None] | cols[None, :]).float()[None, :, :, None]  # 1, Hp, Wp, 1
    pad = group_tokens(pad, group_size, interval).squeeze(-1)  # groups, G*G
    return (pad * -1e6)[:, None, None, :]  # groups, 1, 1, G*G; -1e6 is MASK_VALUE (TorchScript reads no float globals)
