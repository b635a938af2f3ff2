"""Tuning a host ahead of a deployment: run a model at the sizes and batches it will serve, so every
product's path is timed now (and kept in the host's tuning file) instead of on the first requests."""
import time
from typing import Dict, List, Sequence, Tuple

import timm
import torch

from .errors import ConfigError
from .layers.speedups import tuned_choices, tuning_enabled, tuning_file
from .models import check_variant

__all__ = ['tune', 'format_choices']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}


def tune(name: str, sizes: Sequence[Tuple[int, int]] = ((224, 224),), batches: Sequence[int] = (1,),
         dtypes: Sequence[str] = ('float32',)) -> List[Dict]:
    """Run ``name`` (random weights: only shapes matter) once per dtype, batch and ``(H, W)`` size at
    CPU inference, then again; returns one row per run: the first call's seconds (timing the new
    paths), the second's, and the choices it added."""
    if not tuning_enabled():
        raise ConfigError('tuning is off (CROSSFORMER_TUNING=off): unset it to tune')
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ConfigError(f'--dtype {bad[0]} is not one of {", ".join(DTYPES)}')
    if not sizes or min(min(s) for s in sizes) < 1 or not batches or min(batches) < 1:
        raise ConfigError('sizes and batches must be >= 1')
    rows = []
    for dtype in dtypes:
        model = timm.create_model(check_variant(name)).eval().to(DTYPES[dtype])
        for batch in batches:
            for h, w in sizes:
                x = torch.randn(batch, 3, h, w, dtype=DTYPES[dtype])
                known = len(tuned_choices())
                with torch.no_grad():
                    start = time.perf_counter()
                    model(x)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    model(x)
                    second = time.perf_counter() - start
                rows.append(dict(dtype=dtype, batch=batch, size=(h, w), first_s=first, second_s=second,
                                 new_choices=len(tuned_choices()) - known))
    return rows


def _describe(key: tuple) -> str:
    if key[0] == 'linear':
        _, i, o, _, post, dtype, tokens, threads = key
        return f'Linear {i}->{o}{"" if post == "none" else " + " + post}, {dtype}, <={tokens} tokens, {threads} threads'
    if key[0] == 'conv':
        _, c, o, kh, kw, sh, sw, *_, dtype, pixels, threads = key
        return f'conv {c}->{o} {kh}x{kw}/{sh}, {dtype}, <={pixels} pixels, {threads} threads'
    if key[0] == 'mlp_chunks':
        _, dim, hidden, dtype, tokens, threads = key
        return f'MLP {dim}->{hidden}->{dim}, <={tokens} tokens at once or in chunks, {dtype}, {threads} threads'
    if key[0] == 'attention_chunks':
        _, heads, group, dim, tokens, masked, dtype, threads = key
        return (f'attention {dim} wide, {heads} heads on {group}-token groups, <={tokens} tokens at once or in '
                f'chunks{", masked" if masked else ""}, {dtype}, {threads} threads')
    if key[0] == 'attention':
        _, heads, tokens, head_dim, groups, masked, dtype, threads = key
        return (f'attention {heads} heads x {head_dim} on {tokens}-token groups, <={groups} groups'
                f'{", masked" if masked else ""}, {dtype}, {threads} threads')
    return ' '.join(map(str, key))


def format_choices(rows: List[Dict]) -> str:
    """The runs and every choice of this process as text: which path each product takes, and the
    fewest milliseconds of each path it was timed against."""
    lines = ['| dtype | batch | size | first call s (tuning) | second call s | new choices |',
             '|---|---:|---|---:|---:|---:|']
    lines += [f'| {r["dtype"]} | {r["batch"]} | {r["size"][0]}x{r["size"][1]} | {r["first_s"]:.2f} '
              f'| {r["second_s"]:.2f} | {r["new_choices"]} |' for r in rows]
    lines += ['', '| product | path | fewest ms of each path timed |', '|---|---|---|']
    for key, path, seconds in tuned_choices():
        timed = ', '.join(f'{p} {s * 1e3:.3f}' for p, s in seconds.items()) or '(read from the file)'
        lines.append(f'| {_describe(key)} | {path} | {timed} |')
    where = tuning_file()
    lines.append('')
    lines.append(f'kept in {where}' if where else 'kept in this process only (CROSSFORMER_TUNING_CACHE=off)')
    return '\n'.join(lines)
