"""QARepVGGBlock (YOLOv6's layout): exact fuse incl. the post-sum BN, YOLOv6 deploy
checkpoints, ONNX export (issue 22 item 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam.blocks.qarepvgg import QARepVGGBlock
from reparam.errors import BlockConfigError
from reparam.testing import randomize_batchnorm


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


CONFIGS = [
    dict(in_channels=8, out_channels=8),
    dict(in_channels=8, out_channels=16, stride=2),
    dict(in_channels=8, out_channels=8, groups=4),
    dict(in_channels=8, out_channels=8, groups=8),
    dict(in_channels=8, out_channels=8, kernel_size=5, padding=1),
    dict(in_channels=8, out_channels=8, dilation=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
def test_fuses_into_one_conv_exactly(config, dtype, rtol):
    torch.manual_seed(0)
    block = randomize_batchnorm(QARepVGGBlock(**config), seed=1).to(dtype).eval()
    x = 3 * torch.randn(2, 8, 13, 10, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = block(x)
        fused = reparam.fuse(block)
        assert _relative(expected, fused(x)) <= rtol
    assert [type(m) for m in fused.modules() if not isinstance(m, (nn.ReLU, nn.Identity))] == [
        QARepVGGBlock,
        nn.Conv2d,
    ]


def test_layout_has_yolov6_keys_and_no_identity_or_1x1_bn():
    keys = set(QARepVGGBlock(8, 8).state_dict())
    assert "rbr_1x1.weight" in keys and "rbr_dense.conv.weight" in keys
    assert {k for k in keys if k.startswith("bn.")} >= {"bn.weight", "bn.running_var"}
    assert not any(k.startswith(("rbr_identity", "rbr_1x1.bn")) for k in keys)
    assert QARepVGGBlock(8, 16, stride=2).rbr_identity is None


def test_yolov6_deploy_checkpoint_with_its_kept_bn_loads_folded():
    """YOLOv6's switch_to_deploy keeps the post-sum BN after rbr_reparam (for QAT)."""
    torch.manual_seed(0)
    trained = randomize_batchnorm(QARepVGGBlock(8, 8), seed=3).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected = trained(x)
    kernel, bias = _yolov6_deploy_state(trained)
    state = {"rbr_reparam.weight": kernel, "rbr_reparam.bias": bias}
    state |= {f"bn.{k}": v for k, v in trained.bn.state_dict().items()}
    deployed = QARepVGGBlock(8, 8, deploy=True).eval()
    deployed.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert _relative(expected, deployed(x)) <= 1e-5


def _yolov6_deploy_state(block: QARepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfolded kernel/bias YOLOv6 writes to rbr_reparam (BN_post kept apart)."""
    from reparam.fusion import centre_kernel, identity_kernel
    from reparam.module_fusion import conv_bn_kernel

    kernel, bias = conv_bn_kernel(block.rbr_dense.conv, block.rbr_dense.bn)
    kernel = kernel + centre_kernel(block.rbr_1x1.weight.detach(), (3, 3))
    return kernel + identity_kernel(8, 3), bias


def test_training_step_reaches_every_branch():
    torch.manual_seed(0)
    block = QARepVGGBlock(8, 8).train()
    block(torch.randn(2, 8, 10, 10)).square().mean().backward()
    for name in ("rbr_dense.conv.weight", "rbr_1x1.weight", "bn.weight"):
        grad = block.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_even_kernel_is_refused_in_one_line():
    with pytest.raises(BlockConfigError, match="odd kernel_size"):
        QARepVGGBlock(8, 8, kernel_size=2)


def test_exports_to_onnx_and_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), QARepVGGBlock(8, 8), QARepVGGBlock(8, 16, stride=2)
    )
    model = randomize_batchnorm(model, seed=5).eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "qarepvgg.onnx"
    reparam.export_onnx(model, path, (x,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert _relative(expected, torch.from_numpy(got)) <= 1e-5
