"""Expand a trained plain network into training-time blocks, fine-tune, fuse back, quantize.

On scikit-learn's bundled 8x8 digits (no download):

1. train a plain Conv-BN-ReLU network;
2. fine-tune copies of it for the same number of epochs: the plain network itself, and the
   network expanded (``reparam.expansion.expand``) into DBB, RepVGG and QARepVGG blocks
   (exact at step 0: each starts as the trained plain network);
3. fuse each back (``reparam.fuse``) and check it has the plain architecture again;
4. export ONNX, quantize to INT8 (static QDQ, calibrated on the training images) and print
   the fp32 and INT8 test accuracy of each in one table.

python examples/expand_finetune.py            # under a minute (one thread: the convs are tiny)
python examples/expand_finetune.py --fast     # one epoch each, for the tests
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import reparam
from reparam._table import format_table
from reparam.demo import load_digits_split
from reparam.expansion import expand_with_report
from reparam.runtime import load as load_onnx

FAMILIES = ("dbb", "repvgg", "qarepvgg")
HEADER = ("model", "train params", "fused params", "fp32 acc", "INT8 acc", "INT8 - fp32")


def plain_net(width: int = 16) -> nn.Sequential:
    """Conv-BN-ReLU ×4 (one stride 2), global pool, linear: the network to expand."""

    def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    return nn.Sequential(
        *conv_bn(1, width),
        *conv_bn(width, width),
        *conv_bn(width, 2 * width, stride=2),
        *conv_bn(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def train(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, seed: int) -> None:
    """AdamW with a cosine schedule, batches of 64, cross-entropy, training mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = max(1, epochs * ((len(labels) + 63) // 64))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def accuracy(logits: Tensor | np.ndarray, labels: Tensor) -> float:
    return (torch.as_tensor(np.asarray(logits)).argmax(1) == labels).float().mean().item()


def structure(model: nn.Module) -> list[tuple]:
    return [
        (name, type(m).__name__, *(tuple(p.shape) for p in m.parameters(recurse=False)))
        for name, m in model.named_modules()
    ]


def run(epochs: int, pretrain_epochs: int, seed: int, folder: Path) -> list[tuple]:
    """The table's rows: (model, train params, fused params, fp32 acc, INT8 acc, drop)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    calibration = folder / "calibration.npy"
    np.save(calibration, x_train.numpy())
    base = plain_net()
    train(base, x_train, y_train, pretrain_epochs, seed)
    plain_fused = reparam.fuse(base)
    rows = []
    for family in ("plain", *FAMILIES):
        if family == "plain":
            model = copy.deepcopy(base)
        else:
            model, report = expand_with_report(base, family)
            assert len(report.expanded) == 4, report.summary()
            with torch.no_grad():  # exact at step 0: the expanded network is the trained one
                torch.testing.assert_close(model.eval()(x_test), base(x_test))
        train_params = sum(p.numel() for p in model.parameters())
        torch.manual_seed(seed + 1)  # every fine-tune sees the same batches
        train(model, x_train, y_train, epochs, seed + 1)
        fused = reparam.fuse(model)
        if structure(fused) != structure(plain_fused):
            raise AssertionError(f"{family}: the fused network is not the plain architecture")
        with torch.no_grad():
            reference = model(x_test)
            fp32 = fused(x_test)
        torch.testing.assert_close(fp32, reference, rtol=1e-4, atol=1e-4)
        onnx_path, int8_path = folder / f"{family}.onnx", folder / f"{family}-int8.onnx"
        reparam.export_onnx(fused, onnx_path, x_test[:2], source=f"digits {family}")
        reparam.quantize_onnx(onnx_path, int8_path, calibration=calibration, batch_sizes=(1,))
        int8 = next(iter(load_onnx(int8_path).run(x_test.numpy()).values()))
        fp32_acc, int8_acc = accuracy(fp32, y_test), accuracy(int8, y_test)
        rows.append(
            (
                family,
                f"{train_params:,}",
                f"{sum(p.numel() for p in fused.parameters()):,}",
                f"{100 * fp32_acc:.2f}%",
                f"{100 * int8_acc:.2f}%",
                f"{100 * (int8_acc - fp32_acc):+.2f} pt",
            )
        )
    return rows


def main(fast: bool = False, epochs: int = 6, pretrain_epochs: int = 10, seed: int = 0) -> None:
    """Run and print the table; ``fast``: one epoch of each training (for the tests)."""
    if fast:
        epochs, pretrain_epochs = 1, 1
    # 8x8 images through 16-32 channels: handing such small convs to a second thread costs
    # more than it saves (the whole run took 2-3x longer on two threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory() as folder:
            rows = run(epochs, pretrain_epochs, seed, Path(folder))
    finally:
        torch.set_num_threads(threads)
    print(
        f"digits, plain network trained {pretrain_epochs} epochs, then each row fine-tuned "
        f"{epochs} epochs; accuracy of the fused network on the test split"
    )
    print(format_table(list(HEADER), rows))
    print(f"({time.perf_counter() - start:.0f} s, {time.process_time() - cpu:.0f} s CPU)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one epoch each, for tests")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (each)")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="plain training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.fast, args.epochs, args.pretrain_epochs, args.seed)
