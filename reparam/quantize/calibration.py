"""Calibration inputs: reading, checking, splitting and feeding them to onnxruntime.

:func:`load_calibration` reads an .npy (one input), an .npz (one array per input name) or a
folder of them, never unpickling, and checks dtype, rank, sizes and finiteness against the
graph's inputs; without a source it draws random normal inputs with a warning.
:func:`split_samples` holds out a fifth of the samples (at least :data:`MIN_HELD_OUT`) for the
accuracy check, and :func:`calibration_reader` wraps the rest as onnxruntime's
``CalibrationDataReader``.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reparam.errors import UserInputError, printable, summarize

RANDOM_SAMPLES = 32
MIN_HELD_OUT = 4  # below 2·this samples, accuracy is measured on the calibration samples
CALIBRATION_BATCH = 16
# |x| beyond this is no image or feature a network is calibrated on: activations would
# overflow float32 scales (1e300 in float64 becomes inf; 1e30 breaks onnxruntime's scales).
MAX_CALIBRATION_MAGNITUDE = 1e15
RANDOM_WARNING = (
    "no calibration data: calibrating on random normal inputs, which is only good for smoke "
    "tests (activation ranges, hence the INT8 model's accuracy, depend on real data); pass "
    "--calibration with a few hundred real inputs"
)


@dataclass
class CalibrationData:
    """Named float32 input arrays, all with the same number of samples (axis 0)."""

    arrays: dict[str, np.ndarray]
    source: str

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, index: slice | np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.arrays.items()}


def calibration_files(path: Path) -> list[Path]:
    """The .npy/.npz files a calibration path names: itself, or a folder's files.

    A FIFO (``-c <(make_samples)``) is read like a file: it exists, it is just not seekable.

    Raises:
        UserInputError: it does not exist, is of the wrong kind, or a folder holds none.
    """
    shown = printable(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserInputError(f"calibration data '{shown}' does not exist") from None
    except OSError as error:
        raise UserInputError(f"cannot read calibration data '{shown}': {error.strerror}") from None
    if stat.S_ISDIR(mode):
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
        if not files:
            raise UserInputError(f"calibration folder '{shown}' has no .npy or .npz files")
        return files
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise UserInputError(
            f"calibration data '{shown}' is not a file or a folder: give an .npy or .npz file "
            "or a folder of them"
        )
    if path.suffix not in (".npy", ".npz"):
        raise UserInputError(f"calibration data '{shown}' must be an .npy or .npz file or a folder")
    return [path]


def _open_array_file(path: Path) -> Any:
    """A seekable source for np.load: the path, or a FIFO's bytes read into memory."""
    if stat.S_ISFIFO(path.stat().st_mode):
        with open(path, "rb") as stream:
            return io.BytesIO(stream.read())
    return path


def _read_array_file(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One .npy (a single-input model) or .npz (arrays by input name) → arrays by name."""
    try:
        loaded = np.load(_open_array_file(path), allow_pickle=False)  # never unpickle
        if isinstance(loaded, np.ndarray):
            contents = {"": loaded}
        else:
            with loaded:
                contents = {key: loaded[key] for key in loaded.files}
    except ValueError as error:  # object arrays need pickle
        raise UserInputError(f"calibration file '{path}' is not a numeric array: {error}") from None
    except Exception as error:  # OSError, EOFError, zipfile.BadZipFile, corrupt members
        raise UserInputError(
            f"calibration file '{path}' is not a readable .npy/.npz: {summarize(error)}"
        ) from None
    if len(contents) == 1 and len(input_names) == 1:
        return {input_names[0]: next(iter(contents.values()))}
    missing = [name for name in input_names if name not in contents]
    if missing:
        found = ", ".join(sorted(k for k in contents if k)) or "one unnamed array"
        raise UserInputError(
            f"calibration file '{path}' has {found}; the model's inputs are "
            f"{', '.join(input_names)}: use an .npz with one array per input name"
        )
    return {name: contents[name] for name in input_names}


def load_calibration(
    source: str | os.PathLike | CalibrationData | None,
    inputs: Sequence[Any],
    *,
    random_shapes: Sequence[tuple[int, ...]] | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration inputs from an .npy/.npz file or a folder of them, checked.

    Args:
        source: the file or folder; ``None`` draws random normal inputs (with a warning);
            data already read (e.g. from a FIFO, which reads once) is checked again against
            these inputs.
        inputs: the graph's inputs (:class:`reparam.runtime.TensorSpec`).
        random_shapes: per-input shapes of one sample (batch axis included, size 1) for
            random data.

    Raises:
        UserInputError: missing file, empty folder, non-numeric data, wrong rank or size.
    """
    names = [spec.name for spec in inputs]
    if source is None:
        warnings.warn(RANDOM_WARNING, UserWarning, stacklevel=3)
        rng = np.random.default_rng(seed)
        shapes = random_shapes or [(1, *spec.shape[1:]) for spec in inputs]
        return CalibrationData(
            {
                name: rng.standard_normal((RANDOM_SAMPLES, *shape[1:])).astype(np.float32)
                for name, shape in zip(names, shapes, strict=True)
            },
            "random normal (smoke test only)",
        )
    if isinstance(source, CalibrationData):
        missing = [printable(name) for name in names if name not in source.arrays]
        if missing:
            raise UserInputError(f"calibration data has no input {', '.join(missing)}")
        where = Path(source.source)
        return CalibrationData(
            {
                spec.name: _check_calibration_array(source.arrays[spec.name], spec, where)
                for spec in inputs
            },
            source.source,
        )
    path = Path(source)
    files = calibration_files(path)
    parts = [_read_array_file(file, names) for file in files]
    arrays = {}
    for spec in inputs:
        checked = [
            _check_calibration_array(part[spec.name], spec, f)
            for part, f in zip(parts, files, strict=True)
        ]
        if len({array.shape[1:] for array in checked}) > 1:
            found = sorted({str(array.shape[1:]) for array in checked})
            raise UserInputError(
                f"calibration input '{printable(spec.name)}' has samples of different shapes "
                f"across the files of '{printable(path)}' ({', '.join(found)}): give one shape"
            )
        arrays[spec.name] = np.concatenate(checked) if len(checked) > 1 else checked[0]
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise UserInputError(f"calibration inputs have different sample counts: {counts}")
    if next(iter(counts.values())) == 0:
        raise UserInputError(f"calibration data '{path}' has no samples")
    return CalibrationData(arrays, f"{path} ({len(files)} file{'s' * (len(files) > 1)})")


def _check_calibration_array(array: np.ndarray, spec: Any, file: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(
            f"calibration input '{spec.name}' in '{file}' has dtype {array.dtype}; the model "
            f"takes {np.dtype(spec.dtype).name} (give floating-point data)"
        )
    if array.ndim != len(spec.shape):
        raise UserInputError(
            f"calibration input '{spec.name}' in '{file}' has shape {array.shape}; the model "
            f"takes rank {len(spec.shape)} ({spec.describe()}), samples along axis 0"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if axis and isinstance(want, int) and want > 0 and want != got:
            raise UserInputError(
                f"calibration input '{spec.name}' in '{file}' has shape {array.shape}; the "
                f"model takes {spec.describe()}"
            )
    if not np.isfinite(array).all():
        raise UserInputError(f"calibration input '{spec.name}' in '{file}' holds NaN or inf")
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > MAX_CALIBRATION_MAGNITUDE:
        # Beyond float32 the cast gives inf; far below it the quantizer's scales overflow
        # (onnxruntime's "AssertionError: scale issue").
        raise UserInputError(
            f"calibration input '{printable(spec.name)}' in '{printable(file)}' holds values "
            f"up to {largest:.3g} in magnitude; INT8 calibration needs the model's real "
            f"inputs (at most {MAX_CALIBRATION_MAGNITUDE:.0e})"
        )
    return np.ascontiguousarray(array, dtype=spec.dtype)


def calibration_reader(data: dict[str, np.ndarray], batch: int | None) -> Any:
    """An onnxruntime CalibrationDataReader over ``data`` in batches (fixed ``batch`` if set)."""
    from onnxruntime.quantization import CalibrationDataReader  # heavy: imported on use

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = self._iterate()

        def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
            count = len(next(iter(data.values())))
            step = batch or CALIBRATION_BATCH
            for start in range(0, count - (count % step if batch else 0), step):
                yield {name: array[start : start + step] for name, array in data.items()}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

        def rewind(self) -> None:
            self.batches = self._iterate()

    return Reader()


def split_samples(count: int, fixed_batch: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Indices to calibrate on and to hold out for the accuracy check (a fifth, ≥ 4)."""
    notes = []
    order = np.arange(count)
    held = max(MIN_HELD_OUT, count // 5)
    if fixed_batch:
        held = max(fixed_batch, held - held % fixed_batch)
    if count - held < max(held, fixed_batch or 1):
        notes.append(
            f"only {count} calibration samples: accuracy is measured on the calibration "
            "samples themselves (optimistic); give more data to hold some out"
        )
        usable = count - count % fixed_batch if fixed_batch else count
        return order[:count], order[:usable], notes
    return order[: count - held], order[count - held :], notes
