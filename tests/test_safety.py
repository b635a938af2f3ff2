"""No network access and no files written at import or model creation.

A fresh interpreter, with every socket connection and name lookup refused, imports the package
and builds every registered variant through timm (``crossformer_t`` and ``crossformerpp_s`` in
full and run once; the others on the meta device with one block per stage, to stay fast: the
same entry point, config and builder), with the home and cache directories and the working
directory pointed at empty temporary directories that must stay empty.
"""
import json
import os
import subprocess
import sys

SCRIPT = r'''
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError('network access attempted')
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

import timm, torch
import crossformer

built = {}
for name in timm.list_models('crossformer*'):
    if name in ('crossformer_t', 'crossformerpp_s'):
        model = timm.create_model(name, pretrained=False).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    else:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False, depths=(1, 1, 1, 1))
    built[name] = str(next(model.parameters()).device)
try:
    timm.create_model('crossformer_s', pretrained=True)
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps(dict(built=built, error=error, attempts=attempts)))
'''


def _files(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root) for f in fs + dirs)


def test_no_network_and_no_files_at_import_and_creation(tmp_path):
    home, cwd = tmp_path / 'home', tmp_path / 'cwd'
    home.mkdir()
    cwd.mkdir()
    env = dict(os.environ, HOME=str(home), TORCH_HOME=str(home / 'torch'), XDG_CACHE_HOME=str(home / 'cache'),
               HF_HOME=str(home / 'hf'), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['attempts'] == []
    assert report['built'] == {
        'crossformer_b': 'meta', 'crossformer_l': 'meta', 'crossformer_s': 'meta', 'crossformer_t': 'cpu',
        'crossformerpp_b': 'meta', 'crossformerpp_h': 'meta', 'crossformerpp_l': 'meta', 'crossformerpp_s': 'cpu'}
    assert 'not downloaded automatically' in report['error'] and 'github.com/cheerss/CrossFormer' in report['error']
    assert _files(home) == [] and _files(cwd) == []
