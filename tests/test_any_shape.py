"""Strips and panoramas: a whole-map group costs its real tokens, huge groups run in bounded memory,
and the caches stay within their stated bounds in bytes, also under threads."""
import gc

import pytest
import timm
import torch

from crossformer import set_speedups
from crossformer.layers import CrossFormerBlock, GroupAttention, speedups
from crossformer.layers.speedups import caches, mixins
from threads import run_in_threads

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import given, settings, strategies as st  # noqa: E402

CPU = torch.device('cpu')


def padded_square_attention(block: CrossFormerBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference's rule for a map whose short side is at most G, written out: pad the short side
    to the long side L, one L x L group, the DPB bias of an L x L group, -1e6 on padded keys, explicit
    softmax attention, crop. ``x`` is the normed map ``(B, H, W, C)``."""
    B, H, W, C = x.shape
    L = max(H, W)
    attn, heads = block.attn, block.attn.num_heads
    tokens = torch.nn.functional.pad(x, (0, 0, 0, L - W, 0, L - H)).reshape(B, L * L, C)
    q, k, v = attn.qkv(tokens).view(B, L * L, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    r = torch.arange(1 - L, L, dtype=torch.float32)
    table = attn.pos.table(torch.stack(torch.meshgrid(r, r, indexing='ij'), -1).reshape(-1, 2))  # (2L-1)^2, heads
    hw = torch.stack(torch.meshgrid(torch.arange(L), torch.arange(L), indexing='ij')).flatten(1)  # 2, L*L
    rel = hw[:, :, None] - hw[:, None, :] + L - 1
    bias = table[rel[0] * (2 * L - 1) + rel[1]].permute(2, 0, 1)  # heads, L*L, L*L
    padded = ((hw[0] >= H) | (hw[1] >= W)).float() * -1e6  # L*L keys
    weights = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1) + bias + padded).softmax(-1)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(B, L * L, C))
    return out.view(B, L, L, C)[:, :H, :W]


@pytest.fixture(scope='module')
def block():
    torch.manual_seed(0)
    block = CrossFormerBlock(32, 2, group_size=5, interval=2).eval()
    with torch.no_grad():  # a DPB with weight: the default init leaves the bias nearly flat
        for p in block.attn.pos.parameters():
            p.normal_(0, 0.5)
    return block


@settings(max_examples=12, deadline=None, derandomize=True)
@given(short=st.integers(1, 5), long=st.integers(1, 40), tall=st.booleans(), fast=st.booleans())
def test_whole_map_group_equals_the_padded_square(block, short, long, tall, fast):
    H, W = (long, short) if tall else (short, long)
    x = block.norm1(torch.randn(2, H, W, 32, generator=torch.Generator().manual_seed(H * 100 + W)))
    set_speedups(block, fast)
    with torch.no_grad():
        got = block.attend(x)
        expected = padded_square_attention(block, x)
    set_speedups(block, True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_whole_map_group_has_no_padding():
    assert speedups.padding_mask(3, 40, 3, 40, 1, 3, 40, CPU) is None


@pytest.mark.parametrize('masked', [False, True], ids=['whole-map', 'padded'])
def test_huge_group_in_query_blocks_matches_the_definition(masked, monkeypatch):
    monkeypatch.setattr(mixins, 'HUGE_GROUP_BYTES', 2 ** 10)
    monkeypatch.setattr(mixins, 'QUERY_BLOCK_BYTES', 2 * 30 * 4 * 7)  # 7 queries a block: the last one short
    attn = GroupAttention(32, 2).eval()
    Gh, Gw = (5, 6) if masked else (3, 10)
    x = torch.randn(3 * 2, Gh * Gw, 32)  # 3 images, 2 groups each
    mask = torch.zeros(2, 1, 1, Gh * Gw)
    mask[1, ..., -8:] = -1e6
    mask = mask if masked else None
    with torch.no_grad():
        assert attn._huge(x) and attn.speedup_applies(x, mask)
        blocked = attn(x, Gh, Gw, mask)
        set_speedups(attn, False)
        whole = attn(x, Gh, Gw, mask)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)
    set_speedups(attn, True)
    assert not attn._huge(x)  # the definition again where a gradient is recorded


def _peak_above_now_mib(fn) -> float:
    def status(key):
        return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key)) / 1024
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # the resident peak (VmHWM) starts again from the resident size
    before = status('VmRSS')
    fn()
    return status('VmHWM') - before


def test_huge_group_peak_memory_grows_with_its_tokens_not_their_square():
    """One group of 1 x 6000 tokens: its bias and its attention weights would take 275 MiB each."""
    try:
        _peak_above_now_mib(lambda: None)
    except OSError:
        pytest.skip('needs Linux /proc/self/clear_refs')
    attn = GroupAttention(32, 2).eval()
    x = torch.randn(1, 6000, 32)
    with torch.no_grad():
        peak = _peak_above_now_mib(lambda: attn(x, 1, 6000))
    assert peak < 64, f'{peak:.0f} MiB'


# Sizes an upload service sees: squares, strips both ways (whole-map groups up to 1 x 160 tokens),
# padded maps, and one that repeats.
STREAM = [(64, 64), (32, 640), (640, 32), (20, 300), (64, 64), (128, 40), (8, 512), (72, 100)]


def _tiny_model():
    torch.manual_seed(0)
    return timm.create_model('crossformer_t', embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                             num_classes=5).eval()


def test_caches_stay_within_their_bounds_in_bytes(monkeypatch):
    """The bounds the docs state, and a stream of sizes through caches made small enough that they bite."""
    assert (speedups.dpb_cache.max_bytes, speedups.dpb_cache.max_entry_bytes) == (64 * 2 ** 20, 8 * 2 ** 20)
    assert (speedups.mask_cache.max_bytes, speedups.mask_cache.max_entry_bytes) == (16 * 2 ** 20, 4 * 2 ** 20)
    model = _tiny_model()
    dpb, masks = speedups.ByteBoundedCache(256 * 2 ** 10, 64 * 2 ** 10), speedups.ByteBoundedCache(2 * 2 ** 10, 2 ** 10)
    monkeypatch.setattr(mixins, 'dpb_cache', dpb)
    monkeypatch.setattr(caches, 'mask_cache', masks)
    held = []
    with torch.no_grad():
        for h, w in STREAM:
            model(torch.randn(1, 3, h, w))
            assert dpb.nbytes <= dpb.max_bytes and masks.nbytes <= masks.max_bytes
            held.append((dpb.nbytes, masks.nbytes))
            entries = list(dpb._entries.values()) + list(masks._entries.values())
            assert sum(t.untyped_storage().nbytes() for t in entries) == dpb.nbytes + masks.nbytes
            assert all(t.untyped_storage().nbytes() <= 64 * 2 ** 10 for t in dpb._entries.values())
    assert max(h[0] for h in held) > dpb.max_bytes // 2 and max(h[1] for h in held) > masks.max_bytes // 2  # the bounds bite
    del model
    gc.collect()
    fresh = _tiny_model()
    with torch.no_grad():
        fresh(torch.randn(1, 3, 32, 32))
    assert dpb._entries and all(k[0]() is not None for k in dpb._entries)  # a dead model's biases are dropped


def test_four_threads_sharing_a_model_give_what_one_thread_gives(monkeypatch):
    monkeypatch.setattr(mixins, 'dpb_cache', speedups.ByteBoundedCache(128 * 2 ** 10, 32 * 2 ** 10))  # evicting
    model = _tiny_model()
    images = [torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(STREAM[:6])]
    with torch.no_grad():
        expected = [model(x) for x in images]
    results = {}

    def work(t):
        with torch.no_grad():
            for i in range(len(images)):
                j = (i + 3 * t) % len(images)
                results[t, j] = model(images[j])

    assert run_in_threads(work, [(t,) for t in range(4)]) == []
    assert all(torch.equal(results[t, j], expected[j]) for t in range(4) for j in range(len(images)))
