"""HetConv: heterogeneous kernels (Singh et al., CVPR 2019), as a groupwise KxK + pointwise 1x1.

Training form (the common implementation of blog posts and YOLO forks):
    y = BN_g(W_g ⋆ x) + BN_p(W_p ⋆ x)
with W_g a KxK conv with ``groups=p`` (each filter sees Cin/p channels through a KxK kernel)
and W_p a dense 1x1. Every filter then has a KxK kernel on its own group's channels *and* a
1x1 on all channels, so the centre tap of its own group counts twice.

The paper's exact heterogeneous filter (``exact=True``, https://arxiv.org/abs/1903.04120,
Fig. 2) has a 1x1 kernel
only on the channels *outside* its group: gwc3x3 + pwc1x1 − gwc1x1. It is implemented by
masking the pointwise kernel to zero on each filter's own group (a fixed, non-persistent mask;
state-dict keys are unchanged).

Deploy forms (both exact):

- ``"dense"``: one dense KxK conv, W = grouped_to_dense(W_g') + centre(W_p'),
  b = b_g' + b_p' (' marks the BN-folded kernels).
- ``"separate"``: the two convs kept, each with its BN folded in; the summed bias sits on
  ``gwc``.

A dense KxK costs K²·Cin·Cout multiply-adds per output pixel against (K²/p + 1)·Cin·Cout for
the two convs, so fusing can make a network slower. ``fuse_mode="auto"`` picks the form
(see :func:`choose_form`) and says why in ``fuse_detail``.

State-dict keys: training form gwc, gwc_bn, pwc, pwc_bn (gwc/pwc as the common
implementation names them); deploy form
``fused_conv`` ("dense") or gwc, pwc ("separate").
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam.blocks.base import ReparamBlock, resolve_padding
from reparam.errors import BlockConfigError
from reparam.fusion import add_branches, centre_kernel, centred_padding, grouped_to_dense
from reparam.module_fusion import conv_bn_kernel, make_conv

__all__ = ["FUSE_MODES", "HetConv", "choose_form"]

FUSE_MODES = ("auto", "dense", "separate")

# The timed trial of fuse_mode="auto": the dense candidate may cost at most this many
# multiply-adds per run, on a square input of at least MIN_TRIAL_SIZE pixels a side;
# larger layers are decided by the cost model (where compute dominates, MACs predict well).
TRIAL_MACS = 1e7
MIN_TRIAL_SIZE = 8
TRIAL_RUNS = 3
TRIAL_SECONDS = 0.03  # stop timing (and use what was measured) past this
DENSE_MARGIN = 0.9  # fuse only if the dense conv is >10% faster: ties go to fewer MACs


class HetConv(ReparamBlock):
    """Groupwise KxK conv-BN + pointwise 1x1 conv-BN, summed; fuses into one KxK conv or two.

    Args:
        in_channels, out_channels: channel counts, both divisible by ``p``.
        p: the HetConv part count: the KxK conv has ``groups=p``.
        kernel_size: odd K of the groupwise conv (the paper uses 3).
        stride: shared by both convs.
        padding: the KxK conv's padding; None means dilation·(K//2) ("same" at stride 1).
            The 1x1 conv is padded (or its input cropped) to read the KxK's centre tap.
        dilation: the KxK conv's dilation.
        bias: give the two convs a bias.
        use_bn: a BatchNorm after each conv (``gwc_bn``, ``pwc_bn``); the common
            implementation has none.
        exact: the paper's exact heterogeneous filter (no 1x1 on a filter's own group).
        fuse_mode: "auto" (decide at fuse time, see :func:`choose_form`), "dense" (one KxK
            conv) or "separate" (two convs with their BNs folded).
        deploy: build the deploy form directly (to load fused checkpoints); needs
            ``fuse_mode`` "dense" or "separate", the form the checkpoint was fused to
            (``block.deploy_form`` after fusing).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        p: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = False,
        use_bn: bool = True,
        exact: bool = False,
        fuse_mode: str = "auto",
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if p < 1 or in_channels % p or out_channels % p:
            raise BlockConfigError(
                f"HetConv needs in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"divisible by p ({p})"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise BlockConfigError(
                f"HetConv needs an odd kernel_size (the 1x1 aligns with the centre tap), "
                f"got {kernel_size}"
            )
        if fuse_mode not in FUSE_MODES:
            raise BlockConfigError(f"fuse_mode must be one of {FUSE_MODES}, got {fuse_mode!r}")
        if deploy and fuse_mode == "auto":
            raise BlockConfigError(
                "HetConv(deploy=True) needs fuse_mode='dense' or 'separate': the deploy form "
                "a checkpoint holds (a fused block records it in .deploy_form)"
            )
        padding = resolve_padding(padding, kernel_size, dilation)
        self.in_channels, self.out_channels, self.p = in_channels, out_channels, p
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.use_bn, self.exact = dilation, use_bn, exact
        self.fuse_mode = fuse_mode
        self.deploy = deploy
        self.deploy_form: str | None = fuse_mode if deploy else None
        side = centred_padding(padding, kernel_size, 1, dilation)
        self.pwc_padding, self.crop = max(side, 0), max(-side, 0)
        if exact and not deploy:
            # mask[o, i] = 0 where input channel i lies in output channel o's own group.
            out_group = torch.arange(out_channels) // (out_channels // p)
            in_group = torch.arange(in_channels) // (in_channels // p)
            mask = (out_group[:, None] != in_group[None, :]).float()
            self.register_buffer("pwc_mask", mask[:, :, None, None], persistent=False)
        else:
            self.pwc_mask = None

        if deploy and fuse_mode == "dense":
            self.fused_conv = self._gwc(bias=True, groups=1)
            return
        self.gwc = self._gwc(bias=bias or deploy, groups=p)
        self.pwc = nn.Conv2d(
            in_channels,
            out_channels,
            1,
            stride=stride,
            padding=self.pwc_padding,
            bias=bias and not deploy,  # deployed: the summed bias sits on gwc
        )
        if use_bn and not deploy:
            self.gwc_bn = nn.BatchNorm2d(out_channels)
            self.pwc_bn = nn.BatchNorm2d(out_channels)

    def _gwc(self, *, bias: bool, groups: int) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=bias,
        )

    def _pwc_input(self, x: Tensor) -> Tensor:
        c = self.crop
        return x[:, :, c:-c, c:-c] if c > 0 else x

    def _pwc_weight(self) -> Tensor:
        weight = self.pwc.weight
        return weight * self.pwc_mask.to(weight.dtype) if self.pwc_mask is not None else weight

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            if self.deploy_form == "dense":
                return self.fused_conv(x)
            return self.gwc(x) + self.pwc(self._pwc_input(x))
        grouped = self.gwc(x)
        pointwise = F.conv2d(
            self._pwc_input(x),
            self._pwc_weight(),
            self.pwc.bias,
            stride=self.stride,
            padding=self.pwc_padding,
        )
        if self.use_bn:
            grouped, pointwise = self.gwc_bn(grouped), self.pwc_bn(pointwise)
        return grouped + pointwise

    def _branch_kernels(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """BN-folded (kernel, bias) of the groupwise and the (masked) pointwise branch."""
        gwc = conv_bn_kernel(self.gwc, self.gwc_bn if self.use_bn else None)
        pwc_kernel, pwc_bias = conv_bn_kernel(self.pwc, self.pwc_bn if self.use_bn else None)
        if self.pwc_mask is not None:
            pwc_kernel = pwc_kernel * self.pwc_mask.to(pwc_kernel.dtype)
        return gwc, (pwc_kernel, pwc_bias)

    def _reparameterize(self) -> None:
        form, self.fuse_detail = (
            choose_form(self) if self.fuse_mode == "auto" else (self.fuse_mode, "")
        )
        (gwc_kernel, gwc_bias), (pwc_kernel, pwc_bias) = self._branch_kernels()
        shared = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        if form == "dense":
            size = (self.kernel_size, self.kernel_size)
            kernel, bias = add_branches(
                (grouped_to_dense(gwc_kernel, self.p), gwc_bias),
                (centre_kernel(pwc_kernel, size), pwc_bias),
            )
            self.fused_conv = make_conv(kernel, bias, **shared)
            del self.gwc, self.pwc
            self.fuse_detail = self.fuse_detail or f"fused to dense {self._k} (fuse_mode='dense')"
        else:
            self.gwc = make_conv(gwc_kernel, gwc_bias + pwc_bias, groups=self.p, **shared)
            self.pwc = make_conv(pwc_kernel, None, stride=self.stride, padding=self.pwc_padding)
            self.fuse_detail = self.fuse_detail or "kept 2 convs, BN folded (fuse_mode='separate')"
        if self.use_bn:
            del self.gwc_bn, self.pwc_bn
        self.pwc_mask = None  # folded into the kernels
        self.deploy_form = form

    @property
    def _k(self) -> str:
        return f"{self.kernel_size}x{self.kernel_size}"

    def mac_ratio(self) -> tuple[float, float]:
        """Multiply-adds per output pixel, in units of Cin·Cout: (dense KxK, two convs)."""
        k2 = self.kernel_size**2
        return float(k2), k2 / self.p + 1.0

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, p={self.p}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"exact={self.exact}, fuse_mode={self.fuse_mode!r}, deploy={self.deploy}"
            + (f", deploy_form={self.deploy_form!r}" if self.deploy else "")
        )


def choose_form(block: HetConv, *, measure: bool = True) -> tuple[str, str]:
    """Pick the deploy form of ``block`` for ``fuse_mode="auto"``: ("dense" | "separate", why).

    1. If the dense KxK needs no more multiply-adds than the two convs (p = 1), fuse.
    2. Else, if ``measure`` and the layer is small enough for a trial on a square input of
       ≥ 8 pixels a side within 1e7 multiply-adds, time both forms (random weights of the
       deploy shapes, on the block's device and dtype; a warm-up, then up to 3 interleaved
       runs each within about 30 ms, best of each) and fuse if the dense conv is more than
       10% faster: at small sizes launch overheads and grouped-conv kernels decide, which
       a MAC count cannot see; within the noise, the fewer multiply-adds win.
    3. Else keep the two convs (they need fewer multiply-adds).

    The timed result can differ between machines and runs; force ``fuse_mode`` for a
    reproducible deploy form.
    """
    dense, separate = block.mac_ratio()
    k = block._k
    if dense <= separate:
        return "dense", f"fused to dense {k}: {dense:.1f} vs {separate:.2f} MACs per Cin·Cout"
    model_note = f"dense {k} costs {dense:.1f} vs {separate:.2f} MACs per Cin·Cout"
    if measure:
        timed = _time_forms(block)
        if timed is not None:
            t_dense, t_separate, size = timed
            form = "dense" if t_dense < DENSE_MARGIN * t_separate else "separate"
            verdict = f"fused to dense {k}" if form == "dense" else "kept 2 convs"
            return form, (
                f"{verdict}: measured {t_dense * 1e3:.3f} ms dense vs "
                f"{t_separate * 1e3:.3f} ms separate on {size}x{size} ({model_note})"
            )
    return "separate", f"kept 2 convs: {model_note} (cost model)"


def _time_forms(block: HetConv) -> tuple[float, float, int] | None:
    """Best-of-N seconds of (dense, separate) on a small input, or None if not cheap."""
    weight = block.gwc.weight
    device, dtype = weight.device, weight.dtype
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return None
    dense_macs_per_pixel = block.kernel_size**2 * block.in_channels * block.out_channels
    size = math.isqrt(int(TRIAL_MACS / dense_macs_per_pixel)) * block.stride
    size = min(size, 64)
    if size < MIN_TRIAL_SIZE:
        return None
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    cin, cout, kk = block.in_channels, block.out_channels, block.kernel_size
    x = rand(1, cin, size, size)
    conv = dict(stride=block.stride, padding=block.padding, dilation=block.dilation)
    w_dense, w_group, w_point = (
        rand(cout, cin, kk, kk),
        rand(cout, cin // block.p, kk, kk),
        rand(cout, cin, 1, 1),
    )
    bias = rand(cout)
    point_input = block._pwc_input(x)

    def run_dense() -> Tensor:
        return F.conv2d(x, w_dense, bias, **conv)

    def run_separate() -> Tensor:
        return F.conv2d(x, w_group, bias, groups=block.p, **conv) + F.conv2d(
            point_input, w_point, None, stride=block.stride, padding=block.pwc_padding
        )

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    deadline = time.perf_counter() + TRIAL_SECONDS
    dense_times, separate_times = [], []
    with torch.no_grad():
        timed(run_dense), timed(run_separate)  # warm-up: kernel selection, allocations
        for _ in range(TRIAL_RUNS):  # interleaved, so drifting load hits both forms alike
            if time.perf_counter() > deadline:
                break
            dense_times.append(timed(run_dense))
            separate_times.append(timed(run_separate))
    if not dense_times:
        return None
    return min(dense_times), min(separate_times), size
