"""Choosing each product's path by timing it on the running host: a path other than torch's only
when it wins by the margin, timed once per key, kept on disk per host, a damaged or foreign file
ignored with one warning, and every choice computing the definition's numbers."""
import json
import os
import time
import warnings

import pytest
import timm
import torch

from crossformer import set_speedups
from crossformer.layers.speedups import tuning
from threads import run_in_threads


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('CROSSFORMER_TUNING_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('CROSSFORMER_TUNING', raising=False)
    tuning.clear_tuning()
    yield tmp_path / 'cache'
    tuning.clear_tuning()


@pytest.fixture
def timed(monkeypatch):
    """Timings given by the test: ``timed(seconds)`` returns the list of timed path tuples."""
    def install(seconds):
        calls = []

        def time_paths(paths, run, rounds=tuning.TUNING_ROUNDS):
            calls.append(tuple(paths))
            return {p: seconds[p] for p in paths}, {p: run(p) for p in paths}
        monkeypatch.setattr(tuning, 'time_paths', time_paths)
        return calls
    return install


def run(path):
    return torch.full((2,), float(tuning.PATHS.index(path)))


def test_a_path_is_taken_only_when_it_wins_by_the_margin(cache_dir, timed):
    timed({'default': 1.0, 'onednn': 0.97, 'fp32': 2.0})
    assert tuning.choose(('linear', 1), ('default', 'onednn', 'fp32'), run)[0] == 'default'  # 3% is noise
    timed({'default': 1.0, 'onednn': 0.9, 'fp32': 0.8})
    path, out = tuning.choose(('linear', 2), ('default', 'onednn', 'fp32'), run)
    assert path == 'fp32' and out.tolist() == [2.0, 2.0]  # the chosen path's output of its timing
    assert tuning.choose(('linear', 3), ('default',), run) == ('default', None)  # nothing to choose


def test_a_key_is_timed_once_then_held(cache_dir, timed):
    calls = timed({'default': 1.0, 'onednn': 0.5})
    assert tuning.choose(('conv', 7), ('default', 'onednn'), run)[0] == 'onednn'
    assert tuning.choose(('conv', 7), ('default', 'onednn'), run) == ('onednn', None)
    assert calls == [('default', 'onednn')]
    assert [(k, p) for k, p, _ in tuning.tuned_choices()] == [(('conv', 7), 'onednn')]


def test_choices_are_kept_on_disk_for_this_host(cache_dir, timed):
    calls = timed({'default': 1.0, 'onednn': 0.5})
    tuning.choose(('linear', 96, 288, 'float32', 64, 2), ('default', 'onednn'), run)
    path = tuning.tuning_file()
    assert path.parent == cache_dir and path.is_file()
    doc = json.loads(path.read_text())
    assert doc['host'] == tuning.host_signature() and doc['choices'] == [[['linear', 96, 288, 'float32', 64, 2], 'onednn']]
    tuning.clear_tuning()  # as a new process
    assert tuning.choose(('linear', 96, 288, 'float32', 64, 2), ('default', 'onednn'), run) == ('onednn', None)
    assert len(calls) == 1  # read, not timed again


def _valid_doc():
    return {'format': tuning.FORMAT, 'host': tuning.host_signature(), 'choices': [[['linear', 8], 'onednn']]}


@pytest.mark.parametrize('content', [
    b'\x00\xff garbage',
    b'{"format": ',
    json.dumps(dict(_valid_doc(), host=dict(tuning.host_signature(), cpu='another CPU'))).encode(),
    json.dumps(dict(_valid_doc(), choices=[[['linear', 8], 'rm -rf /']])).encode(),
    json.dumps(dict(_valid_doc(), choices=[[['linear', -8], 'onednn']])).encode(),
    json.dumps(dict(_valid_doc(), choices=[[['linear', '../../etc'], 'onednn']])).encode(),
    json.dumps(dict(_valid_doc(), extra=1)).encode(),
    b'[' * 100000,
    b' ' * (tuning.MAX_FILE_BYTES + 1),
    'symlink',
], ids=['binary', 'truncated', 'another-host', 'unknown-path', 'negative', 'path-in-key', 'extra-field', 'deep',
        'oversized', 'symlink'])
def test_a_damaged_or_foreign_file_is_ignored_with_one_warning(cache_dir, timed, content):
    path = tuning.tuning_file()
    path.parent.mkdir(parents=True)
    if content == 'symlink':
        target = cache_dir.parent / 'elsewhere.json'
        target.write_text(json.dumps(_valid_doc()))
        path.symlink_to(target)
    else:
        path.write_bytes(content)
    calls = timed({'default': 1.0, 'onednn': 2.0})
    with pytest.warns(UserWarning, match='ignoring the tuning file') as caught:
        assert tuning.choose(('linear', 8), ('default', 'onednn'), run)[0] == 'default'  # timed afresh
    assert len([w for w in caught if 'tuning' in str(w.message)]) == 1 and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tuning.choose(('linear', 9), ('default', 'onednn'), run)  # one warning, not one per product


def test_a_valid_file_of_this_host_is_read(cache_dir, timed):
    path = tuning.tuning_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_valid_doc()))
    calls = timed({'default': 1.0, 'onednn': 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert tuning.choose(('linear', 8), ('default', 'onednn'), run) == ('onednn', None)
    assert calls == []


def test_an_unwritable_cache_folder_only_warns(tmp_path, monkeypatch, timed):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    monkeypatch.setenv('CROSSFORMER_TUNING_CACHE', str(blocker / 'cache'))
    tuning.clear_tuning()
    timed({'default': 1.0, 'onednn': 0.5})
    with pytest.warns(UserWarning, match='cannot keep tuning choices'):
        assert tuning.choose(('linear', 10), ('default', 'onednn'), run)[0] == 'onednn'
    tuning.clear_tuning()


def test_tuning_off_takes_torch_path_without_timing(cache_dir, timed, monkeypatch):
    monkeypatch.setenv('CROSSFORMER_TUNING', 'off')
    calls = timed({'default': 1.0, 'onednn': 0.1})
    assert tuning.choose(('linear', 11), ('default', 'onednn'), run) == ('default', None)
    assert calls == [] and not cache_dir.exists()


def test_real_timings_pick_the_clearly_faster_path(cache_dir):
    def slow_default(path):
        time.sleep(0.004 if path == 'default' else 0)
        return run(path)

    def slow_onednn(path):
        time.sleep(0.004 if path == 'onednn' else 0)
        return run(path)

    assert tuning.choose(('linear', 12), ('default', 'onednn'), slow_default)[0] == 'onednn'
    assert tuning.choose(('linear', 13), ('default', 'onednn'), slow_onednn)[0] == 'default'
    timings = {k: s for k, _, s in tuning.tuned_choices()}
    assert timings[('linear', 12)]['default'] >= 0.004 > timings[('linear', 12)]['onednn']


def test_a_hopeless_path_is_dropped_after_its_first_call(cache_dir):
    counts = {'default': 0, 'onednn': 0}

    def hopeless(path):
        counts[path] += 1
        time.sleep(0.03 if path == 'onednn' else 0.001)
        return run(path)

    assert tuning.choose(('conv', 14), ('default', 'onednn'), hopeless)[0] == 'default'
    assert counts == {'default': 1, 'onednn': 1}  # nothing left to time against


def test_a_first_call_costs_count_for_nothing(cache_dir):
    """The first call of a path also packs, or generates kernels: it is a timed round (no extra
    untimed call), and the fewest seconds leave its cost out, so a path slow only once still wins."""
    counts = {'default': 0, 'onednn': 0}

    def packs_first(path):
        counts[path] += 1
        time.sleep(0.005 if path == 'default' else 0.02 if counts[path] == 1 else 0.004)
        return run(path)

    assert tuning.choose(('linear', 15), ('default', 'onednn'), packs_first)[0] == 'onednn'
    assert counts == {'default': tuning.TUNING_ROUNDS, 'onednn': tuning.TUNING_ROUNDS}


def test_threads_tuning_one_model_give_the_definition(cache_dir):
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                              num_classes=10).eval()
    plain = set_speedups(timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1),
                                           num_heads=(1, 2, 4, 8), num_classes=10).eval(), False)
    plain.load_state_dict(model.state_dict())
    images = [torch.randn(1, 3, 32 * (i + 2), 48) for i in range(3)]
    with torch.no_grad():
        expected = [plain(x) for x in images]

    def work(t):
        with torch.no_grad():
            for i in range(len(images)):
                j = (i + t) % len(images)
                torch.testing.assert_close(model(images[j]), expected[j], atol=1e-5, rtol=0)

    assert run_in_threads(work, [(t,) for t in range(3)]) == []
    kinds = {k[0] for k, _, _ in tuning.tuned_choices()}
    assert kinds == {'linear', 'conv', 'attention'}  # products, and SDPA against explicit attention
    assert json.loads(tuning.tuning_file().read_text())['choices']  # kept for the next process
    assert not [f for f in os.listdir(cache_dir) if f.endswith('.tmp')]  # no temporary file left
