"""The YOLO family's reparameterized blocks: layouts reparam adopts.

- YOLOv6 ``QARepVGGBlock`` (https://github.com/meituan/YOLOv6, ``yolov6/layers/common.py``):
  rbr_dense (conv + bn), rbr_1x1 (a bare Conv2d), rbr_identity (``nn.Identity``), bn (after
  the sum), nonlinearity → :class:`~reparam.blocks.qarepvgg.QARepVGGBlock`. YOLOv6's plain
  ``RepVGGBlock`` has RepVGG's own layout and is adopted by it.
- YOLOv7 ``RepConv`` (https://github.com/WongKinYiu/yolov7, ``models/common.py``):
  rbr_dense and rbr_1x1 as ``nn.Sequential(Conv2d, BatchNorm2d)`` (keys ``.0``/``.1``),
  rbr_identity (a BatchNorm2d or None), act (SiLU by default)
  → :class:`~reparam.blocks.RepVGGBlock` with the keys renamed and ``act`` as nonlinearity.
- ultralytics ``RepConv`` (https://github.com/ultralytics/ultralytics,
  ``ultralytics/nn/modules/conv.py``): conv1 (KxK ``Conv``: conv + bn + Identity act), conv2
  (the 1x1 ``Conv``), bn (the identity BatchNorm, None unless ``bn=True``), act
  → :class:`~reparam.blocks.RepVGGBlock` (``use_identity`` as the copy has it).

All share ``rbr_dense``/``rbr_1x1`` or common names (``conv1``, ``bn``, ``act``), so each
layout's ``accepts`` checks the submodule types that tell it apart.
"""

from __future__ import annotations

from torch import nn

from reparam.adopt.parts import (
    Layout,
    activation_of,
    child,
    geometry,
    has_se,
    kxk_probes,
)
from reparam.errors import FusionError

__all__ = ["YOLO_LAYOUTS"]


def _check_1x1(conv: nn.Conv2d, dense: dict[str, int], name: str) -> None:
    """The 1x1 branch must share the dense conv's channels, stride and groups."""
    one = geometry(conv, name)
    same = ("in_channels", "out_channels", "stride", "groups")
    if one["kernel_size"] != 1 or any(one[key] != dense[key] for key in same):
        raise FusionError(f"{name} is not a 1x1 conv with the dense conv's channels and stride")


# --------------------------------------------------------------------------- YOLOv6


def _is_qarepvgg(foreign: nn.Module) -> bool:
    return isinstance(foreign.rbr_1x1, nn.Conv2d) and isinstance(foreign.bn, nn.BatchNorm2d)


def _build_qarepvgg(foreign: nn.Module) -> nn.Module:
    from reparam.blocks.qarepvgg import QARepVGGBlock

    dense = geometry(child(foreign, "rbr_dense.conv", nn.Conv2d), "rbr_dense.conv")
    _check_1x1(child(foreign, "rbr_1x1", nn.Conv2d), dense, "rbr_1x1")
    if has_se(foreign):
        raise FusionError("it has an SE (YOLOv6's QARepVGGBlock has none; reparam's neither)")
    block = QARepVGGBlock(**dense, bias_1x1=foreign.rbr_1x1.bias is not None)
    if (getattr(foreign, "rbr_identity", None) is None) != (block.rbr_identity is None):
        raise FusionError("its identity branch does not follow the shapes (in == out, stride 1)")
    act = activation_of(foreign, "nonlinearity")
    if act is not None:
        block.nonlinearity = act
    return block


# --------------------------------------------------------------------------- YOLOv7


def _is_yolov7(foreign: nn.Module) -> bool:
    return all(
        isinstance(branch, nn.Sequential)
        and len(branch) == 2
        and isinstance(branch[0], nn.Conv2d)
        and isinstance(branch[1], nn.BatchNorm2d)
        for branch in (foreign.rbr_dense, foreign.rbr_1x1)
    )


def _repvgg(foreign: nn.Module, dense_path: str, identity: bool, act_name: str) -> nn.Module:
    from reparam.blocks.repvgg import RepVGGBlock

    dense = geometry(child(foreign, dense_path, nn.Conv2d), dense_path)
    block = RepVGGBlock(**dense, use_identity=identity)
    act = activation_of(foreign, act_name)
    block.nonlinearity = act if act is not None else nn.Identity()
    return block


def _build_yolov7(foreign: nn.Module) -> nn.Module:
    identity = getattr(foreign, "rbr_identity", None) is not None
    return _repvgg(foreign, "rbr_dense.0", identity, "act")


# --------------------------------------------------------------------------- ultralytics


def _is_ultralytics(foreign: nn.Module) -> bool:
    def conv_bn(module: nn.Module, kernel: int | None) -> bool:
        conv = getattr(module, "conv", None)
        return (
            isinstance(conv, nn.Conv2d)
            and isinstance(getattr(module, "bn", None), nn.BatchNorm2d)
            and isinstance(getattr(module, "act", nn.Identity()), nn.Identity)
            and (kernel is None or tuple(conv.kernel_size) == (kernel, kernel))
        )

    bn = foreign.bn
    return (
        conv_bn(foreign.conv1, None)
        and conv_bn(foreign.conv2, 1)
        and (bn is None or isinstance(bn, nn.BatchNorm2d))
    )


def _build_ultralytics(foreign: nn.Module) -> nn.Module:
    return _repvgg(foreign, "conv1.conv", foreign.bn is not None, "act")


YOLO_LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "YOLOv6 QARepVGGBlock",
        "QARepVGGBlock",
        ("rbr_dense", "rbr_1x1", "bn"),
        _build_qarepvgg,
        kxk_probes("rbr_dense.conv"),
        accepts=_is_qarepvgg,
    ),
    Layout(
        "YOLOv7 RepConv",
        "RepVGGBlock",
        ("rbr_dense", "rbr_1x1", "act"),
        _build_yolov7,
        kxk_probes("rbr_dense.0"),
        renames=(
            ("rbr_dense.conv", "rbr_dense.0"),
            ("rbr_dense.bn", "rbr_dense.1"),
            ("rbr_1x1.conv", "rbr_1x1.0"),
            ("rbr_1x1.bn", "rbr_1x1.1"),
        ),
        accepts=_is_yolov7,
    ),
    Layout(
        "ultralytics RepConv",
        "RepVGGBlock",
        ("conv1", "conv2", "bn", "act"),
        _build_ultralytics,
        kxk_probes("conv1.conv"),
        renames=(("rbr_dense", "conv1"), ("rbr_1x1", "conv2"), ("rbr_identity", "bn")),
        accepts=_is_ultralytics,
    ),
)
