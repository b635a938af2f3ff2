"""The per-epoch metrics of a training run: a CSV file and a PNG plot of the curves.

Both are rewritten from the whole history after every validated epoch (atomically), so a
resumed run continues the same files.
"""
import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..files import atomic_write

__all__ = ['write_csv', 'plot_curves', 'COLUMNS']

COLUMNS = ('epoch', 'step', 'lr', 'train_loss', 'val_loss', 'val_top1', 'val_top5',
           'ema_val_loss', 'ema_val_top1', 'ema_val_top5', 'epoch_seconds', 'images_per_second')


def write_csv(path: Path, history: Sequence[Dict[str, Any]]) -> Path:
    """One row per epoch; columns :data:`COLUMNS` (those no row has are left out)."""
    columns = [c for c in COLUMNS if any(c in row for row in history)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot_curves(path: Path, history: Sequence[Dict[str, Any]], title: str = '') -> Path:
    """Loss (train, val) and accuracy (top-1, top-5) against epochs, as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> List:
        rows = [r for r in history if r.get(key) is not None]
        return [r['epoch'] for r in rows], [r[key] for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (('train_loss', 'train (as optimized: smoothing, mixup)'), ('val_loss', 'val'),
                       ('ema_val_loss', 'val (EMA)')):
        x, y = series(key)
        if x:
            ax_loss.plot(x, y, marker='.', label=label)
    for key, label in (('val_top1', 'top-1'), ('val_top5', 'top-5'), ('ema_val_top1', 'top-1 (EMA)')):
        x, y = series(key)
        if x:
            ax_acc.plot(x, y, marker='.', label=label)
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='validation accuracy (%)', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    finally:
        plt.close(fig)
