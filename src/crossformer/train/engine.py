"""The training engine behind ``crossformer train`` and ``crossformer validate``.

Built from timm's pieces: ``create_model``, ``create_transform``, ``Mixup``, its losses,
``create_optimizer_v2`` (no weight decay on norms and biases), ``create_scheduler_v2`` (stepped
every update), ``ModelEmaV3``, ``dispatch_clip_grad`` and ``init_distributed_device_so``.

Distributed: launched with ``torchrun``, every process trains on its share of each global batch
in ``DistributedDataParallel``; rank 0 alone logs, draws and saves. Every process reseeds at the
start of each epoch from ``(seed, epoch, rank)``, so a run resumed at an epoch boundary repeats
exactly what the uninterrupted run would have done.

Snapshots (:mod:`.snapshot`) are taken at the end of every epoch, and inside an epoch when SIGTERM
or SIGINT asks the run to stop: the current step finishes, all ranks agree to stop (one
``all_reduce`` of a flag per step), rank 0 writes a snapshot holding the position in the epoch and
every rank's RNG states, and :meth:`Trainer.fit` returns with ``stopped_by`` set. Resuming such a
snapshot replays the epoch's first batches through the data loader (so the loader's workers draw
what they drew) without training on them, restores the RNG states and goes on: the result equals
the uninterrupted run's.
"""
import functools
import json
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, DivergedError
from ..files import atomic_write
from ..hub import CARD_FILE, WEIGHTS_FILE, finish_model_folder, is_model_folder, model_card, write_model_folder
from ..models import check_variant, create_model, default_normalization
from ..weights import RUN_INFO_KEY, save_run_weights
from .config import TrainConfig, apply_overrides, config_from_dict
from .data import build_datasets, build_transform, train_loader, val_loader
from .metrics import plot_curves, write_csv
from .pretrained import describe_model, load_pretrained, published_note
from .snapshot import SnapshotError, load_snapshot, read_snapshot_state, save_snapshot

__all__ = ['Trainer', 'train', 'evaluate', 'validate', 'resume_config', 'Runtime', 'default_device',
           'stage_param_groups']

_logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs: device and its place among the distributed processes."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group when launched by torchrun (env ``RANK``, ``WORLD_SIZE``...)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or default_device()
    info = init_distributed_device_so(device=device)
    return Runtime(torch.device(info['device']), info['global_rank'], info['world_size'], info['distributed'])


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed torch, numpy and random for (seed, epoch, rank): distinct per rank (below 1000 ranks)."""
    random_seed(seed + 1000 * epoch, rank)


def default_device() -> str:
    """``'cuda'`` when a GPU is available, else ``'cpu'``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def autocast(cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast (float16 on CUDA without bfloat16), or nothing when ``cfg.amp`` is off."""
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, cfg: Optional[TrainConfig] = None,
             progress: bool = False, desc: str = 'val') -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) on ``loader``, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top1, top5, count
    ctx = autocast(cfg, runtime.device) if cfg is not None else nullcontext()
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=None if progress and runtime.is_main else True):
        images, targets = images.to(runtime.device), targets.to(runtime.device)
        with ctx:
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices == targets[:, None]
        totals += torch.stack([
            nn.functional.cross_entropy(logits, targets, reduction='sum').double(),
            hits[:, 0].sum().double(), hits.any(dim=-1).sum().double(), torch.tensor(len(targets), device=runtime.device).double(),
        ])
    if runtime.distributed:
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise ConfigError('the validation set is empty')
    return dict(loss=loss / count, top1=100.0 * top1 / count, top5=100.0 * top5 / count, count=int(count))


def resume_config(path, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """The config saved in the snapshot ``--resume path`` takes (``path``: a run directory, one of its
    ``snapshots/step-N`` folders, or a legacy ``last.json``) plus ``overrides``.

    ``output`` becomes the run directory unless overridden.
    """
    state, run_dir = read_snapshot_state(path)
    cfg = config_from_dict(dict(state['config'], output=str(run_dir)))
    return apply_overrides(cfg, overrides or {})


class _ByStage:
    """A model as timm's layer-decay grouping sees it, with one layer per stage: its coarse
    ``group_matcher`` (stem, ``layers.0`` ... ``layers.n-1``; final norm and head after them)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self.model.group_matcher(coarse=True)


def stage_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """timm's layer-wise lr decay groups (BEiT's scheme, ``param_groups_layer_decay``) with one layer
    per stage: the final norm and head get ``lr_scale`` 1, stage n ``layer_decay``, ..., the stem
    ``layer_decay ** (n + 1)``. Norms and biases get no weight decay. Highest lr first, so that
    ``param_groups[0]`` holds the base lr. A model without ``group_matcher`` is grouped by timm."""
    no_decay = getattr(model, 'no_weight_decay', lambda: set())()
    view = _ByStage(model) if hasattr(model, 'group_matcher') else model
    groups = param_groups_layer_decay(view, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=no_decay)
    return sorted(groups, key=lambda g: -g['lr_scale'])


class Trainer:
    """Builds model, data, optimizer and schedule from a :class:`TrainConfig`, then :meth:`fit`.

    ``resume``: a run directory (or one of its snapshots) to continue from. After :meth:`fit`,
    ``stopped_by`` is the signal number that stopped it early (a snapshot was written), else None.
    """

    def __init__(self, cfg: TrainConfig, resume=None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.rt = setup_runtime(cfg)
        self.output = Path(cfg.output)
        self._build_data()  # first: it fixes the number of classes
        self._build_model(load_initial=resume is None)  # a resumed run takes its weights from the snapshot
        self._build_optimization()
        self._build_loss()
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer updates completed
        self.history: List[Dict[str, Any]] = []
        self.best = dict(top1=-1.0, epoch=-1)
        self.stopped_by: Optional[int] = None
        self._partial: Optional[Dict[str, Any]] = None  # where in an epoch a resumed snapshot stopped
        self._stop = _StopRequests(self.rt.is_main)
        for loader in (self.train_loader, self.val_loader):  # a signal to the process group reaches them too
            loader.worker_init_fn = functools.partial(_worker_init, loader.worker_init_fn)
        if resume is not None:
            self.load(resume)

    def _build_data(self) -> None:
        cfg, rt = self.cfg, self.rt
        norm = default_normalization(cfg.model)
        self.mean, self.std = list(cfg.mean or norm['mean']), list(cfg.std or norm['std'])
        self.data = build_datasets(cfg, build_transform(cfg, norm, training=True), build_transform(cfg, norm, training=False))
        pin = rt.device.type == 'cuda'
        self.train_loader = train_loader(self.data.train, cfg, rt.rank, rt.world_size, pin)
        self.val_loader = val_loader(self.data.val, cfg, rt.rank, rt.world_size, pin)
        self.updates_per_epoch = len(self.train_loader)

    def _build_model(self, load_initial: bool = True) -> None:
        """The model (same initialization on every rank, ``initial_checkpoint`` loaded if ``load_initial``),
        its EMA copy, and the DDP wrapper."""
        cfg, rt = self.cfg, self.rt
        seed_everything(cfg.seed)
        model = create_model(cfg.model, len(self.data.class_names), cfg.model_kwargs,
                             drop_path_rate=cfg.drop_path_rate, drop_rate=cfg.drop_rate)
        if cfg.head_init_scale is not None:  # a head that starts near zero leaves pretrained features undisturbed
            with torch.no_grad():
                for p in model.get_classifier().parameters():
                    p.mul_(cfg.head_init_scale)
        if cfg.initial_checkpoint and load_initial:
            note = load_pretrained(model, cfg.initial_checkpoint, describe_model(cfg.model, cfg.model_kwargs),
                                   class_names=self.data.class_names)
            if rt.is_main:
                _logger.info(note)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model = model.to(rt.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.ddp_model = self.model
        if rt.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == 'cuda' else None)

    def _build_optimization(self) -> None:
        """Optimizer, per-update schedule and grad scaler; learning rates scaled by the global batch."""
        cfg, rt = self.cfg, self.rt
        self.lr_scale = cfg.batch_size * rt.world_size / cfg.lr_base_size if cfg.lr_base_size else 1.0
        by_stage = (lambda m: stage_param_groups(m, cfg.weight_decay, cfg.layer_decay)) if cfg.layer_decay else None
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.opt, lr=cfg.lr * self.lr_scale, weight_decay=cfg.weight_decay,
            eps=cfg.opt_eps, betas=tuple(cfg.betas), param_group_fn=by_stage)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr * self.lr_scale, min_lr=cfg.min_lr * self.lr_scale,
            step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        self.scheduler.step_update(0)  # each group's lr_scale applies from the first update
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.amp and amp_dtype(rt.device) == torch.float16)

    def _build_loss(self) -> None:
        """Soft-target cross-entropy with Mixup/CutMix, else label smoothing, else plain cross-entropy."""
        cfg = self.cfg
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=len(self.data.class_names))
            self.loss_fn = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()

    # ---- checkpoints -------------------------------------------------------------------------
    def weights_info(self) -> Dict[str, Any]:
        """What ``validate`` and ``predict`` need to rebuild the model and read its outputs."""
        cfg = self.cfg
        return dict(model=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=len(self.data.class_names),
                    class_names=self.data.class_names, dataset=cfg.dataset, img_size=cfg.img_size,
                    interpolation=cfg.interpolation, crop_pct=cfg.crop_pct, mean=self.mean, std=self.std,
                    epoch=self.epoch)

    def save(self, partial: Optional[Dict[str, Any]] = None) -> Path:
        """Write ``snapshots/step-N/`` (rank 0); ``partial``: where inside an epoch, for a stop mid-epoch."""
        state = dict(epoch=self.epoch, step=self.step, config=self.cfg.to_dict(), best=self.best,
                     history=self.history, world_size=self.rt.world_size, scaler=self.scaler.state_dict(),
                     partial=partial)
        return save_snapshot(self.output, self.model, self.optimizer, self.weights_info(), state,
                             ema=self.ema.module if self.ema is not None else None)

    def load(self, path) -> None:
        snap = load_snapshot(path)
        if self.rt.is_main:
            for name, why in snap['skipped']:
                _logger.warning(f'skipped snapshot {name}: {why}')
            finish_model_folder(self.output)  # a model-folder update that a kill interrupted
        self.model.load_state_dict(snap['weights'])
        if self.ema is not None:
            if snap['ema_weights'] is None:
                raise ConfigError(f'{snap["json_path"]} was saved without EMA; resume with ema=false')
            self.ema.module.load_state_dict(snap['ema_weights'])
        self.optimizer.load_state_dict(snap['optimizer_state'])
        if snap.get('scaler'):
            self.scaler.load_state_dict(snap['scaler'])
        self.epoch, self.step = snap['epoch'], snap['step']
        self.history, self.best = snap['history'], snap['best']
        self._partial = _check_partial(snap.get('partial'), snap['json_path'], self.updates_per_epoch,
                                       self.rt.world_size)
        position = self._partial['position'] if self._partial else 0
        if self.step != self.epoch * self.updates_per_epoch + position:
            raise ConfigError(f'{snap["json_path"]}: step {self.step} is not epoch {self.epoch} x '
                              f'{self.updates_per_epoch} updates + {position}; the batch size or world size changed '
                              f'(saved with world size {snap.get("world_size")})')
        self.scheduler.step_update(self.step)
        if self.rt.is_main:
            within = f' ({position} of {self.updates_per_epoch} updates into epoch {self.epoch + 1})' if position else ''
            _logger.info(f'resumed from {Path(snap["json_path"]).parent} at epoch {self.epoch}, step {self.step}{within}')

    # ---- loop --------------------------------------------------------------------------------
    def train_one_epoch(self, partial: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """One epoch (from ``partial['position']`` on, for a snapshot taken inside it): ``train_loss``,
        or, when a stop was requested, ``position`` (updates done in the epoch), ``loss_sum`` and ``rng``."""
        cfg, rt, model = self.cfg, self.rt, self.ddp_model
        seed_everything(cfg.seed, self.epoch, rt.rank)
        self.train_loader.sampler.set_epoch(self.epoch)
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, count
        done = 0  # updates done in this epoch
        batches = iter(self.train_loader)
        if partial:  # replay the batches already trained on: the loader (and its workers) draw what they drew
            for _ in range(partial['position']):
                next(batches)
            done = partial['position']
            if rt.is_main:  # the sum over all ranks so far; the others add their share of the rest
                loss_sum += torch.tensor(partial['loss_sum'], dtype=torch.float64, device=rt.device)
            _set_rng_states(partial['rng'][rt.rank], rt.device)
        bar = tqdm(batches, desc=f'epoch {self.epoch + 1}/{cfg.epochs}', leave=False, total=self.updates_per_epoch,
                   initial=done, disable=None if self.progress and rt.is_main else True, dynamic_ncols=True)  # None: tty only
        for images, targets in bar:
            images, targets = images.to(rt.device, non_blocking=True), targets.to(rt.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            with autocast(cfg, rt.device):
                loss = self.loss_fn(model(images), targets)
            if not math.isfinite(loss.item()):
                raise DivergedError(f'loss is {loss.item()} at step {self.step}; lower lr or enable clip_grad')
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.scheduler.step_update(self.step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            loss_sum += torch.stack([loss.detach().double() * len(images), torch.tensor(len(images), dtype=torch.float64, device=rt.device)])
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}', refresh=False)
            done += 1
            if done < self.updates_per_epoch and self._stop_agreed():
                bar.close()
                if rt.distributed:
                    dist.all_reduce(loss_sum)
                    states: List[Any] = [None] * rt.world_size
                    dist.all_gather_object(states, _rng_states(rt.device))
                else:
                    states = [_rng_states(rt.device)]
                return dict(position=done, loss_sum=loss_sum.tolist(), rng=states)
        bar.close()
        if rt.distributed:
            dist.all_reduce(loss_sum)
        return dict(train_loss=(loss_sum[0] / loss_sum[1]).item())

    def _stop_agreed(self) -> bool:
        """Whether a signal asked to stop, on any rank (every rank calls this at the same points)."""
        signum = self._stop.signum or 0
        if self.rt.distributed:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.stopped_by = self._stop.signum or signum
        return bool(signum)

    def fit(self, stop_after: Optional[int] = None) -> List[Dict[str, Any]]:
        """Train until ``cfg.epochs`` (or stop once ``stop_after`` epochs are done); returns the history.

        Stopping early (``stop_after``, or SIGTERM/SIGINT: see ``stopped_by``) leaves a snapshot that
        ``resume`` continues on the same schedule. The signal handlers are installed only while this runs.
        """
        cfg, rt = self.cfg, self.rt
        last_epoch = min(cfg.epochs, stop_after) if stop_after is not None else cfg.epochs
        if rt.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            _logger.info(
                f'{describe_model(cfg.model, cfg.model_kwargs)}: {n_params / 1e6:.2f}M params'
                f'{published_note(cfg.model, cfg.model_kwargs)}, {len(self.data.class_names)} classes; '
                f'{len(self.data.train)} train / {len(self.data.val)} val images at {cfg.img_size}px; '
                f'{rt.world_size} process(es) x batch {cfg.batch_size} on {rt.device}; '
                f'lr {cfg.lr * self.lr_scale:.3g}; output {self.output}')
            if self.epoch >= cfg.epochs:
                _logger.info(f'nothing to do: {self.epoch} of {cfg.epochs} epochs are done')
        with self._stop:
            while self.epoch < last_epoch:
                if not self._fit_epoch() or self._stop_agreed():
                    break
        if rt.distributed:
            dist.barrier()
        return self.history

    def _fit_epoch(self) -> bool:
        """Train one epoch (or its rest), validate, save; False when a stop request ended it early."""
        cfg, rt = self.cfg, self.rt
        start = time.perf_counter()
        partial, self._partial = self._partial, None
        lr = partial['lr'] if partial else self.optimizer.param_groups[0]['lr']
        result = self.train_one_epoch(partial)
        seconds = time.perf_counter() - start + (partial['seconds'] if partial else 0.0)
        if 'position' in result:
            if rt.is_main:
                self.save(dict(result, lr=lr, seconds=seconds))
            if rt.distributed:
                dist.barrier()  # the others wait for rank 0's snapshot
            return False
        row: Dict[str, Any] = dict(epoch=self.epoch + 1, lr=lr, **result)
        self.epoch += 1
        row.update(step=self.step, epoch_seconds=seconds,
                   images_per_second=self.updates_per_epoch * cfg.batch_size * rt.world_size / seconds)
        if self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs:
            row.update({f'val_{k}': v for k, v in evaluate(self.model, self.val_loader, rt, cfg).items() if k != 'count'})
            if self.ema is not None:
                row.update({f'ema_val_{k}': v for k, v in evaluate(self.ema.module, self.val_loader, rt, cfg).items()
                            if k != 'count'})
        self.history.append(row)
        self._report(row)
        return True

    def _save_model_folder(self, row: Dict[str, Any], card: str) -> None:
        """The best weights as ``model.safetensors``, with ``config.json`` and the card ``README.md``,
        all three replaced together: the run directory is a Hub model folder (:mod:`crossformer.hub`).
        A model that is not a CrossFormer variant with allow-listed arguments gets the weights file alone."""
        cfg = self.cfg
        info = dict(self.weights_info(), step=self.step, val_top1=row['val_top1'])
        data = dict(img_size=cfg.img_size, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
                    mean=self.mean, std=self.std)
        try:
            architecture = check_variant(cfg.model)
            write_model_folder(self.output, self.model.state_dict(), architecture=architecture,
                               model_args=cfg.model_kwargs, num_classes=len(self.data.class_names), data=data,
                               label_names=self.data.class_names, card=card, metadata={RUN_INFO_KEY: json.dumps(info)})
        except (ConfigError, CheckpointError) as e:  # not a write error: those stop the run
            _logger.warning(f'{self.output} is not a model folder ({e}); writing {WEIGHTS_FILE} alone')
            save_run_weights(self.output / WEIGHTS_FILE, self.model.state_dict(), info)

    def _card(self, row: Dict[str, Any]) -> str:
        """The model card: the data, and the best and the last epoch's validation figures, as measured."""
        cfg, best = self.cfg, self.best
        dataset = ("scikit-learn's 8x8 hand-written digits, upscaled to 32x32 (1,437 train / 360 val images)"
                   if cfg.dataset == 'digits' else f'an image folder of {len(self.data.class_names)} classes')
        best_row = next((r for r in self.history if r['epoch'] == best['epoch']), row)
        metrics = {f'validation top-1, best (epoch {best["epoch"]}, the weights here)': f'{best_row["val_top1"]:.2f}%',
                   'validation top-5, best epoch': f'{best_row["val_top5"]:.2f}%',
                   'validation loss, best epoch': f'{best_row["val_loss"]:.4f}'}
        if 'val_top1' in row:
            metrics[f'validation top-1, last epoch ({self.epoch} of {cfg.epochs})'] = f'{row["val_top1"]:.2f}%'
        return model_card(cfg.model, dataset=dataset, num_classes=len(self.data.class_names), metrics=metrics,
                          notes=[f'Trained with `crossformer train` for {self.epoch} epochs at {cfg.img_size}px.', ''])

    def _report(self, row: Dict[str, Any]) -> None:
        """Rank 0: log the epoch, save ``last`` (and the best as the model folder), rewrite the card, metrics CSV and plot."""
        if not self.rt.is_main:
            return
        improved = row.get('val_top1', -1.0) > self.best['top1']
        if improved:
            self.best = dict(top1=row['val_top1'], epoch=self.epoch)
        self.save()
        if improved:
            self._save_model_folder(row, self._card(row))
        elif self.best['epoch'] >= 0 and is_model_folder(self.output):  # this run's best, not an earlier run's
            atomic_write(self.output / CARD_FILE, lambda tmp: Path(tmp).write_text(self._card(row)))
        atomic_write(self.output / 'metrics.csv', lambda tmp: write_csv(tmp, self.history))
        try:
            atomic_write(self.output / 'metrics.png', lambda tmp: plot_curves(
                tmp, self.history, title=f'{self.cfg.model} ({self.cfg.dataset})'))
        except ImportError:
            _logger.warning('matplotlib is not installed: no metrics.png (pip install matplotlib)')
        parts = [f'epoch {self.epoch}/{self.cfg.epochs}', f'train_loss {row["train_loss"]:.4f}']
        if 'val_loss' in row:
            parts += [f'val_loss {row["val_loss"]:.4f}', f'top1 {row["val_top1"]:.2f}', f'top5 {row["val_top5"]:.2f}']
        if 'ema_val_top1' in row:
            parts.append(f'ema_top1 {row["ema_val_top1"]:.2f}')
        parts += [f'lr {row["lr"]:.2e}', f'{row["epoch_seconds"]:.1f}s']
        _logger.info('  '.join(parts))

    def close(self) -> None:
        if self.rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


class _StopRequests:
    """While training: the first SIGTERM or SIGINT asks to stop after the current step (a snapshot is
    written), a second one stops at once. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, verbose: bool = True):
        self.verbose, self.signum, self._previous = verbose, None, {}

    def __enter__(self) -> '_StopRequests':
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.verbose:
                _logger.warning(f'{signal.Signals(signum).name}: stopping after this step and saving a snapshot '
                                f'(send it again to stop at once)')
            return
        self.__exit__()  # the second signal: the previous handler (by default, end the process) takes it
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _worker_init(previous, worker_id: int) -> None:
    """Data-loader workers ignore SIGINT and SIGTERM: the training process stops them when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if previous is not None:
        previous(worker_id)


def _rng_states(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, random) as JSON-able lists."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = dict(torch=torch.get_rng_state().tolist(), numpy=[name, key.tolist(), pos, has_gauss, gauss],
                  python=[version, list(internal), gauss_next])
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device).tolist()
    return states


def _set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`_rng_states` returned (checked by :func:`_check_partial`)."""
    torch.set_rng_state(torch.tensor(states['torch'], dtype=torch.uint8))
    name, key, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states['python']
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == 'cuda' and 'cuda' in states:
        torch.cuda.set_rng_state(torch.tensor(states['cuda'], dtype=torch.uint8), device)


def _check_partial(partial: Any, source: str, updates_per_epoch: int, world_size: int) -> Optional[Dict[str, Any]]:
    """The ``partial`` entry of a snapshot taken inside an epoch, every field checked (None: at an epoch's end)."""
    if partial is None:
        return None

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    ok = (isinstance(partial, dict) and isinstance(partial.get('position'), int)
          and 0 < partial['position'] < updates_per_epoch and number(partial.get('lr')) and number(partial.get('seconds'))
          and isinstance(partial.get('loss_sum'), list) and len(partial['loss_sum']) == 2
          and all(number(v) for v in partial['loss_sum']) and isinstance(partial.get('rng'), list))
    if not ok:
        raise SnapshotError(f'{source}: "partial" must hold position (0 < p < {updates_per_epoch}), lr, seconds, '
                            f'loss_sum and rng')
    if len(partial['rng']) != world_size:
        raise ConfigError(f'{source} was taken inside an epoch by {len(partial["rng"])} process(es): resume it with '
                          f'as many, or from a snapshot taken at the end of an epoch')
    saved_torch, saved_np, saved_py = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        for states in partial['rng']:  # set_* check the states; ours come back below
            if not isinstance(states, dict) or len(states.get('torch', ())) != saved_torch.numel():
                raise ValueError('torch RNG state of the wrong size')
            if 'cuda' in states:
                torch.tensor(states['cuda'], dtype=torch.uint8)  # bytes, else an error
            _set_rng_states(states, torch.device('cpu'))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise SnapshotError(f'{source}: unusable RNG states ({e})') from None
    finally:
        torch.set_rng_state(saved_torch)
        np.random.set_state(saved_np)
        random.setstate(saved_py)
    return partial


def train(cfg: TrainConfig, resume=None, progress: bool = True) -> Trainer:
    """Train with ``cfg`` (continuing from ``resume`` if given); returns the finished :class:`Trainer`."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def validate(model: nn.Module, data_dir: Optional[str] = None, *, data: Dict[str, Any], class_names: Optional[List[str]] = None,
             batch_size: int = 128, workers: int = 4, device: str = 'cpu', progress: bool = True) -> Dict[str, float]:
    """Loss and top-1/top-5 accuracy (%) of ``model`` on the validation split of ``data_dir``.

    ``data`` holds the eval transform's settings (``img_size``, ``interpolation``, ``crop_pct``,
    ``mean``, ``std``) and, for a model trained on the embedded digits, ``dataset='digits'``,
    which is then used without ``data_dir``. ``class_names`` fixes a folder's class indices.
    """
    settings = dict(img_size=data['img_size'], interpolation=data['interpolation'], crop_pct=data['crop_pct'],
                    mean=tuple(data['mean']), std=tuple(data['std']), mixup=0.0, cutmix=0.0,
                    batch_size=batch_size, workers=workers)
    if data_dir:
        cfg = TrainConfig(dataset='folder', data_dir=str(data_dir), **settings)
    elif data.get('dataset') == 'digits':
        cfg = TrainConfig(dataset='digits', **dict(settings, workers=0))
    else:
        raise ConfigError('pass --data-dir DIR (an ImageFolder tree with a val/ folder): this checkpoint was not '
                          'trained on the embedded digits')
    transform = build_transform(cfg, dict(mean=cfg.mean, std=cfg.std), training=False)
    datasets = build_datasets(cfg, None, transform, train=False, class_names=class_names)
    if len(datasets.class_names) > model.num_classes:
        raise ConfigError(f'{data_dir} has {len(datasets.class_names)} classes but the model has {model.num_classes} outputs')
    return evaluate(model, val_loader(datasets.val, cfg), Runtime(torch.device(device)), progress=progress)
