"""The walk over a model's modules: adoption passes, then every block to its deploy form.

A module whose type has a registered fuser (looked up along the MRO, :mod:`reparam.fusers`)
is replaced by what the fuser returns; a module of an unregistered type that exposes
``switch_to_deploy()``, ``reparameterize()`` or ``fuse()`` (the conventions of ACNet/RepVGG,
timm/MobileOne and YOLO code) has that method called. Children are visited after their
parent, so a fuser sees its block in training form.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from reparam.conv_bn_pairs import hook_kind
from reparam.errors import FusionError
from reparam.fuse_probe import checked_conversion, compare_modules, inferred_input
from reparam.fuse_report import FuseReport
from reparam.fusers import FuseOutcome, get_fuser, pre_fuse_passes
from reparam.size_guards import ValueBranchError, flip_inputs

__all__ = ["THIRD_PARTY_METHODS", "adopt", "checked_on_inputs", "fuse_blocks"]

THIRD_PARTY_METHODS = ("switch_to_deploy", "reparameterize", "fuse")


def adopt(
    model: nn.Module,
    report: FuseReport,
    recorded: dict[int, list[tuple]] | None,
    example_inputs: tuple | None = None,
) -> None:
    """Run the registered pre-fuse passes (adoption of users' copies of published blocks),
    recording each decision.

    Each adoption is checked again here, like every conversion: the copy and the adopted
    block on the copy's recorded inputs (or one inferred from its first conv) scaled from
    1e-2 to 1e2 and negated, so an activation is judged by what it computes at every
    magnitude; a block that differs is swapped back for the copy and listed.
    """
    for pre_fuse_pass in pre_fuse_passes():
        before = dict(model.named_modules(remove_duplicate=False))
        # a pass of the user's may not take the example; the built-in adoption does, and
        # probes each copy on the inputs it really receives
        takes_example = "example_inputs" in inspect.signature(pre_fuse_pass).parameters
        notes = (
            pre_fuse_pass(model, example_inputs=example_inputs)
            if takes_example
            else pre_fuse_pass(model)
        )
        for note in notes:
            if note.adopted_as is None:
                report.skip(note.path, f"{note.foreign_type} not adopted: {note.reason}")
                continue
            why = _recheck(model, note.path, before.get(note.path), recorded)
            if why is None:
                report.adopted.append(
                    f"{note.path}: {note.foreign_type} -> {note.adopted_as} ({note.reason})"
                )
            else:
                report.skip(note.path, f"{note.foreign_type} not adopted: {why}")


def _recheck(
    model: nn.Module, path: str, copy: nn.Module | None, recorded: dict[int, list[tuple]] | None
) -> str | None:
    """None when the block now at ``path`` computes what ``copy`` computed; otherwise puts
    ``copy`` back and says why."""
    if copy is None or not path:
        return None
    block = model.get_submodule(path)
    bases = (recorded or {}).get(id(copy)) or []
    if not bases:
        inferred = inferred_input(copy)
        bases = [inferred] if inferred is not None else []
    why = compare_modules(copy, block, bases) if bases else None
    if why is not None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, copy)
        why = f"the adopted {type(block).__name__} computes something else ({why})"
    return why


def checked_on_inputs(module: nn.Module) -> bool:
    """Whether the walk checks ``module``'s conversion on its recorded inputs: a deploy
    method of another library, or a fuser that is not reparam's own."""
    fuser = get_fuser(type(module))
    if fuser is None:
        return _third_party_method(module) is not None
    return not _trusted(fuser)


def _trusted(fuser: object) -> bool:
    # reparam's own fusers are exact by construction (and tested block by block against the
    # published code); a fuser registered by the user is checked like any foreign code.
    return getattr(fuser, "__module__", "").startswith("reparam.")


def fuse_blocks(
    module: nn.Module, path: str, report: FuseReport, recorded: dict[int, list[tuple]] | None
) -> nn.Module:
    """Every block under ``module`` in deploy form, top down; returns what replaces
    ``module``. ``recorded``: each module's inputs on the user's example inputs (by id), or
    None when none were given."""
    if isinstance(module, torch.jit.ScriptModule):
        report.skip(path or "<model>", "TorchScript submodule: its compiled forward cannot change")
        return module
    module = _fuse_one(module, path, report, recorded)
    for name, child in list(module.named_children()):
        fused = fuse_blocks(child, f"{path}.{name}" if path else name, report, recorded)
        if fused is not child:
            setattr(module, name, fused)
    return module


def _fuse_one(
    module: nn.Module, path: str, report: FuseReport, recorded: dict[int, list[tuple]] | None
) -> nn.Module:
    """One module to its deploy form, all or nothing.

    reparam's own fusers are trusted; a fuser the user registered is checked on the
    module's recorded inputs where there are example inputs (trusted without them). A deploy
    method of another library's class is never trusted: it runs only under
    :func:`~reparam.fuse_probe.checked_conversion` (recorded inputs, or an input inferred
    from the module's first conv), and is undone when it changes the outputs.
    """
    where = path or "<model>"
    kind = type(module).__name__
    fuser = get_fuser(type(module))
    method = None if fuser is not None else _third_party_method(module)
    if fuser is None and method is None:
        return module
    if getattr(module, "deploy", False) is True:
        return module  # already in deploy form: nothing to check or do
    hooked = _hooked_submodule(module)
    if hooked is not None:
        report.skip(where, f"{kind} not fused: {hooked} would be dropped")
        return module
    params = list(module.parameters())
    frozen = bool(params) and not any(p.requires_grad for p in params)
    bases = [] if fuser is not None and _trusted(fuser) else (recorded or {}).get(id(module), [])
    detail = ""
    already_deployed = False

    def run_fuser() -> nn.Module:
        nonlocal detail, already_deployed
        outcome = fuser(module)
        if outcome is None:
            already_deployed = True
            return module
        if isinstance(outcome, FuseOutcome):
            outcome, detail = outcome.module, outcome.detail
        return outcome

    def run_method() -> nn.Module:
        result = method()
        return result if isinstance(result, nn.Module) else module

    try:
        if fuser is not None and not bases:
            outcome, why = run_fuser(), None
        elif fuser is not None:
            outcome, why = checked_conversion(module, run_fuser, bases, f"the {kind} fuser")
        else:
            name = f"its own {method.__name__}()"
            if not bases:
                inferred = inferred_input(module)
                bases = [inferred] if inferred is not None else []
            if not bases:
                report.add_reason(
                    where,
                    f"{kind}: {name} not called: no probe input to check it against "
                    "(no conv or Linear to infer one from); pass example_inputs",
                )
                return module
            # Both sides of the module's own size branches (x.shape[-1] > 40): the probes'
            # fixed sizes may all lie on one.
            try:
                bases = [*bases, *(flip for flip, _ in flip_inputs(module, bases[0]))]
            except ValueBranchError as refusal:
                report.add_reason(where, f"{kind}: {name} not called: {refusal}")
                return module
            outcome, why = checked_conversion(module, run_method, bases, name)
    except FusionError as error:
        raise FusionError(f"{where} ({kind}): {error}") from error
    if why is not None:
        report.add_reason(where, f"{kind}: {why}")
        return outcome
    if already_deployed:
        return module
    # Blame the fuse only when the block's own weights were finite (checked only on failure).
    if not all(map(_finite, outcome.parameters())) and all(map(_finite, params)):
        raise FusionError(
            f"{where} ({kind}): the fused weights are not finite (inf or NaN): a folded "
            f"kernel exceeds what {params[0].dtype if params else 'the dtype'} can hold"
        )
    if method is not None:
        # Converted by its own method and checked: it is fused, not "not adopted".
        previous = report.unskip(where)
        checked = "checked equal on probe inputs scaled 1e-2 to 1e2"
        note = f"{where} ({kind}): converted by {method.__name__}(), {checked}"
        detail = f"{note}; {previous}" if previous else note
        report.record(kind, detail)
    else:
        report.record(kind, f"{where} ({kind}): {detail}" if detail else "")
    if frozen:  # a frozen block stays frozen: the new deploy parameters keep the flag
        for parameter in outcome.parameters():
            parameter.requires_grad_(False)
    return outcome.eval()


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    return all(math.isfinite(float(v)) for v in torch.aminmax(tensor.detach()))  # NaN propagates


def _hooked_submodule(block: nn.Module) -> str | None:
    for name, module in block.named_modules():
        kind = hook_kind(module)
        if kind is not None:
            return f"the {kind} on {name or 'the block'}"
    return None


def _third_party_method(module: nn.Module) -> Callable[[], object] | None:
    """A no-argument deploy method defined by the module's own (non-torch) class."""
    for name in THIRD_PARTY_METHODS:
        method = getattr(module, name, None)
        if not callable(method) or type(module).__module__.startswith("torch."):
            continue
        try:
            required = [
                p
                for p in inspect.signature(method).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            continue
        if not required:
            return method
    return None
