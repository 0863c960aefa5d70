"""Load a state dict into a model in whichever form it was saved: training or deploy.

Published re-parameterisation projects release two checkpoints per model: the training form
(every branch and BatchNorm, e.g. ``RepVGG-A0-train.pth``, ``mobileone_s0_unfused.pth.tar``)
and the deploy form (one conv per block: ``rbr_reparam.*`` in
https://github.com/DingXiaoH/RepVGG, ``reparam_conv.*`` in
https://github.com/apple/ml-mobileone). :func:`load_weights` recognises the form by its keys:

    keys(state_dict) = keys(model)                   → the training form, loaded into model
    keys(state_dict) = keys(blocks_deployed(model))  → the blocks fused, other layers as-is
    keys(state_dict) = keys(reparam.fuse(model))     → fully fused (Conv→BN folded as well)

and anything else is refused with the missing and unexpected keys of the closest form.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from reparam.convert import fuse
from reparam.errors import ReparamError, UserInputError, printable, summarize

__all__ = ["DEPLOY", "TRAINING", "load_weights", "looks_like_deploy"]

TRAINING, DEPLOY = "training", "deploy"
_EXAMPLES = 5
# Key fragments that only a fused block has: a state dict holding them is a deploy form.
_DEPLOY_MARKERS = ("rbr_reparam.", "reparam_conv.", "dbb_reparam.", "fused_conv.", ".l2x.")


def _blocks_deployed(model: nn.Module) -> nn.Module:
    """A copy with every block that has ``switch_to_deploy`` converted, nothing else folded
    (what the published ``repvgg_model_convert`` / ``reparameterize_model`` produce)."""
    deployed = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in list(deployed.modules()):
            switch = getattr(module, "switch_to_deploy", None)
            if callable(switch) and not getattr(module, "deploy", False):
                switch()
    return deployed


def _candidates(model: nn.Module):
    """(form, model, description) for each form a checkpoint may be in, cheapest first."""
    yield TRAINING, lambda: model, "the training form"
    yield DEPLOY, lambda: _blocks_deployed(model), "the deploy form (blocks fused)"
    yield DEPLOY, lambda: fuse(model), "the fully fused form (reparam.fuse)"


def _key_report(expected: list[str], given: list[str]) -> tuple[int, str]:
    """``(count, "N missing (e.g. …); M unexpected (e.g. …)")``, keys in state-dict order."""
    expected_set, given_set = set(expected), set(given)
    missing = [key for key in expected if key not in given_set]
    unexpected = [key for key in given if key not in expected_set]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(printable(key) for key in keys[:_EXAMPLES])
            parts.append(f"{len(keys)} {label} (e.g. {shown})")
    return len(missing) + len(unexpected), "; ".join(parts)


def _check_shapes(target: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    expected = target.state_dict()
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserInputError(
                f"{source}: {printable(key)} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )


def looks_like_deploy(keys: set[str]) -> bool:
    """Whether state-dict keys hold a fused block (a key no training form has)."""
    return any(marker in f".{key}" for key in keys for marker in _DEPLOY_MARKERS)


def load_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str
) -> tuple[nn.Module, str]:
    """Load ``state_dict`` (read from ``source``) into ``model`` or into its deploy form.

    Returns ``(model_to_use, form)``: ``model`` itself with the weights loaded and
    ``"training"``, or a fused copy of ``model`` holding the weights and ``"deploy"``
    (``model`` is then untouched). Keys must match one form exactly (strict loading).

    Raises:
        UserInputError: no form's keys match (the message gives the counts and examples
            of missing and unexpected keys against the closest form, and says when the
            checkpoint looks like a deploy checkpoint), or a tensor's shape differs.
    """
    given = list(state_dict)
    closest: tuple[int, str, str] | None = None
    for form, build, description in _candidates(model):
        target = build()
        expected = list(target.state_dict())
        if set(expected) == set(given):
            _check_shapes(target, state_dict, source)
            try:
                target.load_state_dict(state_dict, strict=True)
            except (RuntimeError, ReparamError) as error:
                raise UserInputError(
                    f"{source}: its keys are {description} of the model but the tensors do "
                    f"not fit: {summarize(error)}"
                ) from None
            return target, form
        count, detail = _key_report(expected, given)
        if closest is None or count < closest[0]:
            closest = (count, detail, description)
    assert closest is not None
    _, detail, description = closest
    hint = (
        " This looks like a deploy checkpoint (fused blocks), but it does not match the "
        "model's deploy form either: is it the same architecture?"
        if looks_like_deploy(set(given))
        else ""
    )
    raise UserInputError(
        f"keys in {source} do not match the model (closest: {description}): {detail}.{hint}"
    )
