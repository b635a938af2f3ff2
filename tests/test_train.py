"""The training engine: outputs, exact resume, distributed equivalence, schedule and metrics."""
import csv
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from crossformer.errors import ConfigError
from crossformer.train.config import config_from_dict, load_config
from crossformer.train.data import DigitsDataset
from crossformer.train.engine import Runtime, Trainer, evaluate, train
from crossformer.train.snapshot import SnapshotError, load_snapshot
from crossformer.weights import read_run_info

DIGITS = load_config()
from tiny_data import CLASSES, tiny_config, write_image_folder


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def finished_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run with augmentation, Mixup and drop path (all the randomness)."""
    out = tmp_path_factory.mktemp('full')
    trainer = train(tiny_config(data_dir, out, mixup=0.8, cutmix=1.0, drop_path_rate=0.1), progress=False)
    return trainer, out


def test_two_epochs_write_metrics_plot_and_checkpoints(finished_run):
    trainer, out = finished_run
    last = out / 'snapshots' / 'step-00000012'
    for name in ('snapshots/step-00000012/weights.safetensors', 'snapshots/step-00000012/optimizer.safetensors',
                 'snapshots/step-00000012/state.json', 'model.safetensors', 'metrics.csv', 'metrics.png'):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / 'snapshots').iterdir()) == ['step-00000006', 'step-00000012']
    assert not list(out.glob('.*')) and not list((out / 'snapshots').glob('.*')), 'temporary files left behind'
    rows = list(csv.DictReader((out / 'metrics.csv').open()))
    assert [int(r['epoch']) for r in rows] == [1, 2]
    assert [int(r['step']) for r in rows] == [6, 12]  # 24 images / batch 4
    for r in rows:
        assert 0 <= float(r['val_top1']) <= float(r['val_top5']) <= 100
        assert float(r['train_loss']) > 0
    assert (out / 'metrics.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    state = json.loads((last / 'state.json').read_text())
    assert (state['epoch'], state['step'], state['partial']) == (2, 12, None)
    info = read_run_info(last / 'weights.safetensors')
    assert info['class_names'] == list(CLASSES) and info['num_classes'] == 3 and info['step'] == 12
    weights = load_file(last / 'weights.safetensors')
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


def test_resume_after_one_epoch_matches_uninterrupted_run(finished_run, data_dir, tmp_path):
    full, _ = finished_run
    cfg = tiny_config(data_dir, tmp_path, mixup=0.8, cutmix=1.0, drop_path_rate=0.1)
    first = Trainer(cfg, progress=False)
    first.fit(stop_after=1)
    assert (first.epoch, first.step) == (1, 6)
    resumed = Trainer(cfg, resume=tmp_path, progress=False)
    assert (resumed.epoch, resumed.step) == (1, 6)
    assert resumed.optimizer.param_groups[0]['lr'] == first.optimizer.param_groups[0]['lr']
    resumed.fit()
    assert resumed.step == full.step == 12
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    full_opt, resumed_opt = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for i, state in full_opt['state'].items():
        assert torch.equal(resumed_opt['state'][i]['exp_avg_sq'], state['exp_avg_sq'])
    assert [r['train_loss'] for r in resumed.history] == [r['train_loss'] for r in full.history]


def _legacy_run(out, tmp_path):
    """The run's last snapshot in the layout written before snapshot folders: last.json + last.*.safetensors."""
    last = out / 'snapshots' / 'step-00000012'
    (tmp_path / 'last.safetensors').write_bytes((last / 'weights.safetensors').read_bytes())
    (tmp_path / 'last.optim.safetensors').write_bytes((last / 'optimizer.safetensors').read_bytes())
    state = json.loads((last / 'state.json').read_text())
    (tmp_path / 'last.json').write_text(json.dumps(dict(state, format_version=1)))
    return state


def test_a_run_of_the_earlier_layout_still_resumes_and_mixed_steps_are_refused(finished_run, tmp_path):
    full, out = finished_run
    state = _legacy_run(out, tmp_path)
    snap = load_snapshot(tmp_path)
    assert snap['step'] == 12 and snap['json_path'] == str(tmp_path / 'last.json')
    assert all(torch.equal(snap['weights'][k], v) for k, v in full.model.state_dict().items())
    (tmp_path / 'last.json').write_text(json.dumps(dict(state, format_version=1, step=7)))
    with pytest.raises(SnapshotError, match='holds step 12'):
        load_snapshot(tmp_path)
    with pytest.raises(SnapshotError, match='no training snapshot'):
        load_snapshot(tmp_path / 'missing')


def test_learning_rates_scale_with_global_batch_and_norms_get_no_weight_decay(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, lr=5e-4, warmup_lr=5e-7, min_lr=5e-6, lr_base_size=512, warmup_epochs=1)
    trainer = Trainer(cfg, progress=False)
    assert trainer.lr_scale == 4 / 512
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(5e-7 * 4 / 512)  # warm-up start
    # as the reference (timm's CosineLRScheduler, no warm-up prefix): linear warm-up to the peak over
    # warmup_t steps, while the cosine runs over all t_initial steps from step 0

    def lr():
        return trainer.optimizer.param_groups[0]['lr']

    peak, low, warm = 5e-4 * 4 / 512, 5e-6 * 4 / 512, 5e-7 * 4 / 512
    total, warmup = 2 * trainer.updates_per_epoch, trainer.updates_per_epoch
    trainer.scheduler.step_update(warmup - 1)
    assert lr() == pytest.approx(warm + (warmup - 1) * (peak - warm) / warmup)
    for t in (warmup, total - 1):
        trainer.scheduler.step_update(t)
        assert lr() == pytest.approx(low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / total)))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group['params']:
            assert group['weight_decay'] == (0.0 if p.ndim <= 1 else 0.05), names[id(p)]


def test_ema_amp_and_gradient_checkpointing_run(data_dir, tmp_path):
    trainer = train(tiny_config(data_dir, tmp_path, epochs=1, warmup_epochs=0, ema=True, ema_decay=0.5, amp=True,
                                grad_checkpointing=True, clip_grad=1.0), progress=False)
    assert all(stage.grad_checkpointing for stage in trainer.model.layers)
    row = trainer.history[-1]
    assert 0 <= row['ema_val_top1'] <= 100 and row['ema_val_loss'] > 0
    assert read_run_info(tmp_path / 'snapshots' / 'step-00000006' / 'ema.safetensors')['ema'] is True
    no_ema = tmp_path / 'no_ema'
    train(tiny_config(data_dir, no_ema, epochs=1, warmup_epochs=0), progress=False)
    with pytest.raises(ConfigError, match='without EMA'):
        Trainer(tiny_config(data_dir, no_ema, epochs=2, warmup_epochs=0, ema=True), resume=no_ema, progress=False)


class _FixedLogits(torch.nn.Module):
    def forward(self, x):
        return x[:, 0, 0, :4]  # the "image" holds its own logits


def test_evaluate_counts_top1_top5_and_loss_exactly():
    logits = torch.tensor([[4., 3, 2, 1], [1, 4, 3, 2], [1, 2, 3, 4], [4, 3, 2, 1]])
    targets = torch.tensor([0, 2, 3, 3])  # top-1 hits: 0 and 3 -> 50%
    images = logits[:, None, None, :].expand(4, 3, 1, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=3)
    result = evaluate(_FixedLogits(), loader, Runtime(torch.device('cpu')))
    assert result['top1'] == 50.0 and result['top5'] == 100.0 and result['count'] == 4
    assert result['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def test_digits_are_embedded_with_a_fixed_split():
    train_set, val_set = DigitsDataset('train'), DigitsDataset('val')
    assert (len(train_set), len(val_set)) == (1437, 360)
    image, label = val_set[0]
    assert image.size == (8, 8) and image.mode == 'RGB' and label == 0
    assert sorted(set(val_set.targets)) == list(range(10))


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        Trainer(DIGITS.replace(dataset='folder', data_dir=str(tmp_path / 'nope')), progress=False)
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'val' / 'a').mkdir(parents=True)
    with pytest.raises(ConfigError, match='empty dataset'):
        Trainer(DIGITS.replace(dataset='folder', data_dir=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="unknown model 'crossformer_tt'; did you mean crossformer_t"):
        Trainer(DIGITS.replace(model='crossformer_tt'), progress=False)


# ---- distributed --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    from safetensors.torch import save_file
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    trainer = train(config_from_dict(cfg_dict), progress=False)
    assert trainer.rt.distributed and trainer.rt.world_size == world_size
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f'{out}/rank{rank}.safetensors')


def test_ddp_two_processes_equal_single_process_on_the_same_global_batch(data_dir, tmp_path):
    # Deterministic training (no augmentation, no mixup, no drop path), so only the data split differs.
    # SGD, not AdamW: some gradients are zero in exact arithmetic (a DPB output bias shifts all logits
    # of a head, which softmax ignores), and Adam would scale their rounding noise up to full steps.
    common = dict(no_aug=True, drop_path_rate=0.0, smoothing=0.0, epochs=2, warmup_epochs=0, opt='sgd', lr=0.05)
    ddp_cfg = tiny_config(data_dir, tmp_path / 'ddp', batch_size=2, threads=1, **common)
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp_cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (load_file(tmp_path / f'rank{r}.safetensors') for r in (0, 1))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f'ranks differ at {k}'

    single = train(tiny_config(data_dir, tmp_path / 'single', batch_size=4, **common), progress=False)
    assert single.step == 12  # the same 12 global batches of 4
    start = Trainer(tiny_config(data_dir, tmp_path / 'start', batch_size=4, **common), progress=False).model
    moved = 0.0
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(rank0[k], v, atol=1e-5, rtol=1e-4)
        moved = max(moved, (v - start.state_dict()[k]).abs().max().item())
    assert moved > 1e-3  # the weights did train, so the agreement means something
    state = json.loads((tmp_path / 'ddp' / 'snapshots' / 'step-00000012' / 'state.json').read_text())
    assert state['world_size'] == 2  # rank 0 saved
