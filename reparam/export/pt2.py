"""A self-contained ``torch.export`` program (``.pt2``) of the fused model.

The file holds the graph and the weights; ``torch.export.load`` rebuilds it in a process that
has torch alone (no reparam, no user code), which the fused checkpoint cannot offer (it
needs the model's factory). DRConv's per-sample correlation is traced in its standard-op form
(:func:`reparam.ops.corr.corr_standard`: one-hot depthwise conv, then a batched matmul), so
the program holds only aten operators, never ``reparam::corr``. The batch axis is symbolic.
After writing, the file is loaded back and run at the example's batch and another one, and
compared with the model; a mismatch refuses the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from reparam._io import atomic_write, prepare_output
from reparam.compare import compare_outputs
from reparam.errors import ExportError, ReparamError, UserInputError

__all__ = ["export_pt2"]

CHECK_RTOL = 1e-4


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    dynamic_batch: bool = True,
    fuse: bool = True,
) -> Path:
    """Fuse ``model`` (a copy) and save it as a ``torch.export`` program at ``path``.

    Args:
        model: the model in training form (fused here) or already fused.
        path: the ``.pt2`` file; written atomically, only after the check passes.
        example_inputs: one tensor or a sequence of tensors, one per model input.
        dynamic_batch: make axis 0 of every input symbolic.
        fuse: fuse blocks and Conv→BN pairs first.

    Returns:
        ``path``.

    Raises:
        UserInputError: bad path or inputs.
        ExportError: torch.export fails, or the loaded program differs from the model.
    """
    from reparam.convert import fuse as fuse_model
    from reparam.ops.corr import corr_mode

    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise UserInputError(f"output file '{path}' should end in .pt2")
    target = prepare_output(path)
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise UserInputError("example_inputs must be a tensor or a sequence of tensors")
    program_model = fuse_model(model) if fuse else copy.deepcopy(model).eval()
    # torch.export specialises a size-1 axis to the constant 1: trace a batch of two.
    traced = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes: tuple | None = tuple({0: batch} for _ in traced)
    else:
        traced, dynamic_shapes = inputs, None
    try:
        # Standard ops for Corr: the program must not need reparam's custom op to load.
        with corr_mode("standard"), torch.no_grad():
            program = torch.export.export(program_model, traced, dynamic_shapes=dynamic_shapes)
    except ReparamError:
        raise
    except Exception as error:
        first = " ".join(str(error).split())[:300]
        raise ExportError(f"torch.export failed: {type(error).__name__}: {first}") from None
    custom = sorted(
        {
            str(n.target)
            for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", "") == "reparam"
        }
    )
    if custom:  # would need `import reparam` to load
        raise ExportError(f"the program still calls reparam operators: {', '.join(custom)}")

    def write(tmp: Path) -> None:
        # Through a file object: given a path, torch warns that the temporary name does not
        # end in .pt2.
        with open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        _check_loaded(tmp, program_model, inputs, dynamic_batch)

    atomic_write(target, write)
    return path


def _check_loaded(
    file: Path, model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool
) -> None:
    """Load the written file back and compare it with the model at one or two batch sizes."""
    with open(file, "rb") as handle:
        loaded = torch.export.load(handle).module()
    batches = [inputs]
    if dynamic_batch:
        batches.append(tuple(torch.cat([t, t, t]) for t in inputs))
    for args in batches:
        with torch.no_grad():
            expected, got = model(*args), loaded(*args)
        for diff in compare_outputs(expected, got):
            if not diff.within(CHECK_RTOL):
                raise ExportError(
                    f"the saved program differs from the model at batch {args[0].shape[0]}: "
                    f"{diff.name} max rel {diff.max_rel:.3g}; nothing written"
                )
