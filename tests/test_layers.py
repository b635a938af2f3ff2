"""Unit tests of the building blocks."""
import pytest
import torch
from einops import rearrange

from crossformer.layers import (
    MASK_VALUE, CrossEmbedLayer, CrossFormerBlock, DynamicPosBias, GroupAttention, Stage, group_layout, group_tokens,
    LeanMlp, has_cooling, padding_mask, relative_offsets, relative_position_index, space_to_depth_conv, split_dims,
    ungroup_tokens)

from conftest import set_fused


def test_split_dims_follow_the_paper():
    assert split_dims(96, 4) == [48, 24, 12, 12]
    assert split_dims(64, 4) == [32, 16, 8, 8]
    assert split_dims(192, 2) == [96, 96]
    with pytest.raises(ValueError, match='cannot split 4 channels over 4 kernels'):
        split_dims(4, 4)


def test_stem_shapes_and_ceil_division():
    stem = CrossEmbedLayer(3, 96, (4, 8, 16, 32), stride=4)
    assert [p.out_channels for p in stem.projs] == [48, 24, 12, 12]
    assert [p.padding for p in stem.projs] == [(0, 0), (2, 2), (6, 6), (14, 14)]
    assert stem(torch.randn(2, 3, 224, 224)).shape == (2, 56, 56, 96)
    assert stem(torch.randn(1, 3, 30, 45)).shape == (1, 8, 12, 96)


def test_merge_shapes_norm_first():
    merge = CrossEmbedLayer(32, 64, (2, 4), stride=2, norm_first=True)
    assert [p.padding for p in merge.projs] == [(0, 0), (1, 1)]
    assert merge.norm.normalized_shape == (32,)
    assert merge(torch.randn(2, 7, 9, 32)).shape == (2, 4, 5, 64)


def test_cross_embed_rejects_kernels_that_do_not_fit_the_stride():
    with pytest.raises(ValueError, match=r'kernel sizes \[3\] do not fit stride 2'):
        CrossEmbedLayer(8, 16, (2, 3), stride=2)


@pytest.mark.parametrize('H,W,G,I,expected', [
    (56, 56, 7, 8, (7, 8, 56, 56)),
    (72, 72, 7, 8, (7, 8, 112, 112)),   # v1 stage 1 at 288
    (64, 88, 7, 1, (7, 1, 70, 91)),      # SDA padding
    (56, 56, 4, 4, (4, 4, 64, 64)),      # ++ pads even at 224
    (6, 18, 7, 2, (18, 1, 18, 18)),      # small map: one group, side = long side
    (14, 14, 14, 1, (14, 1, 14, 14)),
])
def test_group_layout(H, W, G, I, expected):
    assert group_layout(H, W, G, I) == expected


@pytest.mark.parametrize('G,I', [(7, 1), (7, 2), (4, 4), (3, 2)])
def test_grouping_matches_einops_and_round_trips(G, I):
    x = torch.randn(2, 2 * G * I, 3 * G * I, 5)
    groups = group_tokens(x, G, I)
    oracle = rearrange(x, 'b (rh gh ih) (rw gw iw) c -> (b rh rw ih iw) (gh gw) c', gh=G, ih=I, gw=G, iw=I)
    assert torch.equal(groups, oracle)
    assert torch.equal(ungroup_tokens(groups, G, I, *x.shape[1:3]), x)


def test_lda_group_members_are_interval_apart():
    G, I = 3, 4
    coords = torch.stack(torch.meshgrid(torch.arange(12), torch.arange(12), indexing='ij'), -1)  # 12, 12, 2
    groups = group_tokens(coords[None].float(), G, I)  # I*I groups of G*G tokens
    assert groups.shape == (16, 9, 2)
    # group (ih, iw) = (1, 2): tokens (gh*I + 1, gw*I + 2), row-major over (gh, gw)
    expected = torch.tensor([[gh * I + 1, gw * I + 2] for gh in range(G) for gw in range(G)]).float()
    assert torch.equal(groups[1 * I + 2], expected)


def test_padding_mask_masks_exactly_the_padded_keys():
    G, I, Hp, Wp = group_layout(10, 13, 4, 2)  # padded to 16 x 16
    mask = padding_mask(10, 13, G, I, Hp, Wp, torch.device('cpu'))
    assert mask.shape == (16, 1, 1, 16)  # (16/8)**2 regions x 2*2 interleaved groups
    assert int((mask == MASK_VALUE).sum()) == 16 * 16 - 10 * 13
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}
    assert padding_mask(14, 14, 7, 2, 14, 14, torch.device('cpu')) is None


def test_relative_offsets_and_index():
    offsets = relative_offsets(3)
    assert offsets.shape == (25, 2)
    assert offsets[0].tolist() == [-2, -2] and offsets[1].tolist() == [-2, -1] and offsets[-1].tolist() == [2, 2]
    index = relative_position_index(3)
    assert index.shape == (9, 9)
    # query (0, 0) [i=0], key (2, 1) [j=7]: offset (-2, -1) -> row 1
    assert index[0, 7] == 1
    assert torch.equal(offsets[index[7, 0]], torch.tensor([2., 1.]))
    assert (index.diagonal() == 12).all()  # offset (0, 0)


@pytest.mark.parametrize('G', [1, 3, 7, 14])
def test_dpb_any_group_size(G):
    dpb = DynamicPosBias(8, num_heads=3)
    bias = dpb(G)
    assert bias.shape == (3, G * G, G * G)
    table = dpb.table(relative_offsets(G))
    i, j = G * G - 1, 0
    assert torch.equal(bias[:, i, j], table[relative_position_index(G)[i, j]])


def test_dpb_residual_form_differs_and_keeps_names():
    plain, residual = DynamicPosBias(8, 2), DynamicPosBias(8, 2, residual=True)
    residual.load_state_dict(plain.state_dict())
    assert sorted(plain.state_dict()) == sorted(residual.state_dict())
    assert 'pos1.0.weight' in plain.state_dict() and 'pos3.2.weight' in plain.state_dict()
    assert not torch.allclose(plain(3), residual(3))


def test_fused_and_explicit_attention_agree_with_mask():
    attn = GroupAttention(32, 4).eval()
    x = torch.randn(2 * 4, 16, 32)
    mask = padding_mask(6, 7, 4, 1, 8, 8, torch.device('cpu'))
    outs = []
    for fused in (False, True):
        attn.fused_attn = fused
        outs.append(attn(x, 4, mask))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_widths():
    with pytest.raises(ValueError, match='dim 30 is not divisible by num_heads 4'):
        GroupAttention(30, 4)
    with pytest.raises(ValueError, match='needs dim >= 16'):
        GroupAttention(8, 2)


def test_fully_padded_group_stays_finite():
    """A map of 9 with G=4, I=4 pads to 16: some LDA groups hold only padding keys in a row."""
    block = CrossFormerBlock(16, 2, group_size=4, interval=4).eval()
    y = block(torch.randn(1, 9, 9, 16))
    assert y.shape == (1, 9, 9, 16) and torch.isfinite(y).all()


def test_cooling_placement():
    assert [j for j in range(18) if has_cooling(j, 18)] == [2, 5, 8, 11, 14]
    assert [j for j in range(7) if has_cooling(j, 7)] == [2, 5]
    assert [j for j in range(3) if has_cooling(j, 3)] == []
    assert [j for j in range(2) if has_cooling(j, 2)] == []


def test_block_cooling_replaces_the_stream():
    block = CrossFormerBlock(16, 2, group_size=4, cooling=True).eval()
    x = torch.randn(1, 8, 8, 16)
    y = block(x)
    # LayerNorm output with unit weight and zero bias: zero mean, unit variance per token
    torch.testing.assert_close(y.mean(-1), torch.zeros(1, 8, 8), atol=1e-5, rtol=0)


def test_stage_alternates_sda_and_lda_and_downsamples():
    stage = Stage(16, 32, depth=4, num_heads=2, group_size=4, interval=3, downsample_kernel_sizes=(2, 4))
    assert [b.interval for b in stage.blocks] == [1, 3, 1, 3]
    assert stage(torch.randn(2, 15, 20, 16)).shape == (2, 8, 10, 32)
    with pytest.raises(ValueError, match='keeps its width'):
        Stage(16, 32, depth=1, num_heads=2, downsample_kernel_sizes=None)


def test_block_does_not_depend_on_previous_inputs():
    """The reference dense backbone switches blocks to SDA for good after one small map; here nothing changes."""
    block = CrossFormerBlock(16, 2, group_size=4, interval=2).eval()
    big = torch.randn(1, 12, 12, 16)
    first = block(big)
    block(torch.randn(1, 3, 5, 16))
    assert torch.equal(block(big), first)


def test_dpb_cache_is_used_without_grad_and_never_stale():
    dpb = DynamicPosBias(8, num_heads=2)
    with torch.no_grad():
        first = dpb(5)
        assert dpb(5) is first  # cached
        dpb.pos3[2].bias.add_(1.0)  # an optimizer step or load_state_dict bumps the version
        updated = dpb(5)
    torch.testing.assert_close(updated, first + 1.0)
    assert dpb(5).requires_grad and dpb(5) is not dpb(5)  # with grad: recomputed, differentiable
    dpb.load_state_dict(DynamicPosBias(8, num_heads=2).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dpb(5), dpb.bias(5))
        assert not torch.allclose(dpb(5), updated)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize('chunk_tokens', [3, 2048])  # 4 chunks of the 10 tokens, the last one short; 1 chunk
def test_lean_mlp_same_gradients_without_keeping_the_gelu_output(chunk_tokens):
    mlp = LeanMlp(16, 64).train()
    mlp.chunk_tokens = chunk_tokens
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = {}
    for lean in (True, False):
        mlp.fast_paths = lean
        saved = _saved_bytes(lambda: mlp(x).square().sum().backward())
        results[lean] = saved, [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
        x.grad = None
        mlp.zero_grad()
    assert results[False][0] - results[True][0] == 2 * 5 * 64 * 4  # the GELU output, fp32
    for lean_grad, plain_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(lean_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_lean_mlp_under_autocast_gives_grads_in_parameter_dtype():
    mlp = LeanMlp(16, 64).train()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mlp(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in mlp.parameters())
    assert torch.isfinite(x.grad).all()


def test_chunked_mlp_inference_matches_plain():
    block = CrossFormerBlock(16, 2, group_size=3, interval=2).eval()
    block.chunk_tokens = 7
    x = torch.randn(2, 9, 5, 16)  # 90 tokens: 13 chunks, the last one short
    with torch.no_grad():
        chunked = block(x)
        block.fast_paths = False
        plain = block(x)
    assert chunked.shape == (2, 9, 5, 16)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('kernel, stride, size', [(32, 4, (37, 50)), (16, 4, (64, 64)), (4, 2, (9, 6)), (2, 2, (5, 7))])
def test_space_to_depth_conv_matches_the_strided_conv(kernel, stride, size):
    conv = torch.nn.Conv2d(3, 5, kernel, stride, padding=(kernel - stride) // 2)
    x = torch.randn(2, 3, *size, requires_grad=True)
    grad = torch.randn_like(conv(x))
    expected = torch.autograd.grad((conv(x) * grad).sum(), [x, conv.weight, conv.bias])
    out = space_to_depth_conv(x, conv)
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad((out * grad).sum(), [x, conv.weight, conv.bias]), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_stem_takes_space_to_depth_for_large_kernels_only():
    assert CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).space_to_depth == [False, True, True, True]
    assert CrossEmbedLayer(96, 192, (2, 4), stride=2, norm_first=True).space_to_depth == [False, False]
    stem = CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        fast = stem(x)
        stem.fast_paths = False
        torch.testing.assert_close(fast, stem(x), atol=1e-5, rtol=1e-5)


def test_stem_trains_through_space_to_depth_with_the_same_gradients():
    stem = CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).train()
    x = torch.randn(2, 3, 45, 38)
    grads = {}
    for fast in (True, False):
        stem.fast_paths = fast
        stem(x).square().sum().backward()
        grads[fast] = [p.grad.clone() for p in stem.parameters()]
        stem.zero_grad()
    for fast_grad, plain_grad in zip(grads[True], grads[False]):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-4, rtol=1e-4)


def test_chunked_mlp_steps_aside_under_autocast():
    block = CrossFormerBlock(16, 2, group_size=3).eval()
    block.chunk_tokens = 7
    x = torch.randn(1, 9, 5, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        fast = block(x)
        block.fast_paths = False
        plain = block(x)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize('fused', [True, False])
def test_chunked_attention_inference_matches_plain(fused):
    attn = GroupAttention(32, 2).eval()
    attn.fused_attn = fused
    attn.chunk_tokens = 27  # 3 groups of 9 tokens a chunk: chunks end short inside each image
    groups = 7
    x = torch.randn(2 * groups, 9, 32)  # 2 images, 7 groups each
    mask = torch.zeros(groups, 1, 1, 9)
    mask[-2:, ..., 5:] = MASK_VALUE  # the last groups of every image are partly padding
    with torch.no_grad():
        for m in (None, mask):
            chunked = attn(x, 3, m)
            attn.fast_paths = False
            plain = attn(x, 3, m)
            attn.fast_paths = True
            torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(attn(x, 3, mask), attn(x, 3, None))  # the mask matters here
