"""The main job end to end: train with training-time blocks, fuse, export, verify, run.

On scikit-learn's bundled 8x8 digits (1,797 images, no download): train
:class:`~reparam.models.digits.DigitsNet` (ACBlock, RepVGG, DRConv, DBB, MobileOne) for a few
epochs, fuse it, check the fused model predicts exactly what the trained one does, export
ONNX with both Corr modes, verify each graph under onnxruntime against the training-time
model, measure onnxruntime's accuracy on the test split, and quantize the standard graph to
INT8 (calibrated on the training images) and measure it the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from reparam.compare import compare_outputs
from reparam.convert import fuse_with_report
from reparam.errors import UserInputError, printable
from reparam.models import create_model
from reparam.summary import model_stats

__all__ = ["DemoResult", "StageResult", "load_digits_split", "run_demo"]

TEST_FRACTION = 0.2
DEMO_FILES = ("digits_net-standard.onnx", "digits_net-custom.onnx", "digits_net-int8.onnx")
"""What the demo writes into its output folder."""

Progress = Callable[[int], AbstractContextManager[Callable[[str], object]]]


@dataclass
class StageResult:
    """One row of the demo's summary."""

    stage: str
    accuracy: float | None
    agreement: str = ""
    check: str = ""
    seconds: float = 0.0
    ok: bool = True


@dataclass
class DemoResult:
    stages: list[StageResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(stage.ok for stage in self.stages)


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) float tensors in [0, 1], split 80/20 by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserInputError(
            "the demo's data set ships with scikit-learn: pip install 'reparam[demo]'"
        ) from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(len(labels) * (1 - TEST_FRACTION))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(count, generator=generator)
    yield from order.split(batch_size)


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    seed: int,
    progress: Progress | None = None,
    batch_size: int = 64,
) -> None:
    """A few epochs of AdamW with cross-entropy, in training mode (BN batch statistics).

    ``progress(epochs)`` gives a context whose ``advance(detail)`` is called after each
    epoch with the epoch's mean loss: a bar that moves per epoch on a terminal, a line per
    epoch in a log.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    model.train()
    with progress(epochs) if progress else nullcontext(None) as advance:
        for _ in range(epochs):
            total, batches = 0.0, 0
            for index in _batches(len(labels), batch_size, generator):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images[index]), labels[index])
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, batches = total + loss.item(), batches + 1
            if advance is not None:
                advance(f"loss {total / max(batches, 1):.3f}")
    model.eval()


def _accuracy(logits: np.ndarray | Tensor, labels: Tensor) -> float:
    predictions = torch.as_tensor(np.asarray(logits)).argmax(1)
    return (predictions == labels).float().mean().item()


def run_demo(
    output_dir: Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
    announce: Callable[[str], object] | None = None,
) -> DemoResult:
    """Train, fuse, export (both Corr modes), verify and run; see the module docstring.

    ``progress(epochs)`` gives the training progress (see :func:`train`); ``announce(line)``
    is called as each later stage starts (a status line on a terminal, a log line when piped).
    """
    say = announce or (lambda line: None)
    from reparam.export import export_onnx, verify_onnx
    from reparam.runtime import load as load_onnx_model

    if not output_dir.is_dir():
        raise UserInputError(f"output directory '{printable(output_dir)}' does not exist")
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = create_model("digits_net")
    result = DemoResult()

    start = time.perf_counter()
    train(model, x_train, y_train, epochs=epochs, seed=seed, progress=progress)
    with torch.no_grad():
        reference = model(x_test)
    result.stages.append(
        StageResult(
            "training-time model (torch, eval)",
            _accuracy(reference, y_test),
            check=f"{model_stats(model).parameters:,} params, "
            f"{model_stats(model).conv_layers} convs",
            seconds=time.perf_counter() - start,
        )
    )

    say("fusing the trained model")
    start = time.perf_counter()
    fused, report = fuse_with_report(model)
    with torch.no_grad():
        fused_logits = fused(x_test)
    diff = compare_outputs(reference, fused_logits)[0]
    same = (fused_logits.argmax(1) == reference.argmax(1)).sum().item()
    after = model_stats(fused)
    result.stages.append(
        StageResult(
            "fused (torch)",
            _accuracy(fused_logits, y_test),
            agreement=f"{same}/{len(y_test)} same predictions",
            check=f"max rel {diff.max_rel:.1e}; {after.parameters:,} params, "
            f"{after.conv_layers} convs, {after.batchnorms} BN",
            seconds=time.perf_counter() - start,
            ok=same == len(y_test) and diff.max_rel <= 1e-4,
        )
    )
    fused_blocks = ", ".join(f"{count} {kind}" for kind, count in sorted(report.blocks.items()))
    result.notes.append(f"fused: {fused_blocks}")

    for corr in ("standard", "custom"):
        path = output_dir / f"digits_net-{corr}.onnx"  # DEMO_FILES
        label = f"ONNX, Corr {corr} (onnxruntime)"
        say(f"exporting ONNX with Corr {corr}, verifying and running it")
        start = time.perf_counter()
        try:
            exported = export_onnx(model, path, x_test[:2], corr=corr, source="digits_net")
            verified = verify_onnx(model, path, batch_sizes=(1, 4, 32))
            session = load_onnx_model(path)
            logits = next(iter(session.run(x_test.numpy()).values()))
        except UserInputError as error:
            if corr == "custom" and "onnxruntime-extensions" in str(error):
                result.notes.append(f"Corr custom skipped: {error}")
                continue
            raise
        ort_diff = compare_outputs(reference, torch.from_numpy(logits))[0]
        same = (torch.from_numpy(logits).argmax(1) == reference.argmax(1)).sum().item()
        worst = max(d.max_rel for d in verified.worst())
        result.stages.append(
            StageResult(
                label,
                _accuracy(logits, y_test),
                agreement=f"{same}/{len(y_test)} same predictions",
                check=f"verify {'ok' if verified.ok else 'FAILED'} (max rel {worst:.1e}, "
                f"batches {verified.batch_sizes}); {exported.node_total} nodes"
                + (f", custom {', '.join(exported.custom_ops)}" if exported.custom_ops else ""),
                seconds=time.perf_counter() - start,
                ok=verified.ok and same == len(y_test) and ort_diff.max_rel <= 1e-4,
            )
        )
        result.files.append(path)
    say("quantizing to INT8 (calibrated on the training images)")
    _int8_stage(result, output_dir, x_train, x_test, y_test, reference)
    return result


def _int8_stage(
    result: DemoResult,
    output_dir: Path,
    x_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    reference: Tensor,
) -> None:
    """Quantize the standard-Corr graph to INT8, calibrated on the training images.

    Targets: cosine to the fp32 graph ≥ 0.99 on the test images (the stage fails below it)
    and, for the fully trained model, test accuracy within one point of the trained model's.
    """
    from reparam.quantize import quantize_onnx
    from reparam.runtime import load as load_onnx_model

    source = output_dir / DEMO_FILES[0]
    if not source.is_file():
        return
    start = time.perf_counter()
    # A scratch file of its own (never a user's file that happens to share a name).
    handle, name = tempfile.mkstemp(prefix=".calibration-", suffix=".npy", dir=output_dir)
    os.close(handle)
    calibration = Path(name)
    path = output_dir / DEMO_FILES[2]
    try:
        np.save(calibration, x_train.numpy())
        report = quantize_onnx(source, path, calibration=calibration, batch_sizes=(1, 32))
    finally:
        calibration.unlink(missing_ok=True)  # a scratch file, not a demo output
    fp32 = next(iter(load_onnx_model(source).run(x_test.numpy()).values()))
    int8 = next(iter(load_onnx_model(path).run(x_test.numpy()).values()))
    diff = compare_outputs(torch.from_numpy(fp32), torch.from_numpy(int8))[0]
    same = (torch.from_numpy(int8).argmax(1) == torch.from_numpy(fp32).argmax(1)).sum().item()
    accuracy, trained = _accuracy(int8, y_test), _accuracy(reference, y_test)
    result.stages.append(
        StageResult(
            "ONNX INT8 (onnxruntime)",
            accuracy,
            agreement=f"{same}/{len(y_test)} same as fp32",
            check=f"cosine {diff.cosine:.4f} to fp32, accuracy {100 * (accuracy - trained):+.1f} "
            f"points; {report.fp32_bytes / 1024:.0f} -> "
            f"{report.int8_bytes / 1024:.0f} KiB; batch 32 {report.speedup(32):.2f}x fp32",
            seconds=time.perf_counter() - start,
            # The stage checks quantization, not training: a barely trained model (one epoch)
            # has near-tied class scores, so its accuracy moves with any noise.
            ok=diff.cosine >= 0.99,
        )
    )
    result.notes.append(
        "INT8: static QDQ, per-channel weights, calibrated on the training images; "
        + "; ".join(report.notes[-1:])
    )
    result.files.append(path)
