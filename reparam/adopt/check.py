"""The equivalence check: load a copy's weights into the reparam block and compare outputs.

:func:`adopt_one` builds the block for a layout, gives its BatchNorms the copy's eps and
momentum, moves it to the copy's dtype and device, loads the copy's state dict with strict
keys, and runs both modules on the layout's probe inputs in float64 and eval mode (on
copies, so the user's module is untouched). The probes span magnitudes, signs, spatial and
batch sizes (:mod:`reparam.adopt.parts`), plus the inputs the block saw on the user's
example when one is given, so a copy is judged by what it computes (ReLU6 behind an
``nn.ReLU`` attribute, a size- or batch-dependent branch), not by its types. The block is
returned only when the outputs agree to a relative error of :data:`RTOL` on every probe;
otherwise a FusionError says why not, naming the probe.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from reparam.adopt.guard_probes import guard_probes
from reparam.adopt.parts import Layout, Probe
from reparam.errors import FusionError, printable, summarize

__all__ = ["RTOL", "adopt_one"]

# A probe output may differ from the copy's by this much, relative to the largest output
# magnitude. The check runs in float64, where exact adoptions agree to ~1e-15, so this only
# has to separate rounding from a different function.
RTOL = 1e-5


def _outputs(value: object) -> list[Tensor]:
    """The tensors of a forward's result (a tensor, or nested tuples / lists of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    raise FusionError(f"returns a {type(value).__name__}, not tensors")


def _finite_error(expected: Tensor, got: Tensor) -> float:
    """Largest |difference| where the copy's output is finite; inf infinity where the two
    disagree on which entries are NaN or ±inf (NaN at the same place is not "equal" unless
    the copy gives NaN there too)."""
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(got)):
        return math.inf
    if not finite.all():
        same_nan = torch.equal(expected.isnan(), got.isnan())
        if not same_nan or not torch.equal(expected[expected.isinf()], got[got.isinf()]):
            return math.inf
    if not finite.any():
        return 0.0
    return float((expected[finite] - got[finite]).abs().max())


def _probe_error(reference: nn.Module, adopted: nn.Module, probe: Probe) -> float | None:
    """Relative error of one probe, or None when the copy itself fails on it (a shape it does
    not take: nothing to compare)."""
    try:
        expected = _outputs(reference(*probe.inputs))
    except FusionError:
        raise
    except Exception:
        return None
    try:
        got = _outputs(adopted(*probe.inputs))
    except Exception as error:
        reason = f"the adopted block fails on the probe input {probe.label} ({summarize(error)})"
        raise FusionError(reason) from error
    shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1] or not expected:
        raise FusionError(
            f"output shapes differ on the probe input {probe.label}: {shapes[0]} vs {shapes[1]}"
        )
    finite = [t[torch.isfinite(t)] for t in expected]
    scale = max((float(t.abs().max()) for t in finite if t.numel()), default=0.0)
    error = max(_finite_error(a, b) for a, b in zip(expected, got, strict=True))
    return error / max(scale, 1e-30)


def _relative_error(
    foreign: nn.Module, candidate: nn.Module, probes: list[Probe]
) -> tuple[float, str]:
    """The largest relative error of the two modules' float64 eval-mode outputs over
    ``probes`` (each relative to its own largest output magnitude), and the probe it came
    from. Both run on copies: the user's module keeps its dtype, device and train/eval
    state. The first probe must run on the copy; later ones it fails on are skipped."""
    try:
        reference = copy.deepcopy(foreign).to(device="cpu", dtype=torch.float64).eval()
    except Exception as error:
        raise FusionError(f"it cannot be copied for the check ({summarize(error)})") from error
    adopted = copy.deepcopy(candidate).to(device="cpu", dtype=torch.float64).eval()
    worst, where = 0.0, probes[0].label
    with torch.no_grad():
        for index, probe in enumerate(probes):
            error = _probe_error(reference, adopted, probe)
            if error is None and index == 0:
                try:  # run it again for the message
                    reference(*probe.inputs)
                except Exception as failure:
                    reason = f"its forward fails on a probe input ({summarize(failure)})"
                    raise FusionError(reason) from failure
            if error is not None and not error <= worst:
                worst, where = error, probe.label
                if not error <= RTOL:  # decided: the rest cannot make it equal
                    break
    return worst, where


def _sync_norm_settings(foreign: nn.Module, candidate: nn.Module, layout: Layout) -> None:
    """Give every BatchNorm of ``candidate`` the eps and momentum of the copy's BatchNorm at
    the same path (copies sometimes use eps=1e-3 as YOLOv5 does); state dicts carry neither."""
    for path, norm in candidate.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        try:
            theirs = foreign.get_submodule(layout.theirs(path))
        except AttributeError:
            continue
        if isinstance(theirs, nn.modules.batchnorm._BatchNorm):
            norm.eps, norm.momentum = theirs.eps, theirs.momentum


def _reference_tensor(module: nn.Module) -> Tensor | None:
    """A floating tensor of ``module`` giving the dtype and device the adopted block takes."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _candidates(foreign: nn.Module, layout: Layout) -> list[nn.Module]:
    # Building a block initialises weights from the global RNG: keep the user's stream.
    with torch.random.fork_rng(devices=[]):
        try:
            built = layout.build(foreign)
        except FusionError:
            raise
        except Exception as error:  # the block's own constructor checks, or odd shapes
            reason = f"no {layout.target} matches its configuration ({summarize(error)})"
            raise FusionError(reason) from error
    return built if isinstance(built, list) else [built]


def _loaded(foreign: nn.Module, layout: Layout, candidate: nn.Module) -> nn.Module:
    """``candidate`` with the copy's norm settings, dtype, device and weights."""
    _sync_norm_settings(foreign, candidate, layout)
    reference = _reference_tensor(foreign)
    if reference is not None:
        candidate.to(device=reference.device, dtype=reference.dtype)
    state = layout.ours(foreign.state_dict())
    expected = set(candidate.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        listed = (("unexpected", unexpected), ("missing", missing))
        parts = [
            f"{what} {', '.join(keys[:4])}" + (" …" if len(keys) > 4 else "")
            for what, keys in listed
            if keys
        ]
        reason = f"its state dict does not load into {layout.target}: {'; '.join(parts)}"
        raise FusionError(printable(reason, 320))
    try:
        candidate.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch's first line is only "Error(s) in loading state_dict for X:"; the next one
        # names the tensor and both shapes.
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        why = details[0] if details else summarize(error)
        reason = f"its state dict does not load into {layout.target}: {why}"
        raise FusionError(printable(reason, 320)) from error
    return candidate


def adopt_one(
    foreign: nn.Module, layout: Layout, extra_probes: list[Probe] = ()
) -> tuple[nn.Module, float]:
    """The reparam block computing what ``foreign`` computes, and the probes' relative error.

    The layout's builder may offer several candidates (e.g. RepVGG's SE with the published
    window pool, then with a global pool); the first that agrees on every probe wins.
    ``extra_probes`` (the inputs the block saw on the user's example) are checked too.
    Raises FusionError with the reason when none can be built, loaded or shown equal.
    """
    candidates = _candidates(foreign, layout)
    try:
        probes = list(layout.probe(foreign)) + list(extra_probes)
        probes += guard_probes(foreign, probes[0])  # both sides of its own size branches
    except FusionError:
        raise
    except Exception as error:
        raise FusionError(f"no probe input could be built ({summarize(error)})") from error
    first_failure: FusionError | None = None
    for candidate in candidates:
        try:
            candidate = _loaded(foreign, layout, candidate)
            error, where = _relative_error(foreign, candidate, probes)
            if not error <= RTOL:
                raise FusionError(
                    f"it computes something else than {layout.target} (relative error "
                    f"{error:.2e} on a probe input {where}, eval mode, float64)"
                )
        except FusionError as failure:
            first_failure = first_failure or failure
            continue
        candidate.train(foreign.training)
        return candidate, error
    assert first_failure is not None
    raise first_failure
