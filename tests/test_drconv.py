"""DRConv2d: seed layout, straight-through region assignment, the 1/r inference path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from reparam.blocks.drconv import DRConv2d, assign_region, assign_region_reference
from reparam.errors import UserInputError
from reparam.ops.corr import corr_mode, corr_reference

# (in, out, kernel, regions, stride, padding, dilation, height, width)
CONFIGS = [
    (4, 6, 3, 3, 1, 1, 1, 11, 9),
    (4, 4, 3, 4, 2, 0, 1, 11, 9),
    (3, 5, 5, 8, 1, 2, 2, 12, 10),
    (6, 2, 1, 4, 1, 0, 1, 7, 8),
    (4, 4, 3, 2, 1, 1, 1, 9, 9),
    (4, 4, 3, 1, 1, 1, 1, 9, 9),
]
IDS = [f"{i}to{o}-k{k}-r{r}-s{s}-p{p}-d{d}-{h}x{w}" for i, o, k, r, s, p, d, h, w in CONFIGS]
TOLERANCES = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _block(config, dtype=torch.float32, seed=0) -> DRConv2d:
    c_in, c_out, k, r, s, p, d, _, _ = config
    torch.manual_seed(seed)
    return DRConv2d(c_in, c_out, k, region_num=r, stride=s, padding=p, dilation=d).to(dtype)


def _input(config, dtype=torch.float32, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config[0], config[7], config[8], generator=generator, dtype=dtype)


def _seed_module(config) -> nn.Module:
    """The seed's layout with nn.AdaptiveAvgPool2d, to load its weights and recompute."""
    c_in, c_out, k, r, s, p, d, _, _ = config
    module = nn.Module()
    module.conv_kernel = nn.Sequential(
        nn.AdaptiveAvgPool2d((k, k)),
        nn.Conv2d(c_in, r * r, 1),
        nn.Sigmoid(),
        nn.Conv2d(r * r, r * c_in * c_out, 1, groups=r),
    )
    module.conv_guide = nn.Conv2d(c_in, r, k, stride=s, padding=p, dilation=d)
    return module


def _seed_forward(module: nn.Module, x: torch.Tensor, config) -> torch.Tensor:
    """The seed's eval computation: grouped-conv Corr, then the scatter mask of asign_index."""
    c_in, c_out, k, r, s, p, d, _, _ = config
    batch = x.shape[0]
    kernel = module.conv_kernel(x).view(batch, r * c_out, c_in, k, k)
    out = corr_reference(x, kernel, 1, s, p, d)
    out = out.view(batch, r, c_out, out.shape[2], out.shape[3])
    guide = module.conv_guide(x)
    mask = torch.zeros_like(guide).scatter_(1, guide.argmax(dim=1, keepdim=True), 1)
    return (out * mask.unsqueeze(2)).sum(dim=1)


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_seed_weights_load_and_outputs_match_the_seed(config, dtype, tol):
    seed = _seed_module(config).to(dtype)
    block = _block(config, dtype, seed=5)
    block.load_state_dict(seed.state_dict(), strict=True)
    x = _input(config, dtype)
    with torch.no_grad():
        expected = _seed_forward(seed, x, config)
        fast, reference = block(x), block.forward_reference(x)
        with corr_mode("standard"):
            standard = block(x)
    assert fast.shape == expected.shape
    for got in (fast, reference, standard):
        assert _rel(got, expected) <= tol


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fast_path_selection(config):
    block = _block(config).eval()
    x = _input(config)
    expected_fast = config[3] >= 3
    with torch.no_grad():
        assert block.uses_fast_path(x) == expected_fast
        with corr_mode("standard"):
            assert not block.uses_fast_path(x)
    assert not block.uses_fast_path(x)  # parameters require grad: straight-through path
    block.fast_inference = False
    with torch.no_grad():
        assert not block.uses_fast_path(x)


def test_fast_path_many_regions_larger_batch():
    config = (8, 8, 3, 8, 1, 1, 1, 16, 16)
    block = _block(config, torch.float64).eval()
    x = _input(config, torch.float64, batch=5)
    with torch.no_grad():
        assert _rel(block(x), block.forward_reference(x)) <= 1e-10


def _assignment_inputs(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(2, 4, 3, 5, 6, generator=generator, dtype=dtype)
    guide = torch.randn(2, 4, 5, 6, generator=generator, dtype=dtype)
    weights = torch.randn(2, 3, 5, 6, generator=generator, dtype=dtype)
    return outputs.requires_grad_(), guide.requires_grad_(), weights


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_assign_region_matches_pure_autograd_reference(dtype, tol):
    outputs, guide, weights = _assignment_inputs(dtype)
    ours = assign_region(outputs, guide)
    reference = assign_region_reference(outputs, guide)
    assert _rel(ours, reference) <= tol
    grads = torch.autograd.grad((ours * weights).sum(), (outputs, guide))
    expected = torch.autograd.grad((reference * weights).sum(), (outputs, guide))
    for got, want in zip(grads, expected, strict=True):
        assert _rel(got, want) <= tol


def test_assign_region_gradients_are_the_seeds():
    outputs, guide, weights = _assignment_inputs()
    grad_outputs, grad_guide = torch.autograd.grad(
        (assign_region(outputs, guide) * weights).sum(), (outputs, guide)
    )
    mask = torch.zeros_like(guide).scatter_(1, guide.argmax(dim=1, keepdim=True), 1)
    torch.testing.assert_close(grad_outputs, weights.unsqueeze(1) * mask.unsqueeze(2))
    mixed = (weights.unsqueeze(1) * outputs).sum(dim=2)
    soft = torch.softmax(guide, dim=1)
    torch.testing.assert_close(grad_guide, soft * (mixed - (soft * mixed).sum(1, keepdim=True)))


def test_block_gradients_match_pure_autograd_reference():
    config = CONFIGS[0]
    block = _block(config, torch.float64).train()
    x = _input(config, torch.float64).requires_grad_()
    inputs = [x, *block.parameters()]
    weights = torch.randn(block(x).shape, dtype=torch.float64)
    ours = torch.autograd.grad((block(x) * weights).sum(), inputs)

    def reference(x):
        batch, (_, c_out, k, r, s, p, d, _, _) = x.shape[0], config
        kernel = block.conv_kernel(x).view(batch, r * c_out, -1, k, k)
        out = corr_reference(x, kernel, 1, s, p, d)
        out = out.view(batch, r, c_out, out.shape[2], out.shape[3])
        return assign_region_reference(out, block.conv_guide(x))

    expected = torch.autograd.grad((reference(x) * weights).sum(), inputs)
    for got, want in zip(ours, expected, strict=True):
        assert _rel(got, want) <= 1e-10


def test_training_step_changes_weights():
    config = CONFIGS[0]
    block = _block(config).train()
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    block(_input(config)).square().mean().backward()
    optimizer.step()
    for name, p in block.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_state_dict_keys_are_the_seeds():
    assert set(_block(CONFIGS[0]).state_dict()) == set(_seed_module(CONFIGS[0]).state_dict())


@pytest.mark.parametrize("mode", ["op", "standard"])
def test_export_with_dynamic_shapes(mode):
    config = CONFIGS[0]
    block = _block(config).eval()
    dims = {
        0: Dim("batch", min=1, max=64),
        2: Dim("h", min=8, max=512),
        3: Dim("w", min=8, max=512),
    }
    with corr_mode(mode):
        program = torch.export.export(block, (_input(config),), dynamic_shapes=(dims,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert ("reparam.corr.default" in targets) == (mode == "op")
    x = torch.randn(3, 4, 21, 17)
    with torch.no_grad():
        assert _rel(program.module()(x), block.forward_reference(x)) <= 1e-5


def test_errors():
    with pytest.raises(UserInputError, match="region_num"):
        DRConv2d(4, 4, 3, region_num=0)
    with pytest.raises(UserInputError, match="odd kernel_size"):
        DRConv2d(4, 4, 2)
    with pytest.raises(UserInputError, match="in_channels and out_channels"):
        DRConv2d(0, 4, 3)
    with pytest.raises(UserInputError, match="stride"):
        DRConv2d(4, 4, 3, stride=0)
    with pytest.raises(UserInputError, match=r"\(B, 4, H, W\)"):
        DRConv2d(4, 4, 3)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="assign_region"):
        assign_region(torch.randn(2, 3, 4, 5, 5), torch.randn(2, 2, 5, 5))


def _seed_formulation(block: DRConv2d, x: torch.Tensor) -> torch.Tensor:
    """The seed's training computation in plain autograd: per-sample conv Corr, all r region
    outputs, hard + soft − soft.detach() assignment."""
    batch, k = x.shape[0], block.kernel_size
    kernel = block.conv_kernel(x).view(batch, block.region_num * block.out_channels, -1, k, k)
    out = corr_reference(x, kernel, 1, block.stride, block.padding, block.dilation)
    out = out.view(batch, block.region_num, block.out_channels, out.shape[2], out.shape[3])
    return assign_region_reference(out, block.conv_guide(x))


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_chosen_region_backward_matches_the_seed_formulation(config, dtype, tol):
    block = _block(config, dtype).train()
    x = _input(config, dtype, batch=3).requires_grad_()
    inputs = [x, *block.parameters()]
    out = block(x)
    assert out.grad_fn is not None and "RegionCorr" in type(out.grad_fn).__name__
    weights = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    ours = torch.autograd.grad((out * weights).sum(), inputs)
    expected = torch.autograd.grad((_seed_formulation(block, x) * weights).sum(), inputs)
    for got, want in zip(ours, expected, strict=True):
        assert _rel(got, want) <= tol


@pytest.mark.parametrize("config", CONFIGS[:4], ids=IDS[:4])
def test_gathered_im2col_rows_are_unfolds_columns(config):
    """One row gather from the channels-last rows with the window table (padding taps read
    the zero row) gives the im2col rows, ordered taps outer and channels inner."""
    from reparam.ops.region_corr import channels_last_rows, window_index

    c_in, _, k, _, s, p, d, h, w = config
    x = _input(config, torch.float64, batch=1)[0]
    geometry = (k, s, p, d)
    windows = window_index(h, w, geometry, x.device, 0, (h + 2 * p - d * (k - 1) - 1) // s + 1)
    rows = channels_last_rows(x, torch.empty(1 + h * w, c_in, dtype=torch.float64))
    gathered = rows.index_select(0, (windows + 1).clamp(min=0).view(-1))
    unfolded = nn.functional.unfold(x[None], k, dilation=d, padding=p, stride=s)[0]
    expected = unfolded.view(c_in, k * k, -1).permute(2, 1, 0).reshape(-1, c_in)
    assert torch.equal(gathered, expected)


def test_training_temporaries_above_the_bound_are_fresh_tensors(monkeypatch):
    """Above _SCRATCH_BYTES a sample's training temporaries are new tensors, not per-thread
    buffers kept for the thread's life; the gradients are the same."""
    import reparam.ops.region_corr as region_corr
    from reparam.ops import workspace

    config = CONFIGS[0]
    block = _block(config, torch.float64).train()
    x = _input(config, torch.float64).requires_grad_()
    weights = torch.randn(block(x).shape, dtype=torch.float64)
    inputs = [x, *block.parameters()]
    expected = torch.autograd.grad((block(x) * weights).sum(), inputs)
    monkeypatch.setattr(region_corr, "_SCRATCH_BYTES", 0)
    buffers = workspace._local.__dict__.setdefault("buffers", {})
    for key in [key for key in buffers if key[0].startswith("region_corr.")]:
        del buffers[key]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every sample on this thread, whose buffers we can see
    try:
        got = torch.autograd.grad((block(x) * weights).sum(), inputs)
    finally:
        torch.set_num_threads(threads)
    assert not [key for key in buffers if key[0].startswith("region_corr.")]
    for mine, want in zip(got, expected, strict=True):
        assert torch.equal(mine, want)


def test_chosen_region_backward_without_input_gradient():
    config = CONFIGS[2]
    block = _block(config, torch.float64).train()
    x = _input(config, torch.float64)
    params = list(block.parameters())
    ours = torch.autograd.grad(block(x).square().sum(), params)
    expected = torch.autograd.grad(_seed_formulation(block, x).square().sum(), params)
    for got, want in zip(ours, expected, strict=True):
        assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_fast_path_no_worse_than_the_seed_formulation(low):
    """Per-region sums (matmuls) accumulate in float32 inside the BLAS: the 1/r path's error
    against float64 is at most the grouped-conv reference's (+10%)."""
    import copy

    torch.manual_seed(0)
    block = DRConv2d(32, 32, 3, region_num=8, padding=1).to(low).eval()
    x = torch.randn(2, 32, 12, 12).to(low)
    with torch.no_grad():
        exact = copy.deepcopy(block).double().forward_reference(x.double())
        assert block.uses_fast_path(x)
        fast, reference = block(x).double(), block.forward_reference(x).double()
    assert (fast - exact).abs().max() <= 1.1 * (reference - exact).abs().max()


@pytest.mark.parametrize("config", CONFIGS[:4], ids=IDS[:4])
@pytest.mark.parametrize("band_bytes", [1, 2048], ids=["one-row-bands", "few-row-bands"])
def test_fast_path_in_bands_matches_the_reference(config, band_bytes, monkeypatch):
    """The 1/r path cut into bands of output rows (stride and dilation move each band's
    window): same outputs as the all-region reference, whatever the band height."""
    import reparam.ops.drconv_kernels as drconv_module

    monkeypatch.setattr(drconv_module, "_BAND_BYTES", band_bytes)
    block = _block(config, torch.float64).eval()
    x = _input(config, torch.float64, batch=3)
    with torch.no_grad():
        assert block.uses_fast_path(x)
        fast, reference = block._forward_fast(x), block.forward_reference(x)
    assert _rel(fast, reference) <= 1e-12


def test_first_max_index_is_argmax_ties_included():
    from reparam.ops.region_corr import first_max_index

    generator = torch.Generator().manual_seed(0)
    guide = torch.randn(3, 8, 5, 7, generator=generator)
    guide[:, 2:5] = guide[:, 2:3].clone()  # three tied maxima when region 2 is largest
    guide[0, :, 0, 0] = 1.0  # every region tied
    for dim in (0, 1, 2):
        assert torch.equal(first_max_index(guide, dim), guide.argmax(dim=dim))


def test_fast_path_one_channel_one_by_one_kernel():
    """K·K·C = 1: single-column im2col rows, which the grouped matmul refuses (the loop
    runs instead)."""
    torch.manual_seed(0)
    block = DRConv2d(1, 4, 1, region_num=4).eval()
    x = torch.randn(2, 1, 5, 6)
    with torch.no_grad():
        assert block.uses_fast_path(x)
        assert _rel(block(x), block.forward_reference(x)) <= 1e-6


def test_fast_path_input_smaller_than_the_kernel_gives_the_convolution_error():
    block = DRConv2d(4, 4, 3, region_num=4).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        block(torch.randn(1, 4, 5, 2))


@pytest.mark.parametrize("config", CONFIGS[:4], ids=IDS[:4])
@pytest.mark.parametrize("range_pixels", [1, 200, 1 << 20], ids=["one", "few", "all"])
def test_fast_path_sample_ranges_match_the_reference(config, range_pixels, monkeypatch):
    """The per-sample preparation (channels-last rows, pooling, guide) run on ranges of one,
    a few or all samples: same outputs as the all-region reference."""
    import reparam.ops.drconv_kernels as drconv_module

    monkeypatch.setattr(drconv_module, "_RANGE_PIXELS", range_pixels)
    block = _block(config, torch.float64).eval()
    x = _input(config, torch.float64, batch=5)
    with torch.no_grad():
        assert block.uses_fast_path(x)
        fast, reference = block(x), block.forward_reference(x)
    assert _rel(fast, reference) <= 1e-12


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_fast_path_takes_any_input_layout(layout):
    """The channels-last copy reads the input through its strides."""
    block = _block(CONFIGS[2], torch.float64).eval()
    x = _input(CONFIGS[2], torch.float64, batch=3)
    if layout == "channels_last":
        strided = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        strided = torch.cat([x, x], dim=1)[:, ::2]  # every other channel of a wider tensor
        x = strided.contiguous()
    with torch.no_grad():
        assert _rel(block(strided), block.forward_reference(x)) <= 1e-12


def test_cached_window_index_made_in_inference_mode_serves_later_calls():
    """Window index tables are cached across calls; the first call's inference mode must
    not make them inference tensors that later calls cannot use."""
    import reparam.ops.region_corr as region_corr

    region_corr._cached_window_index.cache_clear()
    block = DRConv2d(3, 4, 3, region_num=4, padding=1).eval()
    x = torch.randn(2, 3, 6, 7)
    with torch.inference_mode():
        first = block(x).clone()
    with torch.no_grad():
        assert torch.equal(block(x), first)
    cached = region_corr.window_index(6, 7, (3, 1, 1, 1), x.device, 0, 6)
    assert not cached.is_inference()
    assert region_corr._cached_window_index.cache_info().currsize == 1


def test_large_window_tables_and_kernels_are_not_kept(monkeypatch):
    """Above their bounds, the window index is made per call and a sample's kernels get a
    fresh tensor instead of a per-thread buffer kept for the thread's life."""
    import reparam.ops.drconv_kernels as drconv_module
    import reparam.ops.region_corr as region_corr
    from reparam.ops import workspace

    monkeypatch.setattr(region_corr, "_WINDOW_CACHE_BYTES", 0)
    monkeypatch.setattr(drconv_module, "_BAND_BYTES", 4096)  # one band; kernels 36 KiB
    region_corr._cached_window_index.cache_clear()
    block = DRConv2d(2, 64, 3, region_num=8, padding=1).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    key = ("drconv.kernels", torch.float64)
    buffers = workspace._local.__dict__.setdefault("buffers", {})
    buffers.pop(key, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every sample on this thread, whose buffers we can see
    try:
        with torch.no_grad():
            assert _rel(block(x), block.forward_reference(x)) <= 1e-12
    finally:
        torch.set_num_threads(threads)
    assert region_corr._cached_window_index.cache_info().currsize == 0
    assert key not in buffers


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_meta_and_fake_inputs_take_the_reference_form(mode):
    """Without values to read (meta device, fake tensors) the 1/r path cannot count its
    regions: shapes come from the reference formulation, and nothing fake is cached."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    block = DRConv2d(4, 6, 3, region_num=4, padding=1).train(mode == "train")
    meta_block = DRConv2d(4, 6, 3, region_num=4, padding=1).to("meta").train(mode == "train")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert meta_block(torch.empty(2, 4, 10, 10, device="meta")).shape == (2, 6, 10, 10)
    x = torch.randn(2, 4, 11, 13)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, torch.no_grad():
        assert not block.uses_fast_path(fake.from_tensor(x))
        assert block(fake.from_tensor(x)).shape == (2, 6, 11, 13)
    with torch.no_grad():
        assert _rel(block(x), block.forward_reference(x)) <= 1e-5


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_under_cpu_autocast_it_computes_as_a_float32_op(low, mode):
    """Under autocast the 1/r and chosen-region paths run with autocast off in the weights'
    dtype: the same outputs and gradients as without autocast, also when the input arrives
    in the autocast dtype from an earlier layer."""
    block = _block(CONFIGS[0]).train(mode == "train")
    x = _input(CONFIGS[0], batch=3)
    with torch.set_grad_enabled(mode == "train"):
        expected = block(x)
        with torch.autocast("cpu", dtype=low):
            got = block(x)
            from_low = block(x.to(low))
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    torch.testing.assert_close(from_low, block(x.to(low).float()))
    if mode == "train":
        grads = torch.autograd.grad(got.square().sum(), list(block.parameters()))
        want = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
        for ours, reference in zip(grads, want, strict=True):
            assert torch.equal(ours, reference)


def test_reference_form_and_corr_on_an_empty_batch():
    """The batch-folded grouped convolution would have zero groups: an empty result of the
    right shape instead, zero gradients, and a too-small input still refused."""
    block = _block(CONFIGS[2])
    x = torch.randn(0, 3, 12, 10, requires_grad=True)
    out = block.forward_reference(x)
    assert out.shape == (0, 5, 8, 6)  # K5, padding 2, dilation 2
    out.sum().backward()
    assert x.grad.shape == x.shape
    kernels = torch.randn(0, 4, 3, 3, 3)
    assert corr_reference(x.detach(), kernels, 1, 1, 1, 1).shape == (0, 4, 12, 10)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        block.forward_reference(torch.randn(0, 3, 2, 2))


def test_fast_path_honours_a_replaced_or_hooked_pool():
    """The 1/r path pools with its own averaging matrices only for the block's adaptive
    average pool: a replaced pool (here a max pool) is called, and so are a hooked pool's
    hooks."""
    block = _block(CONFIGS[0], torch.float64).eval()
    x = _input(CONFIGS[0], torch.float64, batch=3)
    block.conv_kernel[0] = nn.AdaptiveMaxPool2d(3)
    with torch.no_grad():
        assert block.uses_fast_path(x)
        assert _rel(block(x), block.forward_reference(x)) <= 1e-12
    block = _block(CONFIGS[0], torch.float64).eval()
    seen = []
    block.conv_kernel[0].register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    with torch.no_grad():
        fast = block(x)
    assert sum(seen) == 3  # every sample pooled by the module, in ranges
    with torch.no_grad():
        assert _rel(fast, block.forward_reference(x)) <= 1e-12
