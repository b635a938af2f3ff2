"""SIGTERM to a real ``python -m crossformer train``: it saves a snapshot, exits 143, and the resumed run
equals an uninterrupted one bit for bit."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from crossformer.train.engine import Trainer, resume_config, train
from tiny_data import tiny_config, write_image_folder


@pytest.mark.skipif(os.name == 'nt', reason='POSIX signals')
def test_sigterm_saves_a_snapshot_exits_143_and_the_run_resumes_exactly(tmp_path):
    data = write_image_folder(tmp_path / 'data')
    cfg = tiny_config(data, tmp_path / 'unused', epochs=3, threads=1, mixup=0.8, cutmix=1.0, drop_path_rate=0.1)
    recipe = cfg.to_dict()
    for key in ('data_dir', 'output', 'dataset'):
        recipe.pop(key)
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump(recipe))
    out = tmp_path / 'out'
    process = subprocess.Popen(
        [sys.executable, '-m', 'crossformer', 'train', '--config', str(tmp_path / 'tiny.yaml'), '--data-dir', str(data),
         '--output', str(out), '--no-progress'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))  # PYTHONPATH inherited
    try:
        deadline = time.monotonic() + 300
        while not (out / 'snapshots' / 'step-00000006').is_dir():  # training is under way: epoch 1 is saved
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('crossformer train: stopped by SIGTERM at epoch ') and last.endswith(
        f'snapshot saved, continue with: crossformer train --resume {out}'), stderr

    threads = torch.get_num_threads()
    try:
        resumed = Trainer(resume_config(out), resume=out, progress=False)
        assert 6 <= resumed.step < 18  # it stopped somewhere in epoch 2 or 3
        resumed.fit()
        full = train(cfg.replace(output=str(tmp_path / 'full')), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert resumed.step == full.step == 18
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert [r['train_loss'] for r in resumed.history] == [r['train_loss'] for r in full.history]
