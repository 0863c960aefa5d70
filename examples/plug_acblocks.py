"""Plug ACBlocks into an existing network, train a little, fuse, export ONNX, verify.

python examples/plug_acblocks.py            # ResNet-18 at 64x64, a few steps
python examples/plug_acblocks.py --fast     # tiny network, for the test suite
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import reparam
from reparam.export import export_onnx, verify_onnx
from reparam.insert import convert_to_acblocks
from reparam.models import create_model
from reparam.models.resnet import ResNet


def main(fast: bool = False) -> None:
    torch.manual_seed(0)
    size = 32 if fast else 64
    if fast:  # one stage of 16 channels: the same steps, in a second
        model = ResNet(layers=(1,), widths=(16,), num_classes=10, imagenet_stem=False)
    else:  # any network with Conv→BN pairs; here a plain ResNet-18
        model = create_model("resnet18", num_classes=10)

    # 1. Every odd KxK Conv→BN pair becomes an ACBlock; outputs are unchanged at insertion.
    acnet, converted = convert_to_acblocks(model)
    print(f"converted {converted} Conv-BN pairs to ACBlocks")

    # 2. Train a few steps on random data (your training loop goes here).
    optimizer = torch.optim.SGD(acnet.parameters(), lr=0.01, momentum=0.9)
    acnet.train()
    for _ in range(2 if fast else 10):
        images, labels = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(acnet(images), labels).backward()
        optimizer.step()
    acnet.eval()

    # 3. Fuse, export and verify the ONNX graph against the training-time network.
    fused = reparam.fuse(acnet)
    example = torch.randn(1, 3, size, size)
    torch.testing.assert_close(fused(example), acnet(example), rtol=1e-4, atol=1e-4)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "acnet.onnx"
        export_onnx(acnet, path, example)
        report = verify_onnx(acnet, path)
        assert report.ok, report.failure_summary()
        print(f"ONNX verified at batch sizes {report.batch_sizes}: OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes, for tests")
    main(parser.parse_args().fast)
