"""The equivalence check: load a copy's weights into the reparam block and compare outputs.

:func:`adopt_one` builds the block for a layout, gives its BatchNorms the copy's eps and
momentum, moves it to the copy's dtype and device, loads the copy's state dict with strict
keys, and runs both modules on the layout's probe input in float64 and eval mode (on
copies, so the user's module is untouched). The block is returned only when the outputs
agree to a relative error of :data:`RTOL`; otherwise a FusionError says why not.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from reparam.adopt.layouts import Layout
from reparam.errors import FusionError, summarize

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


def _relative_error(foreign: nn.Module, candidate: nn.Module, inputs: tuple) -> float:
    """Largest |difference| of the two modules' float64 eval-mode outputs on ``inputs``,
    relative to the largest output magnitude. Both run on copies: the user's module keeps
    its dtype, device and train/eval state."""
    try:
        reference = copy.deepcopy(foreign).to(device="cpu", dtype=torch.float64).eval()
    except Exception as error:
        raise FusionError(f"it cannot be copied for the check ({summarize(error)})") from error
    adopted = copy.deepcopy(candidate).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():
        try:
            expected = _outputs(reference(*inputs))
        except Exception as error:  # the user's forward: any failure means "cannot check"
            raise FusionError(f"its forward fails on a probe input ({summarize(error)})") from error
        try:
            got = _outputs(adopted(*inputs))
        except Exception as error:
            reason = f"the adopted block fails on the probe input ({summarize(error)})"
            raise FusionError(reason) from error
    shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1] or not expected:
        raise FusionError(f"output shapes differ on the probe input: {shapes[0]} vs {shapes[1]}")
    scale = max(float(t.abs().max()) for t in expected)
    error = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    return error / max(scale, 1e-30)


def _sync_norm_settings(foreign: nn.Module, candidate: nn.Module) -> None:
    """Give every BatchNorm of ``candidate`` the eps and momentum of the copy's BatchNorm at
    the same path (copies sometimes use eps=1e-3 as YOLOv5 does); state dicts carry neither."""
    for path, norm in candidate.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        try:
            theirs = foreign.get_submodule(path)
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


def adopt_one(foreign: nn.Module, layout: Layout) -> tuple[nn.Module, float]:
    """The reparam block computing what ``foreign`` computes, and the probe's relative error.

    Raises FusionError with the reason when it cannot be built, loaded or shown equal.
    """
    # Building the block initialises weights from the global RNG: keep the user's stream.
    with torch.random.fork_rng(devices=[]):
        try:
            candidate = layout.build(foreign)
        except FusionError:
            raise
        except Exception as error:  # the block's own constructor checks, or odd shapes
            reason = f"no {layout.target} matches its configuration ({summarize(error)})"
            raise FusionError(reason) from error
    _sync_norm_settings(foreign, candidate)
    reference = _reference_tensor(foreign)
    if reference is not None:
        candidate.to(device=reference.device, dtype=reference.dtype)
    try:
        candidate.load_state_dict(foreign.state_dict(), strict=True)
    except RuntimeError as error:
        reason = f"its state dict does not load into {layout.target}: {summarize(error)}"
        raise FusionError(reason) from error
    try:
        inputs = layout.probe(foreign)
    except FusionError:
        raise
    except Exception as error:
        raise FusionError(f"no probe input could be built ({summarize(error)})") from error
    error = _relative_error(foreign, candidate, inputs)
    if not error <= RTOL:
        raise FusionError(
            f"it computes something else than {layout.target} (relative error {error:.2e} on a "
            f"probe input, eval mode, float64)"
        )
    candidate.train(foreign.training)
    return candidate, error
