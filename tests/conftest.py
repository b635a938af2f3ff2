import json
import os
from pathlib import Path

import pytest
import torch

import crossformer  # noqa: F401  (registers the timm models)

# Tuning choices stay in each test process: no file in the user's cache folder (tests/test_tuning.py
# points the file at a temporary folder where it tests it).
os.environ['CROSSFORMER_TUNING_CACHE'] = 'off'

REFERENCE = Path(__file__).resolve().parent / 'reference'  # copied from the reference implementation; see its README


def mini_kwargs(reference_kwargs: dict) -> dict:
    """CrossFormer kwargs from the reference constructor kwargs of a parity case."""
    return dict(
        num_classes=reference_kwargs['num_classes'],
        embed_dim=reference_kwargs['embed_dim'],
        depths=reference_kwargs['depths'],
        num_heads=reference_kwargs['num_heads'],
        group_size=reference_kwargs['group_size'],
        interval=reference_kwargs['crs_interval'],
        use_acl=reference_kwargs['use_acl'],
    )


@pytest.fixture(scope='session')
def reference() -> Path:
    if not (REFERENCE / 'cases.json').is_file():
        pytest.fail(f'reference fixtures not found at {REFERENCE}')
    return REFERENCE


@pytest.fixture(scope='session')
def cases(reference) -> dict:
    return {c['name']: c for c in json.loads((reference / 'cases.json').read_text())['cases']}


@pytest.fixture(scope='session')
def manifests(reference) -> dict:
    return json.loads((reference / 'official_keys.json').read_text())['variants']


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused
