"""OctaveConv / OctaveConvBN: the paper's forward at strides 1 and 2, odd sizes, exact deploy."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks.octave import OctaveConv, OctaveConvBN
from reparam.errors import FusionError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

ALPHAS = [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0)]
KERNEL_GROUPS = [(1, 1), (3, 1), (3, 2)]
MATRIX = [
    (alphas, stride, kernel, groups, size)
    for alphas, stride, (kernel, groups), size in itertools.product(
        ALPHAS, (1, 2), KERNEL_GROUPS, ((11, 9), (8, 6))
    )
]
PLAIN = [(alphas, stride, 3, 2, (11, 9)) for alphas, stride in itertools.product(ALPHAS, (1, 2))]


def _inputs(block: OctaveConv, size: tuple[int, int], seed: int = 0, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    x_h = torch.randn(batch, block.in_h, height, width, generator=generator)
    if block.in_l == 0:
        return x_h
    x_l = torch.randn(batch, block.in_l, (height + 1) // 2, (width + 1) // 2, generator=generator)
    return (x_h, x_l)


def _double(x):
    return tuple(t.double() for t in x) if isinstance(x, tuple) else x.double()


def _matrix_id(config: tuple) -> str:
    (a_in, a_out), stride, kernel, groups, (h, w) = config
    return f"a{a_in}-{a_out}-s{stride}-k{kernel}-g{groups}-{h}x{w}"


@pytest.mark.parametrize(
    ("alphas", "stride", "kernel", "groups", "size", "with_bn"),
    [(*c, True) for c in MATRIX] + [(*c, False) for c in PLAIN],
    ids=[f"{_matrix_id(c)}-conv-bn-relu" for c in MATRIX]
    + [f"{_matrix_id(c)}-conv-bias" for c in PLAIN],
)
def test_fuse_is_exact(alphas, stride, kernel, groups, size, with_bn: bool) -> None:
    torch.manual_seed(0)
    common = dict(alpha_in=alphas[0], alpha_out=alphas[1], stride=stride, groups=groups)
    if with_bn:
        block = OctaveConvBN(8, 8, kernel, activation=nn.ReLU, **common)
        inner = block.conv
    else:
        block = inner = OctaveConv(8, 8, kernel, bias=True, **common)
    randomize_batchnorm(block, seed=1)
    x = _inputs(inner, size)
    fused, diffs = assert_fuses_exactly(block, x, rtol=1e-5)
    assert len(diffs) == (1 if alphas[1] == 0 else 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    fused_inner = fused.conv if with_bn else fused
    merged = stride == 1 and alphas == (0.5, 0.5)
    assert hasattr(fused_inner, "l2x") == merged
    assert not (merged and (hasattr(fused_inner, "l2h") or hasattr(fused_inner, "l2l")))
    assert_fuses_exactly(block.double(), _double(x), rtol=1e-10)


def _pool(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2)


@pytest.mark.parametrize("stride", [1, 2])
def test_matches_the_paper_forward(stride: int) -> None:
    """Y_h = f(X_h) + up(f(X_l)), Y_l = f(X_l) + f(pool X_h); stride 2 pools the inputs first."""
    torch.manual_seed(0)
    block = OctaveConv(8, 8, 3, stride=stride, bias=True).double()
    x_h, x_l = _double(_inputs(block, (8, 12)))
    y_h, y_l = block((x_h, x_l))
    if stride == 1:
        expected_h = block.h2h(x_h) + _up(block.l2h(x_l))
        expected_l = block.l2l(x_l) + block.h2l(_pool(x_h))
    else:
        expected_h = block.h2h(_pool(x_h)) + block.l2h(x_l)
        expected_l = block.l2l(_pool(x_l)) + block.h2l(_pool(_pool(x_h)))
    torch.testing.assert_close(y_h, expected_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_l, expected_l, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("stride", "high", "low"), [(1, (11, 9), (6, 5)), (2, (6, 5), (3, 3))])
def test_odd_sizes_keep_low_at_half_rounded_up(stride: int, high: tuple, low: tuple) -> None:
    first = OctaveConv(3, 8, 3, alpha_in=0, stride=stride)
    y_h, y_l = first(torch.randn(1, 3, 11, 9))
    assert y_h.shape[-2:] == high and y_l.shape[-2:] == low
    y_h, y_l = OctaveConv(8, 8, 3, stride=stride)(
        (torch.randn(1, 4, 11, 9), torch.randn(1, 4, 6, 5))
    )
    assert y_h.shape[-2:] == high and y_l.shape[-2:] == low


def test_odd_size_pooling_averages_only_real_pixels() -> None:
    block = OctaveConv(1, 2, 1, alpha_in=0, alpha_out=0.5).double()
    with torch.no_grad():
        block.h2l.weight.copy_(torch.eye(1).reshape(1, 1, 1, 1))
    x = torch.arange(15.0, dtype=torch.float64).reshape(1, 1, 3, 5)
    _, y_l = block(x)
    expected = torch.tensor([[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]], dtype=torch.float64)
    torch.testing.assert_close(y_l[0, 0], expected)


class OctaveNet(nn.Module):
    """First layer (one input) → stride-2 middle → middle → last layer (one output)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = OctaveConvBN(3, 8, 3, alpha_in=0, activation=nn.ReLU)
        self.down = OctaveConvBN(8, 16, 3, stride=2, groups=2, activation=nn.ReLU)
        self.middle = OctaveConvBN(16, 16, 3, alpha_out=0.25, activation=nn.ReLU)
        self.last = OctaveConvBN(16, 8, 1, alpha_in=0.25, alpha_out=0)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.middle(self.down(self.first(x)))))


@pytest.mark.parametrize("size", [(16, 12), (13, 11)], ids=["even", "odd"])
def test_network_of_octave_layers_fuses_exactly(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = randomize_batchnorm(OctaveNet(), seed=2)
    x = torch.randn(2, 3, *size)
    fused, _ = assert_fuses_exactly(net, x, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    _, report = reparam.fuse_with_report(net)
    assert report.blocks["OctaveConvBN"] == 4 and report.traced
    assert any("merged l2h+l2l into l2x" in d for d in report.details)
    assert hasattr(fused.middle.conv, "l2x") and hasattr(fused.down.conv, "l2h")
    assert_fuses_exactly(net.double(), x.double(), rtol=1e-10)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (OctaveConvBN, dict(activation=nn.ReLU)),
        (OctaveConvBN, dict(stride=2, groups=2)),
        (OctaveConvBN, dict(alpha_in=0, alpha_out=0.25)),
        (OctaveConv, dict(groups=2)),
        (OctaveConv, dict(bias=True, alpha_out=0)),
    ],
    ids=["bn-merged", "bn-stride2", "bn-first", "conv-merged", "conv-last"],
)
def test_deploy_constructor_loads_fused_state_dict_strictly(cls, kwargs: dict) -> None:
    torch.manual_seed(0)
    block = randomize_batchnorm(cls(8, 8, 3, **kwargs)).eval()
    fused = reparam.fuse(block)
    deployed = cls(8, 8, 3, deploy=True, **kwargs)
    deployed.load_state_dict(fused.state_dict(), strict=True)
    inner = deployed.conv if cls is OctaveConvBN else deployed
    x = _inputs(inner, (10, 7))
    torch.testing.assert_close(deployed(x), block(x), rtol=1e-5, atol=1e-5)


def test_fuse_twice_is_a_no_op() -> None:
    block = randomize_batchnorm(OctaveConvBN(8, 8, 3))
    once = reparam.fuse(block)
    twice, report = reparam.fuse_with_report(once)
    assert not report.blocks
    assert once.state_dict().keys() == twice.state_dict().keys()
    for key, value in once.state_dict().items():
        assert torch.equal(value, twice.state_dict()[key])


def test_training_step_changes_weights() -> None:
    torch.manual_seed(0)
    block = OctaveConvBN(8, 8, 3, activation=nn.ReLU)
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    y_h, y_l = block(_inputs(block.conv, (8, 8)))
    (y_h.square().mean() + y_l.square().mean()).backward()
    optimizer.step()
    for name, param in block.named_parameters():
        assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((8, 8, 2), {}, "odd kernel sizes"),
        ((8, 8, 3), dict(padding=0), r"padding must be dilation\*\(kernel_size//2\)"),
        ((8, 8, 3), dict(alpha_in=1.0), r"alpha_in must be in \[0, 1\)"),
        ((8, 1, 3), {}, "alpha_out=0.5 of out_channels=1 gives no low-frequency channel"),
        ((8, 8, 3), dict(groups=3), "not both divisible by groups"),
        ((8, 8, 3), dict(stride=3), "stride 1 or 2"),
    ],
    ids=["even-kernel", "padding", "alpha-1", "no-low-channel", "groups", "stride"],
)
def test_bad_configurations_are_refused(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        OctaveConv(*args, **kwargs)


def test_bad_inputs_are_refused() -> None:
    block = OctaveConv(8, 8, 3)
    with pytest.raises(ValueError, match=r"ceil\(H/2\) x ceil\(W/2\).*needs low \(5, 4\)"):
        block((torch.randn(1, 4, 9, 8), torch.randn(1, 4, 4, 4)))
    with pytest.raises(TypeError, match="takes a \\(high, low\\) pair"):
        block(torch.randn(1, 8, 8, 8))
    with pytest.raises(TypeError, match="alpha_in=0 takes one tensor"):
        OctaveConv(8, 8, 3, alpha_in=0)((torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)))


def test_folding_after_the_inner_conv_was_deployed_is_refused() -> None:
    block = OctaveConvBN(8, 8, 3)
    block.conv.switch_to_deploy()
    with pytest.raises(FusionError, match="deployed before bn_h/bn_l were folded"):
        block.switch_to_deploy()


# d-li14/octconv.pytorch layout: path convs named conv_<path>, padding given explicitly, and
# groups split between the resolutions (h2h ⌈g − α_in·g⌉, l2l ⌈α_in·g⌉, h2l and l2h g).
def _dli14_state(cin, cout, k, a_in, a_out, groups, seed=0):
    """Key → (weight, groups) as d-li14's OctaveConv builds them (bias=False)."""
    generator = torch.Generator().manual_seed(seed)
    in_l, out_l = int(a_in * cin), int(a_out * cout)
    in_h, out_h = cin - in_l, cout - out_l
    paths = {
        "h2h": (in_h, out_h, -(-(groups * (1 - a_in)) // 1)),
        "h2l": (in_h, out_l, groups),
        "l2h": (in_l, out_h, groups),
        "l2l": (in_l, out_l, -(-(groups * a_in) // 1)),
    }
    state = {}
    for path, (i, o, g) in paths.items():
        if i and o:
            g = int(g)
            state[f"conv_{path}.weight"] = (torch.randn(o, i // g, k, k, generator=generator), g)
    return state


def _dli14_forward(state, x, stride, padding):
    """Their forward: AvgPool2d(2) / nearest ×2 upsampling, stride 2 pools the inputs."""
    pool = nn.functional.avg_pool2d

    def conv(path, t):
        weight, groups = state[f"conv_{path}.weight"]
        return nn.functional.conv2d(t, weight, padding=padding, groups=groups)

    x_h, x_l = x if isinstance(x, tuple) else (x, None)
    x_h = pool(x_h, 2) if stride == 2 else x_h
    y_h = conv("h2h", x_h)
    y_l = conv("h2l", pool(x_h, 2)) if "conv_h2l.weight" in state else None
    if x_l is None:
        return y_h, y_l
    l2l = conv("l2l", pool(x_l, 2) if stride == 2 else x_l) if y_l is not None else None
    l2h = conv("l2h", x_l)
    y_h = y_h + (nn.functional.interpolate(l2h, scale_factor=2.0) if stride == 1 else l2h)
    return y_h, (y_l + l2l if y_l is not None else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("alphas", "groups", "stride"),
    [
        ((0.5, 0.5), 1, 1),
        ((0.5, 0.5), 4, 1),
        ((0.5, 0.5), 4, 2),
        ((0.0, 0.5), 2, 1),
        ((0.5, 0.0), 2, 2),
        ((0.25, 0.25), 4, 1),
    ],
)
def test_dli14_layout_loads_strictly_and_computes_the_same(alphas, groups, stride, dtype):
    a_in, a_out = alphas
    state = _dli14_state(16, 16, 3, a_in, a_out, groups)
    state = {k: (w.to(dtype), g) for k, (w, g) in state.items()}
    convention = "d-li14" if groups > 1 else "same"
    block = OctaveConv(
        16,
        16,
        3,
        a_in,
        a_out,
        stride=stride,
        padding=1,
        groups=groups,
        groups_convention=convention,
    ).to(dtype)
    block.load_state_dict({k: w for k, (w, _) in state.items()}, strict=True)
    x = _inputs(block, (8, 12))  # sizes they can pool twice (they floor odd sizes)
    x = tuple(t.to(dtype) for t in x) if isinstance(x, tuple) else x.to(dtype)
    expected = _dli14_forward(state, x, stride, 1)
    got = block(x)
    got = got if isinstance(got, tuple) else (got, None)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(got, expected, strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, **tol)
    fused = reparam.fuse(block)  # their grouped layout still fuses exactly
    again = fused(x)
    again = again if isinstance(again, tuple) else (again, None)
    for ours, theirs in zip(again, expected, strict=True):
        if ours is not None:
            torch.testing.assert_close(ours, theirs, **tol)


def test_dli14_conv_bn_layout_loads_into_octave_conv_bn():
    """Their Conv_BN: conv.conv_<path>.weight, bn_h.*, bn_l.*."""
    reference = randomize_batchnorm(OctaveConvBN(8, 8, 3, groups=2, groups_convention="d-li14"))
    theirs = {
        k.replace("conv.", "conv.conv_", 1) if k.startswith("conv.") else k: v
        for k, v in reference.state_dict().items()
    }
    assert "conv.conv_l2l.weight" in theirs and theirs["conv.conv_l2l.weight"].shape[1] == 4
    block = OctaveConvBN(8, 8, 3, padding=1, groups=2, groups_convention="d-li14")
    block.load_state_dict(theirs, strict=True)
    x = _inputs(block.conv, (6, 6))
    for ours, ref in zip(block.eval()(x), reference.eval()(x), strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_same_groups_convention_differs_from_dli14_in_shapes():
    ours = OctaveConv(16, 16, 3, groups=4)
    theirs = OctaveConv(16, 16, 3, 0.25, 0.25, groups=4, groups_convention="d-li14")
    assert ours.h2h.groups == ours.l2l.groups == 4
    assert (theirs.h2h.groups, theirs.l2l.groups, theirs.l2h.groups) == (3, 1, 4)
    with pytest.raises(FusionError, match="groups_convention"):
        OctaveConv(16, 16, 3, groups_convention="other")


# d-li14's depthwise mode (`is_dw`, groups == in_channels): h2h and l2l only, as in the
# depthwise layers of their oct-MobileNet (issue 19 case 9).
class _DLi14DepthwiseOctave(nn.Module):
    """Their OctaveConv with groups == in_channels: conv_h2h / conv_l2l, no cross paths."""

    def __init__(self, channels, alpha, stride):
        super().__init__()
        low = int(alpha * channels)
        self.stride = stride
        self.conv_h2h = nn.Conv2d(channels - low, channels - low, 3, 1, 1, groups=channels - low,
                                  bias=False)  # fmt: skip
        self.conv_l2l = nn.Conv2d(low, low, 3, 1, 1, groups=low, bias=False) if low else None

    def forward(self, x):
        x_h, x_l = x if isinstance(x, tuple) else (x, None)
        x_h = nn.functional.avg_pool2d(x_h, 2) if self.stride == 2 else x_h
        y_h = self.conv_h2h(x_h)
        if x_l is None:
            return y_h, None
        x_l = nn.functional.avg_pool2d(x_l, 2) if self.stride == 2 else x_l
        return y_h, self.conv_l2l(x_l)


class _DLi14DepthwiseConvBNAct(nn.Module):
    """Their Conv_BN_ACT around it: conv, bn_h, bn_l, act (ReLU)."""

    def __init__(self, channels, alpha, stride):
        super().__init__()
        self.conv = _DLi14DepthwiseOctave(channels, alpha, stride)
        low = int(alpha * channels)
        self.bn_h = nn.BatchNorm2d(channels - low)
        self.bn_l = nn.BatchNorm2d(low) if low else None
        self.act = nn.ReLU()

    def forward(self, x):
        y_h, y_l = self.conv(x)
        y_h = self.act(self.bn_h(y_h))
        return y_h if y_l is None else (y_h, self.act(self.bn_l(y_l)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("alpha", "stride"), [(0.5, 1), (0.5, 2), (0.25, 1), (0.0, 1)])
def test_dli14_depthwise_octave_loads_and_fuses_exactly(alpha, stride, dtype):
    """Before: refused ('not both divisible by groups'). After: loads their keys strictly,
    computes their forward and fuses exactly."""
    theirs = randomize_batchnorm(_DLi14DepthwiseConvBNAct(16, alpha, stride), seed=2)
    theirs = theirs.to(dtype).eval()
    block = OctaveConvBN(16, 16, 3, alpha, alpha, stride=stride, padding=1, groups=16,
                         activation=nn.ReLU(), groups_convention="d-li14")  # fmt: skip
    block.to(dtype).load_state_dict(theirs.state_dict(), strict=True)
    block.eval()
    assert block.conv.depthwise and not hasattr(block.conv, "l2h")
    x = _inputs(block.conv, (12, 8), seed=4)
    x = tuple(t.to(dtype) for t in x) if isinstance(x, tuple) else x.to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        expected = theirs(x)
        for got in (block(x), reparam.fuse(block)(x)):
            got, want = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
            for ours, ref in zip(got, want, strict=True):
                torch.testing.assert_close(ours, ref, **tol)


def test_dli14_depthwise_needs_equal_alphas():
    with pytest.raises(FusionError, match="alpha_out must equal alpha_in"):
        OctaveConv(16, 16, 3, 0.5, 0.0, groups=16, groups_convention="d-li14")
