"""A self-contained ``torch.export`` program (``.pt2``) of the fused model.

The file holds the graph and the weights; ``torch.export.load`` rebuilds it in a process that
has torch alone (no reparam, no user code), which the fused checkpoint cannot offer (it
needs the model's factory). DRConv's per-sample correlation is traced in its standard-op form
(:func:`reparam.ops.corr.corr_standard`: one-hot depthwise conv, then a batched matmul), so
the program holds only aten operators, never ``reparam::corr``. The batch axis is symbolic.
Any signature :func:`reparam.export.export_onnx` takes works here too (``forward(*xs)``,
nested containers, keyword arguments): the dynamic batch is given per tensor through
``torch.export.ShapesCollection``, which maps it onto the model's own signature.
After writing, the file is loaded back and run at the example's batch and another one, and
compared with the model; a mismatch refuses the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reparam._io import prepare_output
from reparam.compare import compare_outputs
from reparam.errors import ExportError, ReparamError, UserInputError, printable
from reparam.export.signature import InputTree
from reparam.export.staging import Staging

__all__ = ["export_pt2"]

CHECK_RTOL = 1e-4


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | Sequence[Any],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    fuse: bool = True,
) -> Path:
    """Fuse ``model`` (a copy) and save it as a ``torch.export`` program at ``path``.

    Args:
        model: the model in training form (fused here) or already fused.
        path: the ``.pt2`` file; written atomically, only after the check passes.
        example_inputs: one tensor or a sequence of positional arguments, with the same
            signatures :func:`reparam.export.export_onnx` takes (``forward(*xs)``, nested
            tuples/lists/dicts of tensors, constants).
        example_kwargs: keyword arguments, likewise.
        dynamic_batch: make axis 0 of every input tensor symbolic (one shared size).
        fuse: fuse blocks and Conv→BN pairs first.

    Returns:
        ``path``.

    Raises:
        UserInputError: bad path or inputs.
        ExportError: torch.export fails (one line), or the loaded program differs from the
            model.
    """
    from reparam.convert import fuse_with_report
    from reparam.ops.corr import corr_mode

    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise UserInputError(f"output file '{printable(path)}' should end in .pt2")
    prepare_output(path)
    tree, inputs = InputTree.from_example(example_inputs, example_kwargs)
    args, kwargs = tree.rebuild(inputs)
    if fuse:  # probing with the example: a model fx cannot trace folds what `fuse` folds
        program_model, _ = fuse_with_report(model, example_inputs=None if kwargs else args)
    else:
        program_model = copy.deepcopy(model).eval()
    # torch.export specialises a size-1 axis to the constant 1: trace a batch of two.
    traced = (
        tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)
        if dynamic_batch
        else inputs
    )
    traced_args, traced_kwargs = tree.rebuild(traced)
    dynamic_shapes = (
        _batch_shapes(program_model, traced, traced_args, traced_kwargs) if dynamic_batch else None
    )
    try:
        # Standard ops for Corr: the program must not need reparam's custom op to load.
        with corr_mode("standard"), torch.no_grad():
            program = torch.export.export(
                program_model, traced_args, traced_kwargs, dynamic_shapes=dynamic_shapes
            )
    except ReparamError:
        raise
    except Exception as error:
        raise ExportError(f"torch.export failed: {_one_line(error)}") from None
    custom = sorted(
        {
            str(n.target)
            for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", "") == "reparam"
        }
    )
    if custom:  # would need `import reparam` to load
        raise ExportError(f"the program still calls reparam operators: {', '.join(custom)}")

    with Staging() as staging:
        tmp = staging.stage(path)
        # Through a file object: given a path, torch checks the name's extension.
        with open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        _check_loaded(tmp, program_model, tree, inputs, dynamic_batch)
        staging.commit()
    return path


def _batch_shapes(
    model: nn.Module, tensors: tuple[Tensor, ...], args: tuple, kwargs: dict[str, Any]
) -> Any:
    """Axis 0 of every tensor symbolic, in the structure of the model's own signature."""
    batch = torch.export.Dim("batch", min=1)
    shapes = torch.export.ShapesCollection()
    for tensor in tensors:
        if tensor.dim():
            shapes[tensor] = {0: batch}
    try:
        return shapes.dynamic_shapes(model, args, kwargs)
    except Exception as error:  # a signature torch cannot map the shapes onto
        raise ExportError(
            f"torch.export cannot take a dynamic batch for this signature: {_one_line(error)}; "
            "export with a static batch"
        ) from None


def _one_line(error: BaseException) -> str:
    """``Type: first line`` of torch's message (whose detail runs to pages), cut short."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return printable(text, 300)


def _check_loaded(
    file: Path, model: nn.Module, tree: InputTree, inputs: tuple[Tensor, ...], dynamic_batch: bool
) -> None:
    """Load the written file back and compare it with the model at one or two batch sizes."""
    with open(file, "rb") as handle:
        loaded = torch.export.load(handle).module()
    batches = [inputs]
    if dynamic_batch:
        batches.append(tuple(torch.cat([t, t, t]) if t.dim() else t for t in inputs))
    for flat in batches:
        args, kwargs = tree.rebuild(flat)
        with torch.no_grad():
            expected, got = model(*args, **kwargs), loaded(*args, **kwargs)
        for diff in compare_outputs(expected, got):
            if not diff.within(CHECK_RTOL):
                raise ExportError(
                    f"the saved program differs from the model at batch {flat[0].shape[0]}: "
                    f"{diff.name} max rel {diff.max_rel:.3g}; nothing written"
                )
