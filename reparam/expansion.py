"""The training half: expand a plain network's convs into a family's training-time blocks.

``expand(model, family)`` finds each Conv2d→BatchNorm pair as :func:`reparam.fuse` finds them
(adjacent in an ``nn.Sequential``, through a ``torch.fx`` trace, or, with ``example_inputs``,
by a probe forward) and replaces the conv by an :class:`ExpandedConv` holding the family's
block, the BatchNorm by ``nn.Identity``. A conv with a bias and no BatchNorm is expanded too.
The block starts as the original function (:mod:`reparam.expansion_blocks` gives the equations):
main branch = the original kernel and BatchNorm, added branches end in BatchNorms with
γ = β = 0 (QARepVGG: see its builder). In eval mode the expanded model equals the original
up to rounding (≤ 1e-5 relative in float32); in training mode too for convs that had a
BatchNorm (QARepVGG excepted).

``reparam.fuse`` turns each :class:`ExpandedConv` back into a plain ``nn.Conv2d`` with the
original conv's geometry (the fuser :func:`fuse_expanded_conv`), so the fused model has
the original architecture with its BatchNorms folded.

Every conv left alone is listed in the :class:`ExpandReport` with the reason.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from reparam.blocks.base import ReparamBlock
from reparam.conv_bn_pairs import PairFinder, hook_kind, probe_pairs
from reparam.convert import as_inputs, find_conv_bn_pairs
from reparam.errors import BlockConfigError, UserInputError, printable, summarize
from reparam.expansion_blocks import FAMILIES, build_block, conv_geometry
from reparam.fusers import get_fuser, register_fuser
from reparam.module_fusion import make_conv

__all__ = [
    "FAMILIES",
    "ExpandReport",
    "ExpandedConv",
    "NothingToExpandError",
    "check_family",
    "expand",
    "expand_with_report",
    "fuse_expanded_conv",
]

SHOWN_REASONS = 3
# The no-argument methods reparam.fuse calls on a module of a non-torch class to deploy it.
THIRD_PARTY_METHODS = ("switch_to_deploy", "reparameterize", "fuse")


class NothingToExpandError(UserInputError):
    """The model has no conv the family can expand; the message gives the reasons."""


class ExpandedConv(nn.Module):
    """A plain conv in training form: ``block`` (a family's block) computing that conv.

    ``fuse()`` returns the plain ``nn.Conv2d`` (original stride, padding, dilation, groups
    and padding mode; always a bias) that the block folds into; :func:`reparam.fuse` calls
    it through :func:`fuse_expanded_conv`, the fuser registered for this type.
    """

    def __init__(self, block: nn.Module, family: str, conv: nn.Conv2d) -> None:
        super().__init__()
        self.block = block
        self.family = family
        self.geometry = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def fuse(self) -> nn.Conv2d:
        """The plain conv the block folds into (eval-mode statistics), a new module."""
        with torch.no_grad():
            kernel, bias = self.block.get_equivalent_kernel_bias()
            return make_conv(kernel, bias, **self.geometry)

    def extra_repr(self) -> str:
        return f"family={self.family}"


def fuse_expanded_conv(module: ExpandedConv) -> nn.Conv2d:
    """The fuser of :class:`ExpandedConv`: its plain conv (reparam's own exact fold, so
    fuse need not probe it as it probes third-party deploy methods)."""
    return module.fuse()


# An ExpandedConv exists only once this module is imported, so registering here is in time
# for every fuse that meets one (reparam.builtins may register it as well; same function).
if get_fuser(ExpandedConv) is None:
    register_fuser(ExpandedConv, fuse_expanded_conv)


@dataclass
class ExpandReport:
    """What :func:`expand_with_report` did.

    Attributes:
        family: the family expanded into.
        expanded: ``(conv path, BatchNorm path or None)`` of each conv expanded.
        left_alone: ``(path, reason)`` of each conv (or block holding convs) not expanded.
        traced: whether the ``torch.fx`` trace succeeded.
        trace_error: why it failed ("" otherwise).
        probed: whether the probe forward ran (None without ``example_inputs``).
        probe_error: why it failed ("" otherwise).
    """

    family: str
    expanded: list[tuple[str, str | None]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    traced: bool | None = None
    trace_error: str = ""
    probed: bool | None = None
    probe_error: str = ""

    def summary(self) -> str:
        lines = [f"expanded into {self.family}: {len(self.expanded)} conv(s)"]
        if self.left_alone:
            lines += ["left alone:", *(f"  {path}: {why}" for path, why in self.left_alone)]
        if self.traced is False:
            lines.append(f"torch.fx trace failed: {self.trace_error}")
        if self.probed is False:
            lines.append(f"probe forward failed: {self.probe_error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "expanded": [{"conv": conv, "bn": bn} for conv, bn in self.expanded],
            "left_alone": [{"path": path, "reason": why} for path, why in self.left_alone],
            "traced": self.traced,
            "trace_error": self.trace_error,
            "probed": self.probed,
            "probe_error": self.probe_error,
        }


def check_family(family: object) -> str:
    """``family`` if known; a :class:`UserInputError` listing the known ones otherwise."""
    if isinstance(family, str) and family.lower() in FAMILIES:
        return family.lower()
    guess = difflib.get_close_matches(str(family).lower(), FAMILIES, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    raise UserInputError(
        f"unknown family '{printable(family)}'{hint}; known: {', '.join(FAMILIES)}"
    )


def expand(
    model: nn.Module,
    family: str,
    *,
    example_inputs: object = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    num_conv_branches: int = 2,
    trace: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace every eligible conv (with its BatchNorm) by ``family``'s training-time block.

    The result computes what ``model`` computes at step 0 (eval mode: ≤ 1e-5 relative in
    float32, ≤ 1e-10 in float64; training mode: the same for convs that had a BatchNorm, as
    the added branches' BatchNorms start at γ = β = 0 and output 0 with any statistics). The
    added branches' γ and β get gradients from the first step, their convs once γ ≠ 0.
    QARepVGG differs (its 1x1 and identity branches have no BatchNorm): the original
    BatchNorm moves after the sum, the bare 1x1 starts at zero and gets gradients at once,
    and the match holds in eval mode only. A conv with a bias and no BatchNorm gets a main
    BatchNorm that is the identity in eval mode (it normalises batches in training mode).
    ``reparam.fuse`` of the result has the architecture (and parameter count) of
    ``reparam.fuse(model)``.

    Args:
        model: a plain network; it is not modified (unless ``inplace``).
        family: "acnet", "repvgg", "dbb", "mobileone" or "qarepvgg".
        example_inputs: a tensor or tuple of positional inputs; with them a probe forward
            finds Conv→BN pairs in models torch.fx cannot trace (checked on these inputs).
        include: glob pattern(s) a conv's path must match to be expanded (all if None).
        exclude: glob pattern(s) of conv paths to leave alone.
        num_conv_branches: MobileOne's parallel KxK branches (the first holds the original).
        trace: find pairs through a torch.fx trace too.
        inplace: modify ``model`` itself instead of a deep copy.

    Raises:
        UserInputError: unknown family.
        NothingToExpandError: nothing in ``model`` can be expanded (the message gives the
            reasons; a :class:`UserInputError`).
    """
    return expand_with_report(
        model, family, example_inputs=example_inputs, include=include, exclude=exclude,
        num_conv_branches=num_conv_branches, trace=trace, inplace=inplace,
    )[0]  # fmt: skip


def expand_with_report(
    model: nn.Module,
    family: str,
    *,
    example_inputs: object = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    num_conv_branches: int = 2,
    trace: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, ExpandReport]:
    """:func:`expand`, also returning the :class:`ExpandReport`."""
    family = check_family(family)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expand expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UserInputError(
            "TorchScript modules cannot be expanded: their compiled forward cannot run new "
            "blocks; expand the Python nn.Module before torch.jit.script/trace"
        )
    if isinstance(num_conv_branches, bool) or not isinstance(num_conv_branches, int):
        raise TypeError("num_conv_branches must be an int")
    if num_conv_branches < 1:
        raise UserInputError(f"num_conv_branches must be >= 1, got {num_conv_branches}")
    inputs = as_inputs(example_inputs)
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")
    target = model if inplace else _copy(model)
    report = ExpandReport(family)
    pairs, probe_only = _find_pairs(target, trace, inputs, report)
    reference = _eval_outputs(target, inputs) if probe_only else None
    options = {"num_conv_branches": num_conv_branches}
    undo = _expand_all(target, family, pairs, includes, excludes, options, report)
    if reference is not None and not _same(reference, _eval_outputs(target, inputs)):
        for conv_path, (conv, bn_path, bn) in undo.items():
            if bn_path in probe_only:
                _put(target, conv_path, conv)
                _put(target, bn_path, bn)
                report.expanded.remove((conv_path, bn_path))
                report.left_alone.append(
                    (conv_path, "expanding changed the outputs on the example inputs "
                     "(another operation reads the conv output)")
                )  # fmt: skip
    if not report.expanded:
        reasons = "; ".join(f"{path}: {why}" for path, why in report.left_alone[:SHOWN_REASONS])
        more = len(report.left_alone) - SHOWN_REASONS
        tail = f" (and {more} more)" if more > 0 else ""
        raise NothingToExpandError(
            f"nothing to expand into {family}: no eligible conv"
            + (f" ({printable(reasons, 400)}{tail})" if reasons else " (the model has no Conv2d)")
        )
    return target, report


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # anything deepcopy raises means "this model cannot be copied"
        raise UserInputError(
            f"cannot copy the model to expand it ({printable(summarize(error))}); "
            "pass inplace=True to expand the model itself"
        ) from error


def _patterns(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a glob pattern or an iterable of them")
    return patterns


def _find_pairs(
    model: nn.Module, trace: bool, inputs: tuple | None, report: ExpandReport
) -> tuple[dict[str, str], set[str]]:
    """``{conv path: bn path}`` of the Conv→BN pairs fuse would fold, and the BN paths that
    only the probe forward found."""
    pairs, report.trace_error = find_conv_bn_pairs(model, trace=trace)
    report.traced = (not report.trace_error) if trace else None
    found = {pair.conv: pair.bn for pair in pairs}
    probe_only: set[str] = set()
    if inputs is not None and not report.traced:
        finder = PairFinder(model)
        with _eval_mode(model), torch.no_grad():
            added, report.probe_error = probe_pairs(finder, inputs)
        report.probed = not report.probe_error
        for pair in finder.pairs.values():
            if pair.bn in added and pair.conv not in found:
                found[pair.conv] = pair.bn
                probe_only.add(pair.bn)
    return found, probe_only


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then restore each module's flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _eval_outputs(model: nn.Module, inputs: tuple) -> object:
    with _eval_mode(model), torch.no_grad():
        return model(*inputs)


def _same(reference: object, candidate: object) -> bool:
    from reparam.compare import compare_outputs

    try:
        diffs = compare_outputs(reference, candidate)
    except (TypeError, ValueError):
        return False
    return all(d.within(1e-4) for d in diffs)


def _owners(model: nn.Module) -> dict[str, str]:
    """``{path: type name}`` of modules whose convs are not ours to expand: reparam blocks,
    expanded convs, modules with a registered fuser or their own deploy method (fuse runs
    it before it reaches the convs inside), TorchScript."""
    owners = {}
    for path, module in model.named_modules():
        if not path:
            continue
        owned = isinstance(module, ReparamBlock | ExpandedConv | torch.jit.ScriptModule)
        owned = owned or get_fuser(type(module)) is not None or _deploy_method(module)
        if owned and not any(path.startswith(owner + ".") for owner in owners):
            owners[path] = type(module).__name__
    return owners


def _deploy_method(module: nn.Module) -> bool:
    """Whether ``module``'s own (non-torch) class has a method fuse calls to deploy it."""
    if type(module).__module__.startswith("torch."):
        return False
    return any(callable(getattr(type(module), name, None)) for name in THIRD_PARTY_METHODS)


def _expand_all(
    model: nn.Module,
    family: str,
    pairs: dict[str, str],
    includes: list[str] | None,
    excludes: list[str] | None,
    options: dict,
    report: ExpandReport,
) -> dict[str, tuple[nn.Module, str | None, nn.Module | None]]:
    """Expand every eligible conv; return what each replacement removed (for an undo)."""
    owners = _owners(model)
    uses = Counter(id(m) for m in model.modules(remove_duplicate=False))
    reported_owners: set[str] = set()
    undo = {}
    for path, conv in list(model.named_modules()):
        if not isinstance(conv, _ConvNd):
            continue
        owner = next((o for o in owners if path.startswith(o + ".")), None)
        if owner is not None:
            if owner not in reported_owners:
                reported_owners.add(owner)
                report.left_alone.append(
                    (owner, f"already a training-time block or fused unit ({owners[owner]})")
                )
            continue
        bn_path = pairs.get(path)
        bn = model.get_submodule(bn_path) if bn_path is not None else None
        reason = _why_not(path, conv, bn, uses, includes, excludes, report)
        geometry = None
        if reason is None:
            geometry, reason = conv_geometry(conv)
        if reason is None:
            try:
                block = build_block(family, geometry, conv, bn, options)
            except BlockConfigError as error:
                reason = printable(error, 200)
        if reason is not None:
            report.left_alone.append((path, reason))
            continue
        _put(model, path, ExpandedConv(block, family, conv))
        if bn_path is not None:
            _put(model, bn_path, nn.Identity())
        report.expanded.append((path, bn_path))
        undo[path] = (conv, bn_path, bn)
    return undo


def _why_not(
    path: str,
    conv: _ConvNd,
    bn: nn.Module | None,
    uses: Counter,
    includes: list[str] | None,
    excludes: list[str] | None,
    report: ExpandReport,
) -> str | None:
    """Why the conv at ``path`` is not expanded (None when nothing stops it)."""
    if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
        return "not matched by include"
    if excludes is not None and any(fnmatch.fnmatchcase(path, p) for p in excludes):
        return "matched by exclude"
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__}: only 2-d convs expand"
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward (its function is not a plain conv)"
    if not conv.weight.is_floating_point() or conv.weight.device.type == "meta":
        return "weights are not real floating-point values"
    if uses[id(conv)] > 1:
        return "the same conv is reachable under two names (shared weights)"
    kind = hook_kind(conv)
    if kind is not None:
        return f"it has a {kind}, which the block would not run"
    if bn is None:
        if conv.bias is None:
            where = (
                ""
                if report.traced
                else " (torch.fx could not trace the model; pass example_inputs)"
            )
            return (
                "no BatchNorm found after it and no bias: expanding would add a bias the "
                f"original has not{where}"
            )
        return None
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
        return "its BatchNorm has no running statistics (track_running_stats=False)"
    kind = hook_kind(bn)
    if kind is not None:
        return f"its BatchNorm has a {kind}, which expanding would drop"
    return None


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
