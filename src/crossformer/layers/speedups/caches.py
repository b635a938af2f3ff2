"""The bounded caches every model of the process shares: DPB biases and offset tables, padding masks.

Both are least recently used first out, bounded in bytes and safe under threads
(:class:`ByteBoundedCache`). Their bounds are set by :func:`set_cache_limits`, or at import by
the environment: ``CROSSFORMER_DPB_CACHE_MIB`` (default 64) and ``CROSSFORMER_MASK_CACHE_MIB``
(default 16); 0 turns a cache off.
"""
import os
import threading
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from ...errors import ConfigError
from ..grouping import build_padding_mask

__all__ = ['ByteBoundedCache', 'dpb_cache', 'mask_cache', 'set_cache_limits', 'padding_mask']

MIB = 2 ** 20


class ByteBoundedCache:
    """A least-recently-used map of tensors, bounded in bytes, safe to share between threads.

    Holds at most ``max_bytes`` of tensors; a value over ``max_entry_bytes`` is never stored. Values
    are computed outside the lock (two threads may compute the same one; both get equal tensors),
    and must be treated as read-only.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int):
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: 'OrderedDict[tuple, torch.Tensor]' = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple, value: torch.Tensor, drop=None) -> torch.Tensor:
        """Store ``value`` under ``key`` (if small enough) and return it; first remove the entries for
        which ``drop(key)`` is true, then the least recently used ones until it fits."""
        size = value.untyped_storage().nbytes()
        with self._lock:
            if drop is not None:
                self._discard(drop)
            if size > min(self.max_entry_bytes, self.max_bytes) or key in self._entries:
                return value
            self._shrink_to(self.max_bytes - size)
            self._entries[key] = value
            self._bytes += size
        return value

    def set_limits(self, max_bytes: int, max_entry_bytes: int) -> None:
        """New bounds; entries beyond them go at once, least recently used first."""
        with self._lock:
            self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
            self._discard(lambda key: self._entries[key].untyped_storage().nbytes() > max_entry_bytes)
            self._shrink_to(max_bytes)

    def discard(self, drop) -> None:
        """Remove the entries for which ``drop(key)`` is true."""
        with self._lock:
            self._discard(drop)

    def _shrink_to(self, max_bytes: int) -> None:  # with the lock held
        while self._entries and self._bytes > max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1].untyped_storage().nbytes()

    def _discard(self, drop) -> None:  # with the lock held
        for key in [k for k in self._entries if drop(k)]:
            self._bytes -= self._entries.pop(key).untyped_storage().nbytes()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _mib_from_environment(name: str, default: int) -> int:
    value = os.environ.get(name, '').strip()
    if not value:
        return default
    if not value.isdigit() or int(value) > 2 ** 20:
        warnings.warn(f'{name}={value!r} is not a size in MiB from 0 to {2 ** 20}; using {default}', stacklevel=2)
        return default
    return int(value)


# The DPB biases (heads x N x N per group shape and block) and offset tables of every model in the
# process, together; a bias of a large group is recomputed on every call instead. The padding
# masks of every shape, together (a mask is groups x Gh*Gw floats).
dpb_cache = ByteBoundedCache(_mib_from_environment('CROSSFORMER_DPB_CACHE_MIB', 64) * MIB, 8 * MIB)
mask_cache = ByteBoundedCache(_mib_from_environment('CROSSFORMER_MASK_CACHE_MIB', 16) * MIB, 4 * MIB)


def set_cache_limits(dpb_mib: Optional[float] = None, mask_mib: Optional[float] = None,
                     dpb_entry_mib: Optional[float] = None, mask_entry_mib: Optional[float] = None) -> dict:
    """Bound the DPB bias cache and the padding-mask cache, in MiB (0 turns one off); returns the
    bounds now in force, ``{'dpb_mib', 'dpb_entry_mib', 'mask_mib', 'mask_entry_mib'}``.

    A server that sees many input sizes holds at most these bytes of biases and masks, on top of
    the weights; a bias or mask over its entry bound is recomputed on every call instead.
    """
    for cache, total, entry, what in ((dpb_cache, dpb_mib, dpb_entry_mib, 'dpb'),
                                      (mask_cache, mask_mib, mask_entry_mib, 'mask')):
        for value, name in ((total, f'{what}_mib'), (entry, f'{what}_entry_mib')):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 2 ** 20):
                raise ConfigError(f'{name} must be a number of MiB from 0 to {2 ** 20}, got {value!r}')
        cache.set_limits(cache.max_bytes if total is None else int(total * MIB),
                         cache.max_entry_bytes if entry is None else int(entry * MIB))
    return dict(dpb_mib=dpb_cache.max_bytes / MIB, dpb_entry_mib=dpb_cache.max_entry_bytes / MIB,
                mask_mib=mask_cache.max_bytes / MIB, mask_entry_mib=mask_cache.max_entry_bytes / MIB)


@torch.jit.unused
def _cached_padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int,
                         padded_w: int, device: torch.device) -> Optional[torch.Tensor]:
    if height == padded_h and width == padded_w:
        return None
    key = (height, width, group_h, group_w, interval, padded_h, padded_w, device)
    mask = mask_cache.get(key)
    if mask is None:
        mask = mask_cache.put(key, build_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w,
                                                      device))
    return mask


def padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int, padded_w: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    """:func:`~crossformer.layers.grouping.build_padding_mask`, cached per shape and device in eager
    mode (in :data:`mask_cache`); treat the result as read-only."""
    if not torch.jit.is_scripting():  # TorchScript compiles none of this block
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return _cached_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w, device)
    return build_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w, device)
