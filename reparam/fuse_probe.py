"""Checking a conversion on probe inputs, and putting the module back when it fails.

Every conversion a fuse makes is checked where it can be: the module's outputs before and
after, on probe inputs, must agree to :data:`PROBE_RTOL` relative error
(max|after − before| / max|before| per output tensor, :mod:`reparam.compare`).

Probe inputs span magnitudes and signs: each base input x is also tried as s·x for every s
in :data:`SCALES`, so an activation is judged by what it computes (ReLU6 and ReLU agree on
unit-variance inputs, not at 100×), not by its type. The base inputs are what the module
received in a forward of the user's ``example_inputs`` (their shape, their distribution);
without them, a random input built from the module's first conv or Linear.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from reparam.compare import compare_outputs
from reparam.errors import FusionError, summarize

__all__ = [
    "PROBE_RTOL",
    "SCALES",
    "checked_conversion",
    "compare_modules",
    "inferred_input",
    "outputs_agree",
    "record_inputs",
    "scaled_probes",
]

# Largest relative output change accepted on a probe, per dtype; an exact fold in float32
# stays near 1e-6 (rounding), a different function is off by far more.
PROBE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
PROBE_RTOL_LOW_PRECISION = 2e-2

SCALES = (1.0, 1e-2, -1.0, 1e2)

# Calls recorded per module: a module called in a loop is checked on its first few inputs.
CALLS_RECORDED = 2


def _clone(value: object) -> object:
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, Tensor) else v, value)


def scaled_probes(bases: list[tuple], scales: tuple[float, ...] = SCALES) -> list[tuple]:
    """Each base input tuple times every scale in ``scales`` (floating tensors only:
    indices and masks are left as they are)."""

    def scale_by(factor: float) -> Callable[[object], object]:
        def scale(value: object) -> object:
            if isinstance(value, Tensor) and value.is_floating_point():
                return value * factor
            return value

        return scale

    return [pytree.tree_map(scale_by(s), base) for base in bases for s in scales]


def record_inputs(
    model: nn.Module, inputs: tuple, modules: dict[int, nn.Module]
) -> dict[int, list[tuple]]:
    """The positional inputs each of ``modules`` (by id) received in ``model(*inputs)``,
    copied (an in-place activation after it must not change them). A failing forward
    records nothing: the modules then get inferred inputs."""
    seen: dict[int, list[tuple]] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls = seen.setdefault(id(module), [])
        if len(calls) < CALLS_RECORDED and not kwargs:
            calls.append(_clone(args))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:  # the probe is optional: the check falls back to inferred inputs
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen


def inferred_input(module: nn.Module) -> tuple | None:
    """A random input for ``module`` built from its first conv (N=2, C=in_channels, sizes
    13 and 10, odd and even) or Linear; None when it has neither."""
    generator = torch.Generator().manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, _ConvNd):
            sizes = (13, 10, 7)[: layer.weight.dim() - 2]
            shape = (2, layer.in_channels, *sizes)
        elif isinstance(layer, nn.Linear):
            shape = (2, layer.in_features)
        else:
            continue
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (x.to(layer.weight.device, layer.weight.dtype),)
    return None


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def outputs_agree(reference: list, candidate: list, dtype: torch.dtype) -> str | None:
    """None when every candidate output is within the probe tolerance of its reference;
    otherwise why not (the largest relative error, or why they cannot be compared)."""
    rtol = PROBE_RTOL.get(dtype, PROBE_RTOL_LOW_PRECISION)
    worst = 0.0
    for expected, got in zip(reference, candidate, strict=True):
        try:
            diffs = compare_outputs(expected, got)
        except (TypeError, ValueError) as error:
            return f"its outputs cannot be compared ({summarize(error, 120)})"
        for diff in diffs:
            if not diff.within(rtol):
                worst = max(worst, diff.max_rel)
    if worst:
        return f"relative error {worst:.2g} on probe inputs scaled 1e-2 to 1e2 (tolerance {rtol:g})"
    return None


def compare_modules(reference: nn.Module, candidate: nn.Module, bases: list[tuple]) -> str | None:
    """None when ``candidate`` computes what ``reference`` computes on ``bases`` scaled by
    :data:`SCALES`; otherwise why not. A reference that fails on the probe cannot be judged
    (None); a candidate that fails where the reference runs differs."""
    probes = scaled_probes(bases)
    with torch.no_grad():
        try:
            expected = [reference(*probe) for probe in probes]
        except Exception:
            return None
        try:
            got = [candidate(*probe) for probe in probes]
        except Exception as error:  # the candidate must run wherever the reference runs
            return f"it fails on a probe input: {summarize(error, 120)}"
    return outputs_agree(expected, got, _dtype(reference))


def checked_conversion(
    module: nn.Module, convert: Callable[[], nn.Module], bases: list[tuple], what: str
) -> tuple[nn.Module, str | None]:
    """Run ``convert`` (which may change ``module`` in place and returns its converted form)
    and check it on ``bases`` scaled by :data:`SCALES`.

    Returns ``(converted, None)`` when the outputs agree, else ``(original, reason)`` where
    ``original`` is an untouched copy of ``module`` taken before ``convert`` ran (the module
    as it was, all of it: the conversion is all-or-nothing).
    """
    try:
        backup = copy.deepcopy(module)
    except Exception as error:  # anything deepcopy raises: no undo possible, so no convert
        return module, f"cannot be copied to check {what} ({summarize(error, 120)})"
    probes = scaled_probes(bases)
    with torch.no_grad():
        try:
            expected = [backup(*probe) for probe in probes]
        except Exception as error:  # the user's forward on an inferred input
            return module, (
                f"{what} cannot be checked: its forward fails on a probe input "
                f"({summarize(error, 120)}); pass example_inputs"
            )
        try:
            converted = convert()
            got = [converted(*probe) for probe in probes]
        except FusionError:  # reparam's own refusal: one clear line for the user
            raise
        except Exception as error:  # a third-party conversion failing: undo, never crash
            return backup.eval(), f"{what} failed ({summarize(error, 120)}); left as it was"
    why = outputs_agree(expected, got, _dtype(backup))
    if why is not None:
        return backup.eval(), f"{what} changes what it computes ({why}); left as it was"
    return converted, None
