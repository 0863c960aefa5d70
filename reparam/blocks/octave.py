"""Octave convolution (Chen et al., ICCV 2019): a high- and a low-frequency feature map.

A feature map is split into a high-resolution part X_h (H×W, (1 − α)·C channels) and a
low-resolution part X_l (α·C channels, half the size). With f the (stride 1, size-preserving)
convolutions of the four paths, pool a 2x2 average pooling and up a nearest ×2 upsampling:

    stride 1:  Y_h = f_hh(X_h) + up(f_lh(X_l))        Y_l = f_ll(X_l) + f_hl(pool(X_h))
    stride 2:  Y_h = f_hh(pool X_h) + f_lh(X_l)       Y_l = f_ll(pool X_l) + f_hl(pool pool X_h)

as in the authors' code (facebookresearch/OctConv) and its PyTorch ports: stride 2 pools the
inputs, and the low-to-high path then needs no upsampling. ``alpha_in=0`` is a first layer
(one input tensor, no l2h/l2l), ``alpha_out=0`` a last layer (one output tensor, no h2l/l2l).

Odd sizes are handled exactly: the low-resolution size is ceil(H/2) × ceil(W/2) — pooling
averages the 1 or 2 pixels of an edge window (``ceil_mode=True``), and upsampling crops its
2·ceil(H/2) rows to H. A low input of any other size is refused with a ValueError.

The paths mix two resolutions, so the block cannot become one conv.
Deploy form: BNs folded into each path, and — at stride 1, where both read X_l — l2h and l2l
merged into one conv ``l2x`` whose output is split (per group, so grouped convs merge too).
A BN after a sum distributes over it: BN_h(h2h + up(l2h)) = h2h·s + up(l2h·s) + (β − μ·s),
s = γ/σ, so h2h gets the full fold and l2h the scale alone (likewise bn_l over h2l and l2l).
At stride 2, l2h reads X_l and l2l reads pool(X_l), so they stay two convs.

State-dict keys: h2h, h2l, l2h, l2l (only the paths the alphas need), plus bn_h, bn_l in
:class:`OctaveConvBN`; deployed, ``l2x`` replaces l2h and l2l at stride 1. The layout of
https://github.com/d-li14/octconv.pytorch (``conv_h2h`` … ``conv_l2l``, and ``Conv_BN``'s
``conv.conv_h2h`` … with ``bn_h``/``bn_l``) loads as well: its keys are renamed on load.

Groups: by default every path's conv has ``groups`` groups. d-li14/octconv.pytorch splits
them between the two resolutions instead: h2h gets ⌈g − α_in·g⌉ and l2l ⌈α_in·g⌉ groups,
h2l and l2h keep g. ``groups_convention="d-li14"`` builds that layout (where l2h and l2l
then differ in groups they are not merged in the deploy form).

Depthwise: under ``groups_convention="d-li14"`` a conv with groups == in_channels is their
``is_dw`` mode (the depthwise layers of their oct-MobileNets): no cross paths, each
resolution filtered on its own,

    Y_h = f_hh(X_h) (pool X_h at stride 2),     Y_l = f_ll(X_l) (pool X_l at stride 2),

with h2h and l2l grouped as above (⌈g − α_in·g⌉ and ⌈α_in·g⌉: one group per channel).
Their forward returns the low input's path only when the low part exists on both sides, so
the depthwise mode needs ``alpha_out == alpha_in``. Deployed, each path absorbs its own BN
(full fold: nothing else joins its sum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from reparam.blocks.base import ReparamBlock
from reparam.errors import BlockConfigError, FusionError
from reparam.fusion import fold_batchnorm
from reparam.module_fusion import check_foldable, conv_bn_kernel, make_conv

__all__ = ["GROUPS_CONVENTIONS", "OctaveConv", "OctaveConvBN"]

GROUPS_CONVENTIONS = ("same", "d-li14")
_PATHS = ("h2h", "h2l", "l2h", "l2l")

OctaveInput = Tensor | tuple[Tensor, Tensor] | list[Tensor]
OctaveOutput = Tensor | tuple[Tensor, Tensor]
Kernel = tuple[Tensor, Tensor | None]


def _downsample(x: Tensor) -> Tensor:
    """2x2 average pooling to ceil(H/2) × ceil(W/2): edge windows average their valid pixels."""
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def _upsample(x: Tensor, like: Tensor) -> Tensor:
    """Nearest ×2 upsampling cropped to the size of ``like`` (2·ceil(H/2) − H ∈ {0, 1})."""
    height, width = like.shape[-2:]
    return F.interpolate(x, scale_factor=2.0, mode="nearest")[..., :height, :width]


def _split_channels(channels: int, alpha: float, name: str, what: str) -> tuple[int, int]:
    if not 0 <= alpha < 1:
        raise BlockConfigError(f"{name} must be in [0, 1), got {alpha}")
    low = int(alpha * channels)
    if alpha > 0 and low == 0:
        raise BlockConfigError(
            f"{name}={alpha} of {what}={channels} gives no low-frequency channel; use {name}=0"
        )
    return channels - low, low


def _interleave(first: Tensor, second: Tensor, groups: int) -> Tensor:
    """Concatenate two grouped convs' output channels group by group: [a₀ b₀ a₁ b₁ …]."""
    pairs = (first.unflatten(0, (groups, -1)), second.unflatten(0, (groups, -1)))
    return torch.cat(pairs, 1).flatten(0, 1)


class OctaveConv(ReparamBlock):
    """Octave convolution: h2h, h2l, l2h, l2l conv paths between two resolutions.

    Args:
        in_channels, out_channels: total channels (high + low).
        kernel_size: odd kernel size of every path (int or pair).
        alpha_in, alpha_out: the low-frequency fraction of the input / output channels, in
            [0, 1); 0 means a single tensor on that side.
        stride: 1 or 2 (2 average-pools the inputs; every conv runs at stride 1).
        padding: None, or dilation·(kernel_size//2): every path must keep its size.
        dilation, groups: of every path's conv (each path's channels divisible by groups).
        bias: give every path's conv a bias.
        deploy: build the deploy form directly (l2x instead of l2h and l2l at stride 1).
        groups_convention: ``"same"`` (every path has ``groups``) or ``"d-li14"`` (h2h
            ⌈g − α_in·g⌉, l2l ⌈α_in·g⌉, h2l and l2h g groups, as d-li14/octconv.pytorch).

    Input: a tensor (``alpha_in=0``) or a (high, low) pair, low being ceil(H/2) × ceil(W/2).
    Output: a tensor (``alpha_out=0``) or a (high, low) pair.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        alpha_in: float = 0.5,
        alpha_out: float = 0.5,
        stride: int = 1,
        padding: int | Sequence[int] | None = None,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        deploy: bool = False,
        groups_convention: str = "same",
    ) -> None:
        super().__init__()
        if groups_convention not in GROUPS_CONVENTIONS:
            raise BlockConfigError(
                f"groups_convention must be one of {GROUPS_CONVENTIONS}, got {groups_convention!r}"
            )
        self.groups_convention = groups_convention
        kernel, dilation = _pair(kernel_size), _pair(dilation)
        if any(k < 1 or k % 2 == 0 for k in kernel):
            raise BlockConfigError(
                f"OctaveConv needs odd kernel sizes (size-preserving paths), got {kernel}"
            )
        same = tuple(d * (k // 2) for d, k in zip(dilation, kernel, strict=True))
        padding = same if padding is None else _pair(padding)
        if padding != same:
            raise BlockConfigError(
                f"OctaveConv's paths must keep their input size (the high-resolution map must "
                f"stay twice the low one): padding must be dilation*(kernel_size//2) = {same}, "
                f"got {padding}"
            )
        if stride not in (1, 2):
            raise BlockConfigError(f"OctaveConv supports stride 1 or 2, got {stride}")
        self.in_h, self.in_l = _split_channels(in_channels, alpha_in, "alpha_in", "in_channels")
        self.out_h, self.out_l = _split_channels(
            out_channels, alpha_out, "alpha_out", "out_channels"
        )
        self.alpha_in, self.groups = alpha_in, groups
        # d-li14's `is_dw`: a depthwise octave conv has no cross paths (their oct-MobileNets).
        self.depthwise = groups_convention == "d-li14" and groups == in_channels and groups > 1
        if self.depthwise and alpha_in != alpha_out:
            raise BlockConfigError(
                f"a depthwise d-li14 OctaveConv (groups == in_channels == {groups}) has no "
                f"cross paths, so alpha_out must equal alpha_in ({alpha_in}), got {alpha_out}"
            )
        for path, (cin, cout) in self._path_channels().items():
            path_groups = self._path_groups(path)
            if cin % path_groups or cout % path_groups:
                raise BlockConfigError(
                    f"OctaveConv path {path} has {cin} input and {cout} output channels, "
                    f"not both divisible by groups ({path_groups})"
                )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.alpha_in, self.alpha_out = kernel, alpha_in, alpha_out
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.use_bias = groups, bias
        self.deploy = deploy
        if deploy and self._merges_low:
            self.h2h = self._conv(self.in_h, self.out_h, self._path_groups("h2h"))
            self.h2l = self._conv(self.in_h, self.out_l, self._path_groups("h2l"))
            self.l2x = self._conv(self.in_l, self.out_h + self.out_l, self._path_groups("l2h"))
            return
        for path, (cin, cout) in self._path_channels().items():
            setattr(self, path, self._conv(cin, cout, self._path_groups(path)))

    def _path_groups(self, path: str) -> int:
        """Groups of a path's conv under :attr:`groups_convention`."""
        if self.groups_convention == "same" or path in ("h2l", "l2h"):
            return self.groups
        low = math.ceil(self.alpha_in * self.groups)
        return low if path == "l2l" else math.ceil(self.groups - self.alpha_in * self.groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # d-li14/octconv.pytorch names the paths conv_h2h … conv_l2l: rename to ours.
        for path in _PATHS:
            theirs = f"{prefix}conv_{path}."
            for key in [k for k in state_dict if k.startswith(theirs)]:
                state_dict[f"{prefix}{path}.{key[len(theirs) :]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _path_channels(self) -> dict[str, tuple[int, int]]:
        """(input, output) channels of the paths the alphas need, in h2h, h2l, l2h, l2l order."""
        paths = {"h2h": (self.in_h, self.out_h), "h2l": (self.in_h, self.out_l)}
        paths |= {"l2h": (self.in_l, self.out_h), "l2l": (self.in_l, self.out_l)}
        cross = ("h2l", "l2h") if self.depthwise else ()
        return {
            name: channels
            for name, channels in paths.items()
            if min(channels) > 0 and name not in cross
        }

    @property
    def _merges_low(self) -> bool:
        """Whether the deploy form merges l2h and l2l (both exist and read the same X_l)."""
        if self.depthwise:
            return False
        same_groups = self._path_groups("l2h") == self._path_groups("l2l")
        return self.stride == 1 and self.in_l > 0 and self.out_l > 0 and same_groups

    def _conv(self, cin: int, cout: int, groups: int) -> nn.Conv2d:
        return nn.Conv2d(
            cin,
            cout,
            self.kernel_size,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=self.use_bias,
        )

    def _split_inputs(self, x: OctaveInput) -> tuple[Tensor, Tensor | None]:
        if self.in_l == 0:
            if isinstance(x, tuple | list):
                if len(x) != 2 or x[1] is not None:
                    raise TypeError(
                        "OctaveConv with alpha_in=0 takes one tensor (or a (tensor, None) pair)"
                    )
                x = x[0]
            return x, None
        if not isinstance(x, tuple | list) or len(x) != 2:
            raise TypeError(
                f"OctaveConv with alpha_in={self.alpha_in} takes a (high, low) pair of "
                f"tensors, got {type(x).__name__}"
            )
        x_h, x_l = x
        if not isinstance(x_h, torch.fx.Proxy) and not torch.jit.is_tracing():
            expected = tuple((size + 1) // 2 for size in x_h.shape[-2:])
            if tuple(x_l.shape[-2:]) != expected:
                raise ValueError(
                    f"OctaveConv: the low-frequency input must be ceil(H/2) x ceil(W/2) of the "
                    f"high-frequency input: high {tuple(x_h.shape[-2:])} needs low {expected}, "
                    f"got {tuple(x_l.shape[-2:])}"
                )
        return x_h, x_l

    def _low_paths(self, x_l: Tensor) -> tuple[Tensor, Tensor | None]:
        """Outputs of l2h (on X_l) and l2l (on X_l, or pool(X_l) at stride 2)."""
        if self.deploy and self._merges_low:
            groups = self._path_groups("l2h")
            merged = self.l2x(x_l).unflatten(1, (groups, -1))
            split = self.out_h // groups
            return merged[:, :, :split].flatten(1, 2), merged[:, :, split:].flatten(1, 2)
        to_high = self.l2h(x_l)
        if self.out_l == 0:
            return to_high, None
        return to_high, self.l2l(_downsample(x_l) if self.stride == 2 else x_l)

    def forward(self, x: OctaveInput) -> OctaveOutput:
        x_h, x_l = self._split_inputs(x)
        if self.stride == 2:
            x_h = _downsample(x_h)
        y_h = self.h2h(x_h)
        if self.depthwise:  # no cross paths: each resolution on its own
            if x_l is None:
                return y_h
            return y_h, self.l2l(_downsample(x_l) if self.stride == 2 else x_l)
        y_l = self.h2l(_downsample(x_h)) if self.out_l else None
        if x_l is not None:
            to_high, to_low = self._low_paths(x_l)
            y_h = y_h + (_upsample(to_high, y_h) if self.stride == 1 else to_high)
            if y_l is not None:
                y_l = y_l + to_low
        return y_h if y_l is None else (y_h, y_l)

    def _training_kernels(self) -> dict[str, Kernel]:
        return {
            name: (getattr(self, name).weight.detach(), _detached(getattr(self, name).bias))
            for name in self._path_channels()
        }

    def _install(self, kernels: dict[str, Kernel]) -> None:
        """Replace the training convs by deploy convs holding ``kernels`` (per path)."""
        shared = dict(padding=self.padding, dilation=self.dilation)
        if self._merges_low:
            groups = self._path_groups("l2h")
            (high_k, high_b), (low_k, low_b) = kernels.pop("l2h"), kernels.pop("l2l")
            bias = _interleave(high_b, low_b, groups) if high_b is not None else None
            self.l2x = make_conv(_interleave(high_k, low_k, groups), bias, groups=groups, **shared)
            del self.l2h, self.l2l
        for name, (kernel, bias) in kernels.items():
            setattr(self, name, make_conv(kernel, bias, groups=self._path_groups(name), **shared))

    def _reparameterize(self) -> None:
        self._install(self._training_kernels())
        self.fuse_detail = "merged l2h+l2l into l2x" if self._merges_low else ""

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"alpha_in={self.alpha_in}, alpha_out={self.alpha_out}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, deploy={self.deploy}"
            + (f", groups_convention={self.groups_convention!r}" if self.groups != 1 else "")
        )


def _detached(tensor: Tensor | None) -> Tensor | None:
    return tensor.detach() if tensor is not None else None


def _scale_only(kernel: Tensor, bias: Tensor | None, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Fold only the BN's scale γ/σ: the path joins a sum whose other term takes μ and β."""
    return fold_batchnorm(
        kernel,
        bias,
        torch.zeros_like(bn.running_mean),
        bn.running_var,
        bn.eps,
        bn.weight.detach() if bn.affine else None,
        None,
    )


class OctaveConvBN(ReparamBlock):
    """:class:`OctaveConv` → BatchNorm per output resolution (bn_h, bn_l) → optional activation.

    Args:
        in_channels … bias: as for :class:`OctaveConv`.
        activation: None, an ``nn.Module`` class (instantiated with no arguments) or instance,
            applied to both outputs.
        deploy: build the deploy form directly: a deployed OctaveConv with biases, no BNs.
        groups_convention: as for :class:`OctaveConv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        alpha_in: float = 0.5,
        alpha_out: float = 0.5,
        stride: int = 1,
        padding: int | Sequence[int] | None = None,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        activation: Callable[[], nn.Module] | nn.Module | None = None,
        deploy: bool = False,
        groups_convention: str = "same",
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv = OctaveConv(
            in_channels,
            out_channels,
            kernel_size,
            alpha_in,
            alpha_out,
            stride,
            padding,
            dilation,
            groups,
            bias=bias or deploy,
            deploy=deploy,
            groups_convention=groups_convention,
        )
        if not deploy:
            self.bn_h = nn.BatchNorm2d(self.conv.out_h)
            self.bn_l = nn.BatchNorm2d(self.conv.out_l) if self.conv.out_l else None
        if activation is None:
            self.act = nn.Identity()
        elif isinstance(activation, nn.Module):
            self.act = activation
        else:
            self.act = activation()

    def forward(self, x: OctaveInput) -> OctaveOutput:
        y = self.conv(x)
        if self.conv.out_l == 0:
            return self.act(y if self.deploy else self.bn_h(y))
        y_h, y_l = y
        if not self.deploy:
            y_h, y_l = self.bn_h(y_h), self.bn_l(y_l)
        return self.act(y_h), self.act(y_l)

    def _reparameterize(self) -> None:
        conv = self.conv
        if conv.deploy:
            raise FusionError(
                "the inner OctaveConv was deployed before bn_h/bn_l were folded into it: "
                "fuse the OctaveConvBN (or the whole model) instead"
            )
        check_foldable(self.bn_h, "bn_h")
        if self.bn_l is not None:
            check_foldable(self.bn_l, "bn_l")
        kernels: dict[str, Kernel] = {}
        for name, (kernel, bias) in conv._training_kernels().items():
            bn = self.bn_h if name.endswith("2h") else self.bn_l
            if name in ("h2h", "h2l") or conv.depthwise:  # this path carries μ and β of its sum
                kernels[name] = conv_bn_kernel(getattr(conv, name), bn)
            else:
                kernels[name] = _scale_only(kernel, bias, bn)
        conv._install(kernels)
        conv.use_bias, conv.deploy = True, True
        del self.bn_h, self.bn_l
        merged = " and merged l2h+l2l into l2x" if conv._merges_low else ""
        self.fuse_detail = f"folded bn_h/bn_l into every path{merged}"

    def extra_repr(self) -> str:
        return f"deploy={self.deploy}"
