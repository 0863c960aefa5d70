"""Involution: shift-and-accumulate vs the unfold formulation, gradients, BN fold, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import reparam
from reparam.blocks.involution import (
    Involution,
    _CeilAvgPool2d,
    involution,
    involution_shift,
    involution_unfold,
)
from reparam.errors import UserInputError
from reparam.testing import assert_fuses_exactly, randomize_batchnorm

# (channels, kernel_size, stride, group_channels, reduction_ratio, height, width)
CONFIGS = [
    (8, 3, 1, 4, 2, 11, 9),
    (16, 5, 2, 8, 4, 11, 9),
    (8, 7, 3, 2, 4, 10, 13),
    (16, 1, 1, 16, 4, 9, 9),
    (16, 3, 2, 16, 4, 8, 8),
]
IDS = [f"c{c}-k{k}-s{s}-gc{gc}-r{r}-{h}x{w}" for c, k, s, gc, r, h, w in CONFIGS]
TOLERANCES = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _block(config, dtype, seed=0):
    channels, kernel, stride, gc, ratio, _, _ = config
    torch.manual_seed(seed)
    block = Involution(channels, kernel, stride, group_channels=gc, reduction_ratio=ratio)
    return randomize_batchnorm(block, seed).to(dtype)


def _input(config, dtype, batch=2, seed=1):
    channels, *_, height, width = config
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_matches_unfold(config, dtype, tol):
    block = _block(config, dtype).eval()
    x = _input(config, dtype)
    with torch.no_grad():
        ours, reference = block(x), block.forward_unfold(x)
    stride = config[2]
    assert ours.shape == (2, config[0], -(-config[5] // stride), -(-config[6] // stride))
    assert _rel(ours, reference) <= tol


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradients_match_unfold(config, dtype, tol):
    block = _block(config, dtype).train()
    x = _input(config, dtype).requires_grad_()
    weights = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    inputs = [x, *block.parameters()]
    ours = torch.autograd.grad((block(x) * weights).sum(), inputs)
    reference = torch.autograd.grad((block.forward_unfold(x) * weights).sum(), inputs)
    for got, want in zip(ours, reference, strict=True):
        assert _rel(got, want) <= tol


@pytest.mark.parametrize("config", CONFIGS[:3], ids=IDS[:3])
def test_gradcheck_of_the_operator(config):
    channels, kernel, stride, gc, *_ = config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 6, 5, dtype=torch.float64, generator=generator)
    out_h, out_w = (6 - 1) // stride + 1, (5 - 1) // stride + 1
    weight = torch.randn(
        1, channels // gc * kernel * kernel, out_h, out_w, dtype=torch.float64,
        generator=generator,
    )  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda a, b: involution(a, b, kernel, stride, gc),
        (x.requires_grad_(), weight.requires_grad_()),
    )
    with torch.no_grad():
        assert _rel(involution_shift(x, weight, kernel, stride, gc),
                    involution_unfold(x, weight, kernel, stride, gc)) <= 1e-12  # fmt: skip


def test_training_step_changes_weights():
    config = CONFIGS[1]
    block = _block(config, torch.float32).train()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    loss = block(_input(config, torch.float32)).square().mean()
    loss.backward()
    optimizer.step()
    for name, p in block.named_parameters():
        assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fuse_folds_bn_and_deploy_loads_strictly(config, dtype, tol):
    block = _block(config, dtype)
    x = _input(config, dtype)
    fused, _ = assert_fuses_exactly(block, x, rtol=tol)
    assert fused.deploy and not hasattr(fused.conv1, "bn")
    assert set(fused.state_dict()) == {
        "conv1.conv.weight", "conv1.conv.bias", "conv2.conv.weight", "conv2.conv.bias",
    }  # fmt: skip
    channels, kernel, stride, gc, ratio, _, _ = config
    deployed = Involution(channels, kernel, stride, gc, ratio, deploy=True).to(dtype).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), fused(x)) == 0.0
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        again = reparam.fuse(fused)
        for key, value in again.state_dict().items():
            assert torch.equal(value, state[key])


def test_training_layout_matches_published_keys():
    block = Involution(32, 7)
    assert set(block.state_dict()) == {
        "conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv1.bn.running_mean",
        "conv1.bn.running_var", "conv1.bn.num_batches_tracked", "conv2.conv.weight",
        "conv2.conv.bias",
    }  # fmt: skip
    assert block.conv1.conv.bias is None
    assert block.conv2.conv.out_channels == 49 * 2


@pytest.mark.parametrize("stride", [2, 3])
def test_ceil_mode_pool(stride):
    for height in range(1, 10):
        x = torch.randn(2, 3, height, 7, dtype=torch.float64)
        expected = F.avg_pool2d(x, stride, stride, ceil_mode=True)
        assert _rel(_CeilAvgPool2d(stride)(x), expected) <= 1e-14


def test_export_with_dynamic_shapes():
    config = CONFIGS[1]
    block = _block(config, torch.float32).eval()
    dims = {
        0: Dim("batch", min=1, max=64),
        2: Dim("h", min=8, max=512),
        3: Dim("w", min=8, max=512),
    }
    program = torch.export.export(block, (_input(config, torch.float32),), dynamic_shapes=(dims,))
    x = torch.randn(3, 16, 23, 17)
    with torch.no_grad():
        assert _rel(program.module()(x), block.forward_unfold(x)) <= 1e-5


def test_errors():
    with pytest.raises(UserInputError, match="multiple of group_channels"):
        Involution(24, 3, group_channels=16)
    with pytest.raises(UserInputError, match="odd kernel_size"):
        Involution(16, 4)
    with pytest.raises(UserInputError, match="reduction_ratio"):
        Involution(16, 3, reduction_ratio=32)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        Involution(16, 3)(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        involution(torch.randn(1, 16, 5, 5), torch.randn(1, 8, 5, 5), 3, 1, 16)


# --- YOLOv5 layout, chunked kernel generation, low precision ----------------------------


class _YoloConv(torch.nn.Module):
    """YOLOv5's ``Conv(c1, c2, 1)``: conv without bias, BatchNorm, SiLU (keys conv/bn)."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv = torch.nn.Conv2d(c1, c2, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c2)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class _YoloInvolution(torch.nn.Module):
    """The YOLOv5 pull-request Involution, rewritten here: reduce 4, 16 group channels,
    AvgPool2d(s, s) when s > 1, kernels applied to the unfolded input."""

    def __init__(self, ch, k, s):
        super().__init__()
        self.k, self.s, self.groups = k, s, ch // 16
        self.cv1 = _YoloConv(ch, ch // 4)
        self.cv2 = torch.nn.Conv2d(ch // 4, k * k * self.groups, 1)
        if s > 1:
            self.avgpool = torch.nn.AvgPool2d(s, s)

    def forward(self, x):
        weight = self.cv2(self.cv1(x if self.s == 1 else self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, 1, self.k * self.k, h, w)
        columns = F.unfold(x, self.k, 1, (self.k - 1) // 2, self.s)
        columns = columns.view(b, self.groups, 16, self.k * self.k, h, w)
        return (weight * columns).sum(3).view(b, x.shape[1], h, w)


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (7, 1), (3, 2)], ids=["k3s1", "k7s1", "k3s2"])
def test_yolov5_layout_loads_and_matches_its_forward(kernel, stride, dtype, tol):
    torch.manual_seed(0)
    published = randomize_batchnorm(_YoloInvolution(32, kernel, stride), 1).to(dtype).eval()
    block = Involution(32, kernel, stride, layout="yolov5").to(dtype)
    block.load_state_dict(published.state_dict(), strict=True)
    assert set(block.state_dict()) == set(published.state_dict())
    block.eval()
    x = torch.randn(2, 32, 12, 10, dtype=dtype)
    with torch.no_grad():
        expected = published(x)
        assert _rel(block(x), expected) <= tol
    fused, _ = assert_fuses_exactly(block, x, rtol=tol)
    assert set(fused.state_dict()) == {"cv1.conv.weight", "cv1.conv.bias", "cv2.weight", "cv2.bias"}
    deployed = Involution(32, kernel, stride, layout="yolov5", deploy=True).to(dtype).eval()
    deployed.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(deployed(x), expected) <= tol


def test_yolov5_layout_gradients_match_its_forward():
    torch.manual_seed(0)
    published = _YoloInvolution(32, 5, 1).double().train()
    block = Involution(32, 5, layout="yolov5").double().train()
    block.load_state_dict(published.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    want = torch.autograd.grad(published(x).square().sum(), [x, *published.parameters()])
    for got, expected in zip(ours, want, strict=True):
        assert _rel(got, expected) <= 1e-10


def test_unknown_layout_is_refused():
    from reparam.errors import BlockConfigError

    with pytest.raises(BlockConfigError, match="layout"):
        Involution(32, 3, layout="timm")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_generated_chunks_match_whole_kernels(config, monkeypatch):
    """The no-grad path generates kernels chunk by chunk: tiny chunks must not change it."""
    import reparam.ops.involution_kernels as module

    block = _block(config, torch.float64).eval()
    x = _input(config, torch.float64, batch=3)
    with torch.no_grad():
        whole = involution_shift(x, block.kernels(x), *config[1:4])
        monkeypatch.setattr(module, "_generated_chunk_limit", lambda elements: 1)
        chunked = block(x)
    assert _rel(chunked, whole) <= 1e-12


def test_involution_from_features_rejects_bad_shapes():
    from reparam.blocks.involution import involution_from_features

    x = torch.randn(1, 16, 5, 5)
    with pytest.raises(ValueError, match="span_weight"):
        involution_from_features(x, torch.randn(1, 4, 5, 5), torch.randn(8, 4, 1, 1), None, 3)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_no_worse_than_unfold(low):
    """Taps are summed in float32: error vs float64 at most the unfold form's (+10%)."""
    torch.manual_seed(0)
    block = randomize_batchnorm(Involution(64, 7), 0).to(low).eval()
    x = torch.randn(2, 64, 20, 20).to(low)
    with torch.no_grad():
        weight = block.kernels(x)
        exact = involution_unfold(x.double(), weight.double(), 7)
        ours = involution_shift(x, weight, 7)
        unfold = involution_unfold(x, weight, 7)
        module = block(x)
    assert ours.dtype == module.dtype == low
    error_ours = (ours.double() - exact).abs().max().item()
    error_unfold = (unfold.double() - exact).abs().max().item()
    assert error_ours <= 1.1 * error_unfold
    # The whole module (kernels generated chunk-wise) vs the unfold module, both against
    # the same weights in float64.
    import copy

    with torch.no_grad():
        exact_module = copy.deepcopy(block).double().forward_unfold(x.double())
        unfold_module = block.forward_unfold(x)
    error_module = (module.double() - exact_module).abs().max().item()
    assert error_module <= 1.1 * (unfold_module.double() - exact_module).abs().max().item()


def test_module_peak_extra_memory_within_three_inputs():
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    block = Involution(64, 7).eval()
    x = torch.randn(4, 64, 32, 32)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler misses allocations made on other threads
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            out = block(x)
            del out
    finally:
        torch.set_num_threads(saved)
    events = sorted(
        (e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    assert peak <= 3 * x.numel() * x.element_size()


def test_vmap_over_involution_equals_the_loop():
    torch.manual_seed(0)
    block = Involution(16, 3, group_channels=8).eval()
    randomize_batchnorm(block)
    xs = torch.randn(3, 2, 16, 7, 6)
    with torch.no_grad():
        expected = torch.stack([block(x) for x in xs])
        got = torch.func.vmap(block)(xs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weight = torch.randn(3, 2, 2 * 9, 7, 6)  # the op itself, mapped over its inputs
    loop = torch.stack([involution(x, w, 3, 1, 8) for x, w in zip(xs, weight, strict=True)])
    torch.testing.assert_close(torch.func.vmap(involution, in_dims=(0, 0, None, None, None))(
        xs, weight, 3, 1, 8), loop, rtol=1e-5, atol=1e-6)  # fmt: skip


def test_backward_on_channels_last_input():
    torch.manual_seed(0)
    block = Involution(32, 3, group_channels=8).train()
    x = torch.randn(2, 32, 9, 7)
    inputs = [x.contiguous(memory_format=torch.channels_last).requires_grad_(), x.clone()]
    inputs[1].requires_grad_()
    grads = [torch.autograd.grad(block(v).square().sum(), [v, *block.parameters()]) for v in inputs]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
