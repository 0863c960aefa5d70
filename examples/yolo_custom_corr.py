"""Export the YOLOv5-style ASFF/DRConv detector with the custom Corr op and run it in onnxruntime.

The custom ``com.reparam::Corr`` node needs onnxruntime-extensions
(``pip install 'reparam[custom-ops]'``); ``reparam.runtime`` registers it automatically.

    python examples/yolo_custom_corr.py [--fast]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from reparam import runtime
from reparam.export import export_onnx, verify_onnx
from reparam.models import create_model
from reparam.testing import randomize_batchnorm


def main(fast: bool = False) -> None:
    torch.manual_seed(0)
    size = 64 if fast else 256
    model = randomize_batchnorm(create_model("yolo_asff_tiny", width=8 if fast else 16)).eval()
    example = torch.randn(2, 3, size, size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "yolo.onnx"
        report = export_onnx(model, path, example, corr="custom", source="yolo_asff_tiny")
        print(f"exported {report.node_total} nodes; custom ops: {report.custom_ops}")
        assert report.custom_ops, "expected a com.reparam::Corr node"
        verified = verify_onnx(model, path, batch_sizes=(1, 2))
        assert verified.ok, verified.failure_summary()
        session = runtime.load(path)
        images = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
        outputs = session.run(images)
        for name, value in outputs.items():
            print(f"{name}: {value.shape}")
        assert [v.shape[-1] for v in outputs.values()] == [size // 8, size // 16, size // 32]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes, for tests")
    main(parser.parse_args().fast)
