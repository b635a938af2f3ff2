"""Snapshots that survive a kill at any instant: faults injected at every write of a save, a full
disk, damaged snapshots, and stops requested by a signal inside an epoch."""
import errno
import json
import os
import pathlib
import shutil
import signal

import pytest
import torch

import crossformer.weights
from crossformer.cli import main
from crossformer.errors import CheckpointError
from crossformer.errors import WriteError
from crossformer.readers import read_safetensors_file
from crossformer.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, finish_model_folder, read_model_folder
from crossformer.train.engine import Trainer, train
from crossformer.train.snapshot import SnapshotError, find_snapshots, load_snapshot
from tiny_data import tiny_config, write_image_folder

HUB_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
RANDOM = dict(mixup=0.8, cutmix=1.0, drop_path_rate=0.1)  # every source of randomness


class Killed(BaseException):
    """The process died here: raised by every filesystem call from the fault on, so no cleanup runs."""


class Faults:
    """Counts a save's writes (file creations, fsyncs, renames, mkdirs); the ``fail_at``-th raises ``error``.

    With ``kill``, every later filesystem call (removals included) raises too, as a dead process does nothing.
    """
    WRITES = [(os, 'fsync'), (os, 'replace'), (os, 'rename'), (os, 'mkdir'), (crossformer.weights, 'save_file')]
    REMOVALS = [(os, 'unlink'), (os, 'rmdir'), (shutil, 'rmtree')]

    def __init__(self, monkeypatch, fail_at=None, error=None, kill=False):
        self.count, self.fail_at, self.error, self.kill, self.fired = 0, fail_at, error, kill, False
        for module, name in self.WRITES:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), counts=True))
        monkeypatch.setattr(pathlib.Path, 'write_text', self._wrap(pathlib.Path.write_text, counts=True))
        if kill:
            for module, name in self.REMOVALS:
                monkeypatch.setattr(module, name, self._wrap(getattr(module, name), counts=False))

    def _wrap(self, fn, counts):
        def wrapped(*args, **kwargs):
            if counts:
                self.count += 1
            if self.kill and self.fired:
                raise Killed
            if counts and self.count == self.fail_at:
                self.fired = True
                raise Killed if self.kill else self.error
            return fn(*args, **kwargs)
        return wrapped


@pytest.fixture(autouse=True)
def _no_flush(monkeypatch):
    """``fsync`` does nothing here (a test cannot cut the power); the calls are still counted as writes."""
    monkeypatch.setattr(os, 'fsync', lambda fd: None)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run (12 updates) with all the randomness, and a copy of its folder as
    the end of epoch 1 left it (snapshot step 6, the model folder, its card)."""
    out = tmp_path_factory.mktemp('full')
    trainer = Trainer(tiny_config(data_dir, out, **RANDOM), progress=False)
    trainer.fit(stop_after=1)
    epoch_one = shutil.copytree(out, tmp_path_factory.mktemp('epoch1') / 'run')
    trainer.fit()
    return trainer, epoch_one


@pytest.fixture(scope='module')
def full(runs):
    return runs[0]


@pytest.fixture(scope='module')
def after_epoch_one(runs):
    return runs[1]


def _same_state(snap, model_state, optimizer_state):
    return (all(torch.equal(snap['weights'][k], v) for k, v in model_state.items())
            and all(torch.equal(snap['optimizer_state']['state'][i][name], value)
                    for i, s in optimizer_state['state'].items() for name, value in s.items() if torch.is_tensor(value)))


def _hub_bytes(folder):
    """The model folder's content (safetensors metadata compared as a dict: its order varies between saves)."""
    tensors, metadata = read_safetensors_file(folder / WEIGHTS_FILE)
    return ({k: v.numpy().tobytes() for k, v in tensors.items()}, metadata,
            (folder / CONFIG_FILE).read_text(), (folder / CARD_FILE).read_text())


def _leftovers(folder):
    return sorted(p.name for p in [*folder.glob('.*'), *(folder / 'snapshots').glob('.*')])


def test_a_fault_at_every_write_of_a_save_leaves_a_run_that_resumes(full, after_epoch_one, tmp_path, monkeypatch):
    """The end-of-epoch-2 save (snapshot, then the model folder with its card), failing at its k-th write,
    for every k, as an exception (cleanup runs) and as a kill (nothing runs after it). Every time the
    newest complete snapshot equals the uninterrupted run's state at its step (6 or 12), so the resumed
    run equals it (as test_train's resume test and the mid-epoch test below show from those states), and
    the model folder is all old or all new."""
    at_6 = load_snapshot(after_epoch_one)
    row = full.history[-1]

    def save_epoch_two(folder):  # what _report writes that matters for a resume and for the model folder
        full.output, full.best = folder, dict(top1=-1.0, epoch=-1)
        full.save()
        full._save_model_folder(row, full._card(row))
    monkeypatch.setattr(full, 'output', full.output)  # both put back at the end
    monkeypatch.setattr(full, 'best', full.best)

    reference = shutil.copytree(after_epoch_one, tmp_path / 'reference')
    with monkeypatch.context() as m:
        counting = Faults(m)
        save_epoch_two(reference)
    writes = counting.count
    assert writes >= 25
    old_hub, new_hub = _hub_bytes(after_epoch_one), _hub_bytes(reference)
    assert old_hub[0] != new_hub[0] and old_hub[3] != new_hub[3]
    steps_seen = set()
    for kill in (False, True):
        for k in range(1, writes + 1):
            folder = shutil.copytree(after_epoch_one, tmp_path / f'{kill}-{k}')
            with monkeypatch.context() as m:
                faults = Faults(m, fail_at=k, error=OSError(errno.EIO, 'injected'), kill=kill)
                try:
                    save_epoch_two(folder)
                except (Killed if kill else WriteError):
                    pass
                else:  # mkdir(exist_ok=True) of an existing folder ignores its error: nothing failed
                    assert not kill and _hub_bytes(folder) == new_hub and load_snapshot(folder)['step'] == 12, k
                assert faults.fired
            if not kill:  # temporary files removed; a committed model-folder update stays, to be finished
                assert set(_leftovers(folder)) <= {'.model-folder.pending'}, (k, _leftovers(folder))
            snap = load_snapshot(folder)  # what --resume takes
            steps_seen.add(snap['step'])
            if snap['step'] == 12:
                assert _same_state(snap, full.model.state_dict(), full.optimizer.state_dict()), k
            else:
                assert snap['step'] == 6 and _same_state(snap, at_6['weights'], at_6['optimizer_state']), k
            finish_model_folder(folder)  # what --resume does first
            assert _hub_bytes(folder) in (old_hub, new_hub), (kill, k)
            read_model_folder(folder)
            if kill:
                save_epoch_two(folder)  # the next save works and clears what the kill left
                assert _leftovers(folder) == [] and _hub_bytes(folder) == new_hub
                assert [c.path.name for c in find_snapshots(folder)] == ['step-00000012', 'step-00000006']
            shutil.rmtree(folder)
    assert steps_seen == {6, 12}


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_snapshot(after_epoch_one, tmp_path, monkeypatch, capsys):
    run_dir = shutil.copytree(after_epoch_one, tmp_path / 'run')
    before = _hub_bytes(run_dir)
    real = crossformer.weights.save_file

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(crossformer.weights, 'save_file', full_disk)
    code = main(['train', '--resume', str(run_dir), '--no-progress'])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1, err
    assert 'No space left on device; snapshot step-00000012 not saved, kept step-00000006' in err
    assert [p.name for p in (run_dir / 'snapshots').iterdir()] == ['step-00000006'] and _leftovers(run_dir) == []
    assert _hub_bytes(run_dir) == before
    monkeypatch.setattr(crossformer.weights, 'save_file', real)
    assert load_snapshot(run_dir)['step'] == 6


@pytest.mark.skipif(os.name == 'nt', reason='POSIX permissions')
def test_an_unwritable_folder_is_a_one_line_error(after_epoch_one, tmp_path, capsys, monkeypatch):
    run_dir = shutil.copytree(after_epoch_one, tmp_path / 'run')
    snapshots = run_dir / 'snapshots'
    if os.geteuid() == 0:  # root writes anywhere: the folder answers as an unwritable one would
        real_mkdir = pathlib.Path.mkdir

        def refused(self, *args, **kwargs):
            if self.parent == snapshots:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, 'mkdir', refused)
    snapshots.chmod(0o500)
    try:
        code = main(['train', '--resume', str(run_dir), '--no-progress'])
    finally:
        snapshots.chmod(0o700)
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and 'Permission denied' in err and 'kept step-00000006' in err and err.count('\n') == 1, err
    assert load_snapshot(run_dir)['step'] == 6


def test_resume_takes_the_newest_complete_snapshot_and_says_what_it_skipped(full, data_dir, tmp_path, caplog):
    run_dir = shutil.copytree(full.cfg.output, tmp_path / 'run')
    newest = run_dir / 'snapshots' / 'step-00000012'
    optimizer = newest / 'optimizer.safetensors'
    data = bytearray(optimizer.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    optimizer.write_bytes(bytes(data))
    assert [c.problem for c in find_snapshots(run_dir)] == [None, None]  # sizes match: the hash tells
    with caplog.at_level('WARNING'):
        resumed = Trainer(tiny_config(data_dir, run_dir, **RANDOM), resume=run_dir, progress=False)
    assert resumed.step == 6
    assert 'skipped snapshot step-00000012: ' in caplog.text and 'SHA-256 differs' in caplog.text

    (newest / 'manifest.json').unlink()  # as a save killed before its rename would never show it
    assert find_snapshots(run_dir)[0].problem == 'no manifest.json (an interrupted save)'
    with pytest.raises(SnapshotError, match=r'no usable training snapshot in .*run: step-00000012: no manifest.json'):
        load_snapshot(newest)
    shutil.rmtree(run_dir / 'snapshots' / 'step-00000006')
    (run_dir / 'snapshots' / '.step-00000018.tmp').mkdir()
    with pytest.raises(SnapshotError) as error:
        load_snapshot(run_dir)
    assert str(error.value) == (
        f'no complete training snapshot in {run_dir}: snapshots/ holds .step-00000018.tmp, step-00000012 '
        f'(step-00000012: no manifest.json (an interrupted save)) (crossformer train writes snapshots/step-N/)')


def _signal_at(trainer, monkeypatch, step, signum, times=1):
    """Send ``signum`` to this process once update ``step`` is done (from inside the training loop)."""
    step_update = trainer.scheduler.step_update

    def hook(num_updates, *args, **kwargs):
        if num_updates == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return step_update(num_updates, *args, **kwargs)
    monkeypatch.setattr(trainer.scheduler, 'step_update', hook)


@pytest.mark.parametrize('workers', [0, 2])
def test_a_stop_inside_an_epoch_resumes_to_the_uninterrupted_run(full, data_dir, tmp_path, monkeypatch, workers):
    """SIGTERM 3 updates into an epoch (of 6): a snapshot with the RNG states; the resumed run replays
    the epoch's first 3 batches (through the loader's workers too) and equals the uninterrupted run
    bit for bit. With workers, one epoch (their start-up is slow); without, the second epoch."""
    reference, epochs, stop = full, 2, 9
    if workers:
        epochs, stop = 1, 3
        reference = train(tiny_config(data_dir, tmp_path / 'full', workers=workers, epochs=1, **RANDOM), progress=False)
    cfg = tiny_config(data_dir, tmp_path / 'run', workers=workers, epochs=epochs, **RANDOM)
    before = signal.getsignal(signal.SIGTERM)
    first = Trainer(cfg, progress=False)
    _signal_at(first, monkeypatch, stop, signal.SIGTERM)
    first.fit()
    assert (first.stopped_by, first.epoch, first.step) == (signal.SIGTERM, epochs - 1, stop)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers only while training
    state = json.loads((tmp_path / 'run' / 'snapshots' / f'step-{stop:08d}' / 'state.json').read_text())
    assert state['partial']['position'] == 3 and len(state['partial']['rng']) == 1
    monkeypatch.undo()

    resumed = Trainer(cfg, resume=tmp_path / 'run', progress=False)
    resumed.fit()
    assert resumed.step == reference.step == 6 * epochs and resumed.stopped_by is None
    for k, v in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for i, s in reference.optimizer.state_dict()['state'].items():
        assert torch.equal(resumed.optimizer.state_dict()['state'][i]['exp_avg'], s['exp_avg'])
    assert [r['train_loss'] for r in resumed.history] == [r['train_loss'] for r in reference.history]


def test_a_second_interrupt_stops_at_once(data_dir, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(tiny_config(data_dir, tmp_path, **RANDOM), progress=False)
    _signal_at(trainer, monkeypatch, 3, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 3 and not (tmp_path / 'snapshots').exists()  # no snapshot: it stopped at once
    assert signal.getsignal(signal.SIGINT) is before


def test_a_damaged_rng_state_is_refused(data_dir, tmp_path):
    run_dir = tmp_path / 'run'
    trainer = Trainer(tiny_config(data_dir, run_dir, **RANDOM), progress=False)
    trainer.step = 3
    trainer.save(dict(position=3, loss_sum=[1.0, 12.0], lr=1e-4, seconds=0.5, rng=[dict(torch=[0] * 7)]))
    with pytest.raises(SnapshotError, match='unusable RNG states'):
        Trainer(trainer.cfg, resume=run_dir, progress=False)


def test_an_interrupted_model_folder_update_is_refused_then_finished(after_epoch_one, tmp_path):
    folder = shutil.copytree(after_epoch_one, tmp_path / 'run')
    pending = folder / '.model-folder.pending'
    pending.mkdir()
    (pending / CARD_FILE).write_text('the new card')  # committed, not yet moved: a kill between the moves
    with pytest.raises(CheckpointError, match='an update of this folder was interrupted'):
        read_model_folder(folder)
    finish_model_folder(folder)
    assert not pending.exists() and (folder / CARD_FILE).read_text() == 'the new card'
    assert read_model_folder(folder)['num_classes'] == 3
