"""ExecuTorch (the optional extra ``reparam[executorch]``): a ``.pte`` lowered to XNNPACK.

:func:`export_executorch` fuses the model (a copy), exports it with ``torch.export`` (Corr in
its standard-op form, so the program holds aten operators only), lowers every supported
subgraph to the XNNPACK delegate (``to_edge_transform_and_lower`` with the
``XnnpackPartitioner``), and checks the program in ExecuTorch's own Python runtime before the
file is written: at the example's batch and, with a dynamic batch, at batch 1 and at the
largest batch the program was planned for.

Dynamic batch. ExecuTorch plans memory for an upper bound of every symbolic size, so the
batch axis gets one (``max_batch``). Measured with executorch 1.5.1: after XNNPACK lowering
the planned bound is at most 15 whatever the ``Dim`` maximum (64 and 256 gave 15), so the
bound actually planned is read back from the program (:func:`planned_batch`) and
:class:`ExecuTorchModel` refuses a larger batch with one line instead of ExecuTorch's
"Attempted to resize a bounded tensor" log.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam.errors import ExportError, ReparamError, UserInputError, printable, summarize

__all__ = [
    "CHECK_RTOL",
    "EXTRA",
    "ExecuTorchModel",
    "export_executorch",
    "planned_batch",
    "require_executorch",
]

EXTRA = 'pip install "reparam[executorch]"'
CHECK_RTOL = 1e-4
DEFAULT_MAX_BATCH = 64


def require_executorch() -> Any:
    """The ``executorch`` package, or one line naming the extra to install.

    Raises:
        RuntimeNotInstalledError: executorch is not importable.
    """
    from reparam.runtime.openvino import RuntimeNotInstalledError

    # torchao (an executorch dependency) logs a warning per prebuilt kernel library it
    # cannot load on this machine (CUDA-only ones): noise before reparam's own lines.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # torchao registers an Enum with torch's pytree at import, which torch logs as deprecated
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    try:
        with warnings.catch_warnings():  # its dependencies' deprecation notices at import
            warnings.simplefilter("ignore")
            pytree_log.setLevel(logging.ERROR)
            import executorch
            from executorch import runtime  # noqa: F401  (the part reparam needs)
    except ImportError:
        raise RuntimeNotInstalledError(f"ExecuTorch is not installed: {EXTRA}") from None
    finally:
        pytree_log.setLevel(level)
    return executorch


@contextlib.contextmanager
def native_logs_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: ExecuTorch's C++ runtime logs to stderr on its
    own (CPU probing lines at start, a line per failed kernel) before reparam's one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _one_line(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return printable(f"{type(error).__name__}: {first[0] if first else ''}", 300)


class ExecuTorchModel:
    """A ``.pte`` program loaded into ExecuTorch's Python runtime.

    ``run(*tensors)`` returns the outputs as a list of tensors; ``max_batch`` is the batch
    the program's memory was planned for (None when its batch is static).
    """

    def __init__(self, source: str | os.PathLike | bytes) -> None:
        require_executorch()
        from executorch.runtime import Runtime

        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.size = len(data)
        # ExecuTorch's program points into these bytes without owning them: they must live
        # as long as the program (freed, the next run reads freed memory and crashes)
        self._data = data
        try:
            with warnings.catch_warnings(), native_logs_silenced():
                warnings.simplefilter("ignore")
                self._program = Runtime.get().load_program(data)
                self.method = self._program.load_method("forward")
        except Exception as error:  # ExecuTorch raises RuntimeError with a code
            raise UserInputError(
                f"ExecuTorch cannot load the program: {_one_line(error)}"
            ) from None
        self.planned = planned_batch(self.method)

    def run(self, *tensors: Tensor) -> list[Tensor]:
        """Run ``forward``; a batch beyond the planned one is refused with one line.

        Raises:
            UserInputError: a batch too large, or ExecuTorch fails on the inputs.
        """
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
        if self.planned is not None and batch is not None and batch > self.planned:
            raise UserInputError(
                f"batch {batch} is larger than the {self.planned} the ExecuTorch program's "
                "memory was planned for: run it in chunks, or export with a static batch"
            )
        try:
            outputs = self.method.execute(list(tensors))
        except Exception as error:
            raise UserInputError(f"ExecuTorch failed: {_one_line(error)}") from None
        return [o.clone() for o in outputs]


def planned_batch(method: Any) -> int | None:
    """Axis 0 of the first input as planned in the program (its upper bound)."""
    try:
        sizes = method.metadata.input_tensor_meta(0).sizes()
    except Exception:  # no inputs, or an older metadata API
        return None
    return int(sizes[0]) if sizes else None


def export_executorch(
    model: nn.Module,
    example_inputs: tuple,
    output: str | os.PathLike,
    *,
    dynamic_batch: bool,
    fuse: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> None:
    """Write ``model`` as an ExecuTorch program lowered to XNNPACK, checked before writing.

    Args:
        model: the training-time (fused here) or already fused model.
        example_inputs: positional tensors of ``forward``.
        output: the ``.pte`` file (written atomically after the check).
        dynamic_batch: make axis 0 of every input symbolic (1 to the planned bound).
        fuse: fuse blocks and Conv→BN pairs first.
        max_batch: the batch upper bound asked of ExecuTorch's memory planning.

    Raises:
        RuntimeNotInstalledError: executorch is not installed.
        UserInputError: a bad path or inputs.
        ExportError: torch.export or the lowering fails (one line), or the program differs
            from the model by more than ``CHECK_RTOL`` relative.
    """
    from reparam._io import atomic_write, prepare_output
    from reparam.convert import fuse_with_report
    from reparam.ops.corr import corr_mode

    path = Path(output)
    if path.suffix.lower() != ".pte":
        raise UserInputError(f"output file '{printable(path)}' should end in .pte")
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise UserInputError("example_inputs must be a tuple of tensors for ExecuTorch")
    prepare_output(path)
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program_model = (
        fuse_with_report(model, example_inputs=inputs)[0] if fuse else copy.deepcopy(model)
    ).eval()
    # torch.export specialises a size-1 axis to the constant 1: trace a batch of two.
    traced = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
        dynamic_shapes = tuple({0: batch} if t.dim() else None for t in traced)
    try:
        # torch and ExecuTorch deprecation/experimental notices: not the user's concern
        with corr_mode("standard"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(
                program_model, traced if dynamic_batch else inputs, dynamic_shapes=dynamic_shapes
            )
            lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            buffer = lowered.to_executorch().buffer
    except ReparamError:
        raise
    except Exception as error:
        raise ExportError(f"ExecuTorch export failed: {_one_line(error)}") from None
    _check(ExecuTorchModel(buffer), program_model, inputs, dynamic_batch)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer))


def _check(
    program: ExecuTorchModel, model: nn.Module, inputs: Sequence[Tensor], dynamic_batch: bool
) -> None:
    """The program against the model at the example's batch, 1 and the planned bound."""
    from reparam.compare import compare_outputs

    batches = {inputs[0].shape[0]}
    if dynamic_batch and program.planned is not None:
        batches |= {1, program.planned}
    generator = torch.Generator().manual_seed(0)
    for batch in sorted(batches):
        if batch == inputs[0].shape[0]:
            case = list(inputs)
        else:
            case = [torch.randn(batch, *t.shape[1:], generator=generator) for t in inputs]
        with torch.no_grad():
            want = model(*case)
        try:
            with native_logs_silenced():
                got = program.run(*case)
            diffs = compare_outputs(want, got)
        except (UserInputError, ValueError) as error:
            hint = (
                "; ExecuTorch kept a size of the traced batch: export with a static batch"
                if dynamic_batch
                else ""
            )
            raise ExportError(
                f"the ExecuTorch program fails at batch {batch}: {summarize(error)}{hint}"
            ) from None
        worst = max(d.max_rel for d in diffs)
        if not worst <= CHECK_RTOL:
            raise ExportError(
                f"the ExecuTorch program differs from the model at batch {batch} "
                f"(max relative error {worst:.3g} > {CHECK_RTOL:g}); nothing was written"
            )
