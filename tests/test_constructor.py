"""The CrossFormer constructor refuses bad arguments at construction, naming what is wrong."""
import pytest

from crossformer import ConfigError, CrossFormer

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5)

CASES = [
    # widths and heads
    (dict(num_heads=(1, 3, 2, 4)), ValueError, 'dim 32 is not divisible by num_heads 3'),
    (dict(embed_dim=8), ValueError, r'dim 8 is too small: the position-bias MLP needs dim >= 16'),
    (dict(embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 5, 4)), ValueError, 'dim 48 is not divisible by num_heads 5'),
    # per-stage lists of different lengths
    (dict(num_heads=(1, 2)), ValueError, 'num_heads has 2 entries but depths has 4 stages'),
    (dict(embed_dim=(16, 32, 64)), ValueError, 'has 3 entries but depths has 4 stages'),
    (dict(group_size=(7, 7)), ValueError, 'group_size has 2 entries but depths has 4 stages'),
    (dict(interval=(8, 4, 2)), ValueError, 'interval has 3 entries but depths has 4 stages'),
    # group size and interval below 1
    (dict(group_size=0), ValueError, 'group_size and interval must be >= 1'),
    (dict(group_size=(7, 7, -1, 7)), ValueError, 'group_size and interval must be >= 1'),
    (dict(interval=(8, 0, 2, 1)), ValueError, 'group_size and interval must be >= 1'),
    # CEL kernels: each >= the stride and of the stride's parity
    (dict(stem_kernel_sizes=(2, 8)), ValueError, r'kernel sizes \[2\] do not fit stride 4'),
    (dict(stem_kernel_sizes=(4, 7)), ValueError, r'kernel sizes \[7\] do not fit stride 4: each must be >= stride'),
    (dict(merge_kernel_sizes=(3,)), ValueError, r'kernel sizes \[3\] do not fit stride 2'),
    (dict(merge_kernel_sizes=(1, 2)), ValueError, r'kernel sizes \[1\] do not fit stride 2'),
    (dict(stem_kernel_sizes=(4, 8, 16, 32, 64, 128)), ValueError,
     'cannot split 16 channels over 6 kernels; use at least 32'),
    # a misspelt keyword
    (dict(embed_dims=16), TypeError, "unexpected keyword argument 'embed_dims'"),
    # counts, types and rates
    pytest.param(dict(interval=(8, 0, 2, 1), depths=(1, 1, 1, 1)), ValueError, 'group_size and interval must be >= 1', id='unused-interval-0'),
    pytest.param(dict(num_heads=(1, 0, 2, 4)), ValueError, r'num_heads must be integers >= 1, got \(1, 0, 2, 4\)', id='heads-0'),
    pytest.param(dict(depths=(2, 0, 2, 2)), ValueError, r'depths must be integers >= 1, got \(2, 0, 2, 2\)', id='depth-0'),
    pytest.param(dict(group_size=7.5), ConfigError, r'group_size must be integers, got \(7.5, 7.5, 7.5, 7.5\)', id='float-group-size'),
    pytest.param(dict(embed_dim=16.0), ConfigError, r'embed_dim must be integers, got \(16.0, 32.0, 64.0, 128.0\)', id='float-embed-dim'),
    pytest.param(dict(stem_kernel_sizes=()), ValueError, 'stem_kernel_sizes needs at least one kernel size', id='no-stem-kernels'),
    pytest.param(dict(merge_kernel_sizes=()), ValueError, 'merge_kernel_sizes needs at least one kernel size', id='no-merge-kernels'),
    pytest.param(dict(stem_stride=0), ValueError, 'in_chans and stem_stride must be >= 1, got 3 and 0', id='stem-stride-0'),
    pytest.param(dict(in_chans=0), ValueError, 'in_chans and stem_stride must be >= 1, got 0 and 4', id='in-chans-0'),
    pytest.param(dict(num_classes=-1), ValueError, r'num_classes must be >= 0 \(0: no classifier\), got -1', id='num-classes-negative'),
    pytest.param(dict(mlp_ratio=0), ValueError, 'mlp_ratio must be > 0, got 0', id='mlp-ratio-0'),
    pytest.param(dict(drop_path_rate=2.), ValueError, r'drop_path_rate must be in \[0, 1\], got 2.0', id='drop-path-2'),
]


@pytest.mark.parametrize('kwargs,error,match', CASES)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CrossFormer(**dict(SMALL, **kwargs))


def test_small_config_is_valid():
    """The base of the cases above builds, so each error comes from its one changed argument."""
    assert CrossFormer(**SMALL).num_features == 128
