"""Each fusion identity against the unfused computation, in float64 (errors ~1e-14)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam.errors import FusionError
from reparam.fusion import (
    add_branches,
    avgpool_kernel,
    centre_kernel,
    centred_padding,
    fold_batchnorm,
    grouped_to_dense,
    identity_kernel,
    merge_1x1_kxk,
)
from reparam.module_fusion import conv_bn_kernel
from reparam.testing import randomize_batchnorm

F64 = torch.float64
TOL64 = 1e-12


def close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() / scale <= TOL64


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("groups", [1, 2])
def test_fold_batchnorm_matches_conv_then_bn(affine, conv_bias, groups):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=conv_bias).double()
    bn = randomize_batchnorm(nn.BatchNorm2d(6, affine=affine).double()).eval()
    x = rand(2, 4, 7, 5)
    kernel, bias = conv_bn_kernel(conv, bn)
    close64(F.conv2d(x, kernel, bias, padding=1, groups=groups), bn(conv(x)))


def test_fold_batchnorm_includes_conv_bias():
    """A conv bias before BN must shift the result by bias·γ/σ (a common published bug)."""
    conv = nn.Conv2d(3, 3, 1).double()
    with torch.no_grad():
        conv.bias.fill_(5.0)
    bn = randomize_batchnorm(nn.BatchNorm2d(3).double()).eval()
    _, with_bias = conv_bn_kernel(conv, bn)
    conv.bias = None
    _, without_bias = conv_bn_kernel(conv, bn)
    expected_shift = 5.0 * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    close64(with_bias - without_bias, expected_shift.detach())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_batchnorm_conv_transpose(groups):
    conv = nn.ConvTranspose2d(8, 4, 3, stride=2, groups=groups).double()
    bn = randomize_batchnorm(nn.BatchNorm2d(4).double()).eval()
    x = rand(2, 8, 5, 4)
    kernel, bias = conv_bn_kernel(conv, bn)
    fused = F.conv_transpose2d(x, kernel, bias, stride=2, groups=groups)
    close64(fused, bn(conv(x)))


def test_fold_batchnorm_keeps_dtype_and_computes_in_float32():
    kernel = torch.randn(4, 2, 3, 3).to(torch.bfloat16)
    stats = torch.rand(4) + 0.5
    out_kernel, out_bias = fold_batchnorm(kernel, None, stats, stats, 1e-5, stats, stats)
    assert out_kernel.dtype == out_bias.dtype == torch.bfloat16
    exact = kernel.float() * (stats / torch.sqrt(stats + 1e-5)).reshape(-1, 1, 1, 1)
    assert (out_kernel.float() - exact).abs().max() <= exact.abs().max() * 2**-8


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize(
    ("small", "big"), [((1, 1), 3), ((3, 1), 3), ((1, 3), 5), ((3, 3), 7)], ids=str
)
def test_centre_kernel_with_dilation(small, big, dilation):
    """A centred small kernel in a dilated KxK equals the small conv at its centred padding."""
    padding = dilation * (big // 2)
    kernel = rand(3, 2, *small)
    x = rand(1, 2, 9, 8, seed=1)
    pads = tuple(centred_padding(padding, big, k, dilation) for k in small)
    expected = F.conv2d(x, kernel, padding=pads, dilation=dilation)
    actual = F.conv2d(x, centre_kernel(kernel, big), padding=padding, dilation=dilation)
    close64(actual, expected)


def test_centre_kernel_pads_width_and_height_in_the_right_order():
    """F.pad takes (W_left, W_right, H_top, H_bottom); swapping them turns 1x3 into 1x5."""
    assert centre_kernel(torch.ones(1, 1, 1, 3), (3, 3)).shape == (1, 1, 3, 3)
    assert centre_kernel(torch.ones(1, 1, 1, 3), (5, 3)).shape == (1, 1, 5, 3)


@pytest.mark.parametrize(("small", "big"), [((2, 2), 3), ((1, 1), 4), ((5, 5), 3)])
def test_centre_kernel_refuses_even_or_larger_kernels(small, big):
    with pytest.raises(FusionError, match=r"centre|smaller"):
        centre_kernel(torch.ones(1, 1, *small), big)


def test_add_branches_is_the_sum_of_convs():
    x = rand(2, 3, 6, 6)
    branches = [(rand(4, 3, 3, 3, seed=s), rand(4, seed=s + 10)) for s in range(3)]
    kernel, bias = add_branches(*branches)
    expected = sum(F.conv2d(x, k, b, padding=1) for k, b in branches)
    close64(F.conv2d(x, kernel, bias, padding=1), expected)
    with pytest.raises(FusionError, match="shapes"):
        add_branches(branches[0], (rand(4, 3, 1, 1), rand(4)))


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_identity_kernel(groups, kernel_size):
    x = rand(2, 6, 7, 5)
    kernel = identity_kernel(6, kernel_size, groups=groups, dtype=F64)
    out = F.conv2d(x, kernel, padding=kernel_size // 2, groups=groups)
    assert torch.equal(out, x)


def test_identity_kernel_follows_dtype_and_refuses_even_sizes():
    assert identity_kernel(4, 3, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(FusionError, match="odd"):
        identity_kernel(4, 2)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_to_dense(groups):
    kernel = rand(6, 6 // groups, 3, 3)
    x = rand(2, 6, 5, 5, seed=2)
    dense = grouped_to_dense(kernel, groups)
    assert dense.shape == (6, 6, 3, 3)
    close64(F.conv2d(x, dense, padding=1), F.conv2d(x, kernel, padding=1, groups=groups))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("kernel_size", "stride", "dilation"), [(3, 1, 1), (3, 2, 1), (5, 1, 2)])
def test_merge_1x1_kxk_with_bias_padding(groups, kernel_size, stride, dilation):
    """1x1 → pad with b1 → KxK equals the merged KxK with zero padding of the input."""
    k1, b1 = rand(4, 4 // groups, 1, 1), rand(4, seed=1)
    k2, b2 = rand(6, 4 // groups, kernel_size, kernel_size, seed=2), rand(6, seed=3)
    x = rand(2, 4, 9, 7, seed=4)
    padding = dilation * (kernel_size // 2)
    middle = F.conv2d(x, k1, b1, groups=groups)
    # Pad with b1 instead of zeros: shift by b1, zero-pad, shift back.
    b1_map = b1.reshape(1, -1, 1, 1)
    padded = F.pad(middle - b1_map, [padding] * 4) + b1_map
    expected = F.conv2d(padded, k2, b2, stride=stride, dilation=dilation, groups=groups)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2, groups=groups)
    actual = F.conv2d(
        x, kernel, bias, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    close64(actual, expected)


def test_merge_1x1_kxk_needs_zero_padding_to_differ():
    """Zero padding of the intermediate is wrong at the border (the 1x1 maps a zero pixel to
    its folded bias, not to zero)."""
    k1, b1 = rand(3, 3, 1, 1), rand(3, seed=1) + 2
    k2, b2 = rand(3, 3, 3, 3, seed=2), rand(3, seed=3)
    x = rand(1, 3, 6, 6, seed=4)
    zero_padded = F.conv2d(F.conv2d(x, k1, b1), k2, b2, padding=1)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2)
    assert (F.conv2d(x, kernel, bias, padding=1) - zero_padded).abs().max() > 0.1


def test_merge_1x1_kxk_refuses_bad_shapes():
    with pytest.raises(FusionError, match="1x1"):
        merge_1x1_kxk(rand(3, 3, 3, 3), rand(3), rand(3, 3, 3, 3), rand(3))
    with pytest.raises(FusionError, match="input channels"):
        merge_1x1_kxk(rand(4, 3, 1, 1), rand(4), rand(3, 3, 3, 3), rand(3))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize(("kernel_size", "stride", "padding"), [(3, 1, 1), (3, 2, 1), (2, 2, 0)])
def test_avgpool_kernel(groups, kernel_size, stride, padding):
    x = rand(2, 4, 9, 8)
    kernel = avgpool_kernel(4, kernel_size, groups=groups, padding=padding, dtype=F64)
    pool = nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=True)
    close64(F.conv2d(x, kernel, stride=stride, padding=padding, groups=groups), pool(x))


def test_avgpool_kernel_refuses_count_include_pad_false():
    with pytest.raises(FusionError, match="count_include_pad"):
        avgpool_kernel(4, 3, padding=1, count_include_pad=False)
    avgpool_kernel(4, 3, padding=0, count_include_pad=False)  # no padding: nothing to exclude


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_bn_kernel_is_the_batchnorm_as_a_conv(groups):
    from reparam.module_fusion import identity_bn_kernel

    bn = randomize_batchnorm(nn.BatchNorm2d(6).double()).eval()
    kernel, bias = identity_bn_kernel(bn, 3, groups=groups, dtype=F64)
    x = rand(2, 6, 5, 4)
    close64(F.conv2d(x, kernel, bias, padding=1, groups=groups), bn(x))
