"""Unit tests of the building blocks."""
import pytest
import torch
from einops import rearrange

from crossformer.layers import (
    MASK_VALUE, CrossEmbedLayer, CrossFormerBlock, DynamicPosBias, GroupAttention, Stage, build_padding_mask, group_layout,
    group_tokens, has_cooling, relative_offsets, relative_position_index, split_dims, ungroup_tokens)

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
    (56, 56, 7, 8, (7, 7, 8, 56, 56)),
    (72, 72, 7, 8, (7, 7, 8, 112, 112)),   # v1 stage 1 at 288
    (64, 88, 7, 1, (7, 7, 1, 70, 91)),      # SDA padding
    (56, 56, 4, 4, (4, 4, 4, 64, 64)),      # ++ pads even at 224
    (6, 18, 7, 2, (6, 18, 1, 6, 18)),       # small map: one group of exactly its tokens
    (60, 4, 7, 8, (60, 4, 1, 60, 4)),
    (14, 14, 14, 1, (14, 14, 1, 14, 14)),
])
def test_group_layout(H, W, G, I, expected):
    assert group_layout(H, W, G, I) == expected


@pytest.mark.parametrize('Gh,Gw,I', [(7, 7, 1), (7, 7, 2), (4, 4, 4), (3, 3, 2), (2, 5, 1)])
def test_grouping_matches_einops_and_round_trips(Gh, Gw, I):
    x = torch.randn(2, 2 * Gh * I, 3 * Gw * I, 5)
    groups = group_tokens(x, Gh, Gw, I)
    oracle = rearrange(x, 'b (rh gh ih) (rw gw iw) c -> (b rh rw ih iw) (gh gw) c', gh=Gh, ih=I, gw=Gw, iw=I)
    assert torch.equal(groups, oracle)
    assert torch.equal(ungroup_tokens(groups, Gh, Gw, I, *x.shape[1:3]), x)


def test_lda_group_members_are_interval_apart():
    G, I = 3, 4
    coords = torch.stack(torch.meshgrid(torch.arange(12), torch.arange(12), indexing='ij'), -1)  # 12, 12, 2
    groups = group_tokens(coords[None].float(), G, G, I)  # I*I groups of G*G tokens
    assert groups.shape == (16, 9, 2)
    # group (ih, iw) = (1, 2): tokens (gh*I + 1, gw*I + 2), row-major over (gh, gw)
    expected = torch.tensor([[gh * I + 1, gw * I + 2] for gh in range(G) for gw in range(G)]).float()
    assert torch.equal(groups[1 * I + 2], expected)


def test_padding_mask_masks_exactly_the_padded_keys():
    Gh, Gw, I, Hp, Wp = group_layout(10, 13, 4, 2)  # padded to 16 x 16
    mask = build_padding_mask(10, 13, Gh, Gw, I, Hp, Wp, torch.device('cpu'))
    assert mask.shape == (16, 1, 1, 16)  # (16/8)**2 regions x 2*2 interleaved groups
    assert int((mask == MASK_VALUE).sum()) == 16 * 16 - 10 * 13
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}
    assert build_padding_mask(14, 14, 7, 7, 2, 14, 14, torch.device('cpu')) is None


def test_relative_offsets_and_index():
    offsets = relative_offsets(3, 3)
    assert offsets.shape == (25, 2)
    assert offsets[0].tolist() == [-2, -2] and offsets[1].tolist() == [-2, -1] and offsets[-1].tolist() == [2, 2]
    index = relative_position_index(3, 3)
    assert index.shape == (9, 9)
    # query (0, 0) [i=0], key (2, 1) [j=7]: offset (-2, -1) -> row 1
    assert index[0, 7] == 1
    assert torch.equal(offsets[index[7, 0]], torch.tensor([2., 1.]))
    assert (index.diagonal() == 12).all()  # offset (0, 0)


@pytest.mark.parametrize('Gh,Gw', [(1, 1), (3, 3), (7, 7), (14, 14), (2, 9), (5, 1)])
def test_dpb_any_group_shape(Gh, Gw):
    dpb = DynamicPosBias(8, num_heads=3)
    bias = dpb(Gh, Gw, torch.float32, torch.device('cpu'))
    N = Gh * Gw
    assert bias.shape == (3, N, N)
    offsets = relative_offsets(Gh, Gw)
    assert offsets.shape == ((2 * Gh - 1) * (2 * Gw - 1), 2)
    table = dpb.table(offsets)
    i, j = N - 1, 0  # query at (Gh-1, Gw-1), key at (0, 0): offset (Gh-1, Gw-1), the last row
    assert relative_position_index(Gh, Gw)[i, j] == offsets.shape[0] - 1
    assert torch.equal(bias[:, i, j], table[-1])
    assert torch.equal(relative_position_index(Gh, Gw)[1:3], relative_position_index(Gh, Gw, start=1, stop=3))


def test_dpb_keeps_the_reference_parameter_names():
    names = sorted(DynamicPosBias(8, 2).state_dict())
    assert names[:2] == ['pos1.0.bias', 'pos1.0.weight'] and 'pos3.2.weight' in names and 'pos_proj.weight' in names


def test_fused_and_explicit_attention_agree_with_mask():
    attn = GroupAttention(32, 4).eval()
    x = torch.randn(2 * 4, 16, 32)
    mask = build_padding_mask(6, 7, 4, 4, 1, 8, 8, torch.device('cpu'))
    outs = []
    for fused in (False, True):
        attn.fused_attn = fused
        outs.append(attn(x, 4, 4, mask))
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
