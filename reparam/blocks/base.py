"""The protocol every reparam block follows, and the fuser that serves all of them.

A block is built in its training form (several branches, BatchNorms) or, with
``deploy=True``, directly in its deploy form, so that fused checkpoints load with strict
keys. ``switch_to_deploy()`` converts the training form in place and deletes the branches;
calling it again does nothing. ``reparameterize()`` is the same method under the name timm
and MobileOne use (https://github.com/huggingface/pytorch-image-models, byobnet.py).

A block that fuses into one KxK conv implements :meth:`ReparamBlock._fold_branches` and sets
``deploy_conv_name`` and ``branch_names``; the base class then provides
``get_equivalent_kernel_bias`` (always folded in float32 or wider, rounded to the weights'
dtype once) and the conversion. Blocks that fuse into something else (two convs, several
paths) override ``_reparameterize`` instead.

Shared construction helpers: :func:`check_branch_geometry`, :func:`resolve_padding`,
:func:`conv_bn_branch` and :func:`crop_border`. Bad constructor arguments raise
:class:`~reparam.errors.BlockConfigError`.
"""

from __future__ import annotations

import copy
import itertools
from typing import ClassVar

import torch
from torch import Tensor, nn

from reparam.errors import BlockConfigError, UserInputError
from reparam.fusers import FuseOutcome, register_fuser
from reparam.module_fusion import make_conv

__all__ = [
    "ReparamBlock",
    "check_branch_geometry",
    "conv_bn_branch",
    "crop_border",
    "refuse_other_form",
    "resolve_padding",
]


def check_branch_geometry(
    block: str, in_channels: int, out_channels: int, kernel_size: int, groups: int, why: str
) -> None:
    """Refuse what no KxK multi-branch block can fuse: an even kernel (no centre tap for the
    smaller branches to align on, ``why`` says which) or channels not divisible by groups."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise BlockConfigError(f"{block} needs an odd kernel_size ({why}), got {kernel_size}")
    if groups < 1:
        raise BlockConfigError(f"{block}: groups must be >= 1, got {groups}")
    if in_channels % groups or out_channels % groups:
        raise BlockConfigError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
            f"divisible by groups ({groups})"
        )


def resolve_padding(padding: int | None, kernel_size: int, dilation: int) -> int:
    """The KxK conv's padding: ``dilation·(K//2)`` ("same" at stride 1) when None."""
    padding = dilation * (kernel_size // 2) if padding is None else padding
    if padding < 0:
        raise BlockConfigError(f"padding must be >= 0, got {padding}")
    return padding


def conv_bn_branch(
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], **conv_args
) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm, named ``conv`` and ``bn`` as RepVGG, DBB and
    MobileOne name their branches (so their published state-dict keys load)."""
    branch = nn.Sequential()
    branch.add_module(
        "conv", nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **conv_args)
    )
    branch.add_module("bn", nn.BatchNorm2d(out_channels))
    return branch


def crop_border(x: Tensor, pixels: int) -> Tensor:
    """Drop ``pixels`` rows and columns on every side of an NCHW tensor.

    A smaller branch whose aligned padding would be negative (the block's padding is below
    d·(K//2)) reads the cropped input instead, which is what the padding would mean.
    """
    return x[:, :, pixels:-pixels, pixels:-pixels] if pixels > 0 else x


def refuse_other_form(
    block: ReparamBlock, state_dict: dict, prefix: str, deploy_name: str, branch_names, flag: str
) -> None:
    """Raise UserInputError when ``state_dict`` holds the other form of ``block``.

    A training-form block given ``<deploy_name>.*`` keys (a fused checkpoint), or a deploy
    block given branch keys, would otherwise fail with dozens of missing/unexpected keys;
    this names the form and what to do instead.
    """
    name = type(block).__name__

    def has(part: str) -> bool:
        return any(key.startswith(f"{prefix}{part}.") for key in state_dict)

    where = f" at '{prefix[:-1]}'" if prefix else ""
    if not block.deploy and has(deploy_name):
        raise UserInputError(
            f"{name}{where} is in training form but the state dict is its deploy form "
            f"({prefix}{deploy_name}.*): build it with {flag}=True, or fuse it first "
            "(reparam.fuse or switch_to_deploy()) and then load"
        )
    if block.deploy and any(has(branch) for branch in branch_names):
        raise UserInputError(
            f"{name}{where} is in deploy form but the state dict is its training form "
            f"({', '.join(branch_names)}): build it with {flag}=False, load, then fuse"
        )


class ReparamBlock(nn.Module):
    """Base class of the blocks in :mod:`reparam.blocks`.

    Subclasses set ``self.deploy`` in ``__init__``. Single-conv blocks implement
    :meth:`_fold_branches` and name their deploy conv (``deploy_conv_name``) and training
    submodules (``branch_names``); others override :meth:`_reparameterize`, which builds
    the deploy form from the training branches (eval-mode semantics: BN running statistics)
    and deletes the branches. They may set ``self.fuse_detail`` to say what they chose, for
    the fuse report.
    """

    deploy: bool = False
    fuse_detail: str = ""
    deploy_conv_name: ClassVar[str | None] = None
    branch_names: ClassVar[tuple[str, ...]] = ()
    deploy_flag: ClassVar[str] = "deploy"  # the constructor argument that builds the deploy form
    repr_fields: ClassVar[tuple[str, ...]] = (
        "stride",
        "padding",
        "dilation",
        "groups",
        "deploy",
    )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.deploy_conv_name is not None:
            refuse_other_form(
                self, state_dict, prefix, self.deploy_conv_name, self.branch_names,
                self.deploy_flag,
            )  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fold_branches(self) -> tuple[Tensor, Tensor]:
        """``(kernel, bias)`` of the deploy conv from the training branches of ``self``.

        Called by :meth:`get_equivalent_kernel_bias` on a float32 (or wider) copy, so
        implementations never think about low-precision rounding.
        """
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The fused ``(kernel, bias)``: W = Σ_branches W_b', b = Σ b_b', in the weights' dtype.

        Every branch is folded in float32 (or the weights' own wider dtype) and the sum is
        rounded to the weights' dtype once, so bfloat16/float16 blocks are not rounded twice.
        """
        if self.deploy:
            conv = getattr(self, self._deploy_conv_attribute())
            return conv.weight.detach(), conv.bias.detach()
        dtype = self.parameter_dtype()
        kernel, bias = self._float32_source(dtype)._fold_branches()
        return kernel.to(dtype), bias.to(dtype)

    def parameter_dtype(self) -> torch.dtype:
        """The dtype of the block's first floating-point parameter or buffer (float32 if
        none): a BN-only branch may hold no parameter (``affine=False``)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def _deploy_conv_attribute(self) -> str:
        if self.deploy_conv_name is None:
            raise NotImplementedError(f"{type(self).__name__} does not fuse into one conv")
        return self.deploy_conv_name

    def _reparameterize(self) -> None:
        kernel, bias = self.get_equivalent_kernel_bias()
        setattr(self, self._deploy_conv_attribute(), self._deploy_conv(kernel, bias))
        for name in self.branch_names:
            if hasattr(self, name):
                delattr(self, name)

    def switch_to_deploy(self) -> None:
        """Convert to the deploy form in place; a no-op when already deployed."""
        if self.deploy:
            return
        with torch.no_grad():
            self._reparameterize()
        self.deploy = True

    def reparameterize(self) -> None:
        """Alias of :meth:`switch_to_deploy` (the timm / MobileOne name)."""
        self.switch_to_deploy()

    def _float32_source(self, dtype: torch.dtype) -> ReparamBlock:
        """The block to read branch parameters from when folding: itself, or for bfloat16 /
        float16 weights a float32 copy, so every branch is folded in float32 and the sum is
        rounded to ``dtype`` once."""
        if torch.promote_types(dtype, torch.float32) == dtype:
            return self
        return copy.deepcopy(self).float()

    def _deploy_conv(self, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
        """The single conv of the deploy form, with the block's own conv geometry
        (its ``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode``)."""
        return make_conv(
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=getattr(self, "padding_mode", "zeros"),
        )

    def extra_repr(self) -> str:
        """``in, out, kernel_size=K, stride=…, …`` from the attributes the block has."""
        head = [
            str(getattr(self, name))
            for name in ("in_channels", "out_channels")
            if hasattr(self, name)
        ]
        fields = ("kernel_size", *self.repr_fields)
        head += [f"{name}={getattr(self, name)}" for name in fields if hasattr(self, name)]
        return ", ".join(head)


@register_fuser(ReparamBlock)
def _fuse_reparam_block(block: ReparamBlock) -> FuseOutcome | None:
    if block.deploy:
        return None
    block.switch_to_deploy()
    return FuseOutcome(block, block.fuse_detail)
