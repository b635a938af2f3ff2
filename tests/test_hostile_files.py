"""Hostile checkpoints and metadata, through the public entry points: nothing a file holds may change
the process, the model, the network or the memory. One section per finding of the security review."""
import json
import socket
import struct
import zipfile

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from crossformer import CheckpointError, CrossFormerError, load_checkpoint, read_checkpoint
from crossformer.cli import main
from crossformer.predict import load_trained
from crossformer.weights import RUN_INFO_KEY

from pickles import FOUR_FLOATS, PROTO, SNAPSHOT, g, i, in_dict, snapshot, tensor, u, write_archive

SMALL = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs with sockets refused: no file may make the library reach the network."""
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model('crossformer_t', **SMALL).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


# ---- 1. the reader is never looser than torch's weights_only --------------------------------------

def test_a_pickle_that_builds_onto_an_allowed_function_is_refused_and_changes_nothing(tmp_path):
    """BUILD with a state onto torch._utils._rebuild_tensor_v2 would set attributes on it for the whole process."""
    body = g('torch._utils', '_rebuild_tensor_v2') + b'}(' + u('__defaults__') + b'(' + i(1) + b'tub'
    path = write_archive(tmp_path / 'build.pth', in_dict(body))
    with pytest.raises(CheckpointError, match='BUILD'):
        read_checkpoint(path)
    assert snapshot() == SNAPSHOT
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)  # its own default, untouched


@pytest.mark.parametrize('global_', [('builtins', 'bytearray'), ('torch._utils', '_rebuild_tensor'),
                                     ('torch', 'Tensor'), ('builtins', 'getattr')])
def test_globals_beyond_a_state_dict_are_refused_by_name(tmp_path, global_):
    path = write_archive(tmp_path / 'g.pth', in_dict(g(*global_) + b')R'))
    with pytest.raises(CheckpointError, match=f'refused pickle global {global_[0]}.{global_[1]}'):
        read_checkpoint(path)


# ---- 2. a failed load leaves the model exactly as it was ------------------------------------------

@pytest.mark.parametrize('bad, message', [
    (lambda t: t.to_sparse(), 'not a dense CPU tensor'),
    (lambda t: torch.empty_like(t, device='meta'), 'not a dense CPU tensor'),
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), 'not a dense CPU tensor'),
    (lambda t: t.to(torch.complex64), 'complex'),
    (lambda t: t.to(torch.int64), 'int64 but the model holds torch.float32'),
    (lambda t: t.bool(), 'bool but the model holds torch.float32'),
    (lambda t: t.clone().fill_(float('nan')), 'NaN or infinite'),
    (lambda t: t.clone().fill_(float('inf')), 'NaN or infinite'),
])
def test_a_bad_tensor_fails_before_the_model_is_touched(model, bad, message):
    before = _state(model)
    state_dict = {k: v + 1 for k, v in before.items()}  # every value differs from the model's
    last = sorted(state_dict)[-1]  # checked last, after all the good ones
    state_dict[last] = bad(state_dict[last])
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model, state_dict)
    assert _unchanged(model, before)


def test_two_keys_that_map_to_one_name_are_an_error(model):
    state_dict = _state(model)
    state_dict['head.weight'] = state_dict['head.fc.weight'] + 1  # the reference's name for the same tensor
    with pytest.raises(CheckpointError, match="two keys of the checkpoint map to 'head.fc.weight'"):
        load_checkpoint(model, state_dict)


def test_half_precision_weights_load_cast_to_the_model_dtype(model):
    state_dict = {k: (v + 1).half() for k, v in _state(model).items()}
    load_checkpoint(model, state_dict)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert torch.equal(model.norm.weight, state_dict['norm.weight'].float())


# ---- 3. metadata is data, not arguments ------------------------------------------------------------

def _run_file(tmp_path, net, **info):
    meta = dict(model='crossformer_t', model_kwargs={k: v for k, v in SMALL.items() if k != 'num_classes'},
                num_classes=3, class_names=['a', 'b', 'c'], img_size=32, interpolation='bicubic', crop_pct=0.9,
                mean=[0.5] * 3, std=[0.25] * 3, dataset='folder')
    meta.update(info)
    path = tmp_path / 'run.safetensors'
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={RUN_INFO_KEY: json.dumps(meta), 'format': 'pt'})
    return path


def test_a_clean_run_file_loads(model, tmp_path):
    loaded = load_trained(_run_file(tmp_path, model))
    assert loaded.class_names == ['a', 'b', 'c'] and loaded.img_size == 32 and loaded.std == (0.25,) * 3


@pytest.mark.parametrize('info, message', [
    (dict(model_kwargs=dict(pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='evil/model'))), 'refused model arguments'),
    (dict(model_kwargs=dict(checkpoint_path='/etc/passwd')), 'refused model arguments'),
    (dict(model_kwargs=dict(file='other.pth')), 'refused model arguments'),
    (dict(model='resnet18'), "unknown model 'resnet18'"),
    (dict(model_kwargs=dict(embed_dim=2 ** 30)), 'embed_dim'),
    (dict(num_classes=10 ** 9), 'classes'),
    (dict(img_size=10 ** 6), 'img_size'),
    (dict(crop_pct=-1), 'crop_pct'),
    (dict(std=[0.0, 1.0, 1.0]), 'std'),
    (dict(mean=[0.5]), 'mean'),
    (dict(class_names=['a']), '1 class names for a head of 3'),
    (dict(model_kwargs=dict(embed_dim=32)), 'does not fit its tensors'),
])
def test_run_metadata_cannot_steer_creation(model, tmp_path, info, message):
    with pytest.raises(CrossFormerError, match=message):  # CheckpointError, or ConfigError for an unknown name
        load_trained(_run_file(tmp_path, model, **info))


def test_predict_refuses_a_steering_file_in_one_line(model, tmp_path, capsys):
    path = _run_file(tmp_path, model, model_kwargs=dict(pretrained=True))
    image = tmp_path / 'x.png'
    from PIL import Image
    Image.new('RGB', (8, 8)).save(image)
    assert main(['predict', str(image), '--checkpoint', str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'refused model arguments' in err


# ---- 4. memory is bounded before anything is allocated ----------------------------------------------

def test_a_compressed_record_is_refused(tmp_path):
    path = write_archive(tmp_path / 'bomb.pth', in_dict(tensor('0', 4, 0, [4], [1])), {'0': FOUR_FLOATS},
                         compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match='compress'):
        read_checkpoint(path)


def test_a_tiny_pickle_naming_a_huge_storage_is_refused(tmp_path):
    path = write_archive(tmp_path / 'huge.pth', in_dict(tensor('0', 10 ** 12, 0, [10 ** 12], [1])), {'0': FOUR_FLOATS})
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_a_stride_0_view_bigger_than_its_storage_is_refused_by_convert(tmp_path, capsys):
    path = write_archive(tmp_path / 'view.pth', in_dict(tensor('0', 4, 0, [4, 10 ** 6], [1, 0])), {'0': FOUR_FLOATS})
    assert main(['convert', str(path), str(tmp_path / 'out.safetensors')]) == 2
    assert not (tmp_path / 'out.safetensors').exists()
    assert 'storage' in capsys.readouterr().err


def test_loading_into_a_model_bounds_what_the_file_may_declare(model, tmp_path):
    """A file whose tensors exceed 4x the model's fp32 size is refused before they are read."""
    numel = 8 * sum(v.numel() for v in model.state_dict().values()) + 2 ** 24
    data = bytes(4 * numel)
    path = write_archive(tmp_path / 'big.pth', in_dict(tensor('0', numel, 0, [numel], [1])), {'0': data})
    before = _state(model)
    with pytest.raises(CheckpointError, match='bytes'):
        load_checkpoint(model, path)
    assert _unchanged(model, before)


# ---- 5. malformed files are one line and exit 2 in the CLI ----------------------------------------

def _safetensors_with_header(header: dict, body: bytes = b'') -> bytes:
    text = json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + body


@pytest.mark.parametrize('name, content', [
    ('empty.safetensors', b''),
    ('text.pth', b'these are not the weights you are looking for\n'),
    ('offsets.safetensors', _safetensors_with_header({'w': dict(dtype='F32', shape=[4], data_offsets=[0, 64])}, bytes(16))),
    ('header.safetensors', struct.pack('<Q', 10 ** 12) + b'{}'),
    ('intkeys.pth', None),
    ('persid.pth', None),
])
def test_malformed_files_are_one_line_and_exit_2(tmp_path, capsys, name, content):
    path = tmp_path / name
    if name == 'intkeys.pth':
        torch.save({1: torch.ones(2)}, path)
    elif name == 'persid.pth':
        write_archive(path, PROTO + b'}(' + u('w') + b'(' + u('storage') + b'tQu.')
    else:
        path.write_bytes(content)
    assert main(['convert', str(path), str(tmp_path / 'out.safetensors')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('crossformer convert: error: ') and '\n' not in err and str(path) in err


# ---- 6. refusals name what was refused ------------------------------------------------------------

@pytest.mark.parametrize('pickle_body, named', [
    (b'(' + b'i' + b'os\nsystem\n', 'INST'),
    (b'\x82\x01', 'EXT1'),
    (u('os') + u('system') + b'\x93', 'os.system'),
])
def test_refused_opcodes_are_named(tmp_path, pickle_body, named):
    path = write_archive(tmp_path / 'op.pth', b'\x80\x04' + pickle_body + b'.')
    with pytest.raises(CheckpointError, match=named) as info:
        read_checkpoint(path)
    assert 'Unsupported operand' not in str(info.value)


# ---- fuzz: mutated files load cleanly or raise CheckpointError, the model unchanged ---------------

@pytest.fixture(scope='module')
def valid_files(tmp_path_factory):
    torch.manual_seed(1)
    source = timm.create_model('crossformer_t', **SMALL)
    folder = tmp_path_factory.mktemp('valid')
    torch.save({'model': source.state_dict(), 'epoch': 3}, folder / 'valid.pth')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / 'valid.safetensors'))
    return {suffix: (folder / f'valid{suffix}').read_bytes() for suffix in ('.pth', '.safetensors')}


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(suffix=st.sampled_from(['.pth', '.safetensors']), data=st.data())
def test_fuzzed_files_load_cleanly_or_fail_with_the_model_unchanged(valid_files, tmp_path_factory, suffix, data):
    raw = bytearray(valid_files[suffix])
    header_end = 8 + struct.unpack('<Q', raw[:8])[0] if suffix == '.safetensors' else raw.index(b'data/') + 4096
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, min(len(raw), header_end) - 1))  # the structure, not only the tensor bytes
        kind = data.draw(st.sampled_from(['flip', 'set', 'cut', 'insert']))
        if kind == 'flip':
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == 'set':
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == 'cut':
            del raw[at:at + data.draw(st.integers(1, 16))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path_factory.mktemp('fuzz') / f'mutated{suffix}'
    path.write_bytes(bytes(raw))
    torch.manual_seed(0)
    target = timm.create_model('crossformer_t', **SMALL)
    before = _state(target)
    try:
        load_checkpoint(target, path)
    except CheckpointError:
        assert _unchanged(target, before)
    assert snapshot() == SNAPSHOT
