"""What every adoption layout is made of: the :class:`Layout` record, the readers of a copy's
configuration, and the probe inputs the equivalence check runs on.

Probes decide adoption, so they must show what a copy *computes*, not what its attributes
are called: a copy computing ``F.relu6`` behind an ``nn.ReLU`` attribute agrees with ReLU on
unit-variance inputs, one that halves its output above 16 px agrees on 12×12, one that
branches on the batch size agrees at batch 2. :func:`image_probes` therefore spans
magnitudes (inputs scaled 1e-2, 1 and 1e2, both signs), spatial sizes (a square base size,
a size above 16 px with odd sides, a non-square odd size) and batch sizes (1 and 2): four
forwards per block (see the table in :func:`image_probes`), cheap next to the fuse.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reparam.errors import FusionError

__all__ = [
    "Layout",
    "Probe",
    "activation_of",
    "child",
    "geometry",
    "has_se",
    "image_probes",
    "kxk_probes",
    "probe_generator",
    "single",
]

_PROBE_SEED = 20240901
# Input scales of the probes: small enough that a threshold near 0 shows, large enough that
# a clamp (ReLU6, hardtanh) or a saturating activation shows.
SCALES = (1.0, 1e2, 1e-2)


@dataclass(frozen=True)
class Probe:
    """One probe forward: positional inputs and a label naming its shape and scale."""

    inputs: tuple
    label: str


@dataclass(frozen=True)
class Layout:
    """One published block layout: how to recognise, build and probe a copy of it.

    ``build`` returns the reparam block (configured, weights not loaded), or a list of
    candidates tried in order (the first that computes what the copy computes wins).
    ``renames`` maps the block's module paths to the copy's, ``(ours, theirs)`` prefix pairs,
    for layouts whose names differ from the block's (YOLOv7's ``rbr_dense.0``/``.1``).
    ``accepts`` narrows a match on attribute names (several layouts share ``rbr_dense``).
    """

    name: str  # the published block, for notes
    target: str  # the reparam block class name
    required: tuple[str, ...]  # attributes that identify the layout (all present)
    build: Callable[[nn.Module], nn.Module | list[nn.Module]]
    probe: Callable[[nn.Module], list[Probe]]  # probe inputs for the forward check
    note: str = ""  # what the adoption changes beyond the published function, if anything
    renames: tuple[tuple[str, str], ...] = field(default=())
    accepts: Callable[[nn.Module], bool] | None = None

    def matches(self, module: nn.Module) -> bool:
        if not all(hasattr(module, name) for name in self.required):
            return False
        try:
            return self.accepts is None or bool(self.accepts(module))
        except Exception:  # a predicate reading odd attributes: no match
            return False

    def theirs(self, path: str) -> str:
        """The copy's path for our module/key path ``path``."""
        for ours, their in self.renames:
            if path == ours or path.startswith(f"{ours}."):
                return their + path[len(ours) :]
        return path

    def ours(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The copy's state dict under our key names."""
        if not self.renames:
            return state
        renamed = {}
        for key, value in state.items():
            for ours, their in self.renames:
                if key.startswith(f"{their}."):
                    key = ours + key[len(their) :]
                    break
            renamed[key] = value
        return renamed


# --------------------------------------------------------------------------- readers


def child(module: nn.Module, path: str, kind: type[nn.Module] = nn.Module) -> nn.Module:
    """``module``'s submodule at dotted ``path``, which must be a ``kind``."""
    try:
        found = module.get_submodule(path)
    except AttributeError as error:
        raise FusionError(f"has no submodule {path!r}") from error
    if not isinstance(found, kind):
        raise FusionError(f"{path} is a {type(found).__name__}, expected {kind.__name__}")
    return found


def single(value: int | Sequence[int], what: str) -> int:
    """The one value of a square conv parameter (kernel, stride, padding, dilation)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        raise FusionError(f"{what} is {value!r}; only numeric padding is supported")
    if len(set(value)) != 1:
        raise FusionError(f"{what} {tuple(value)} is not square")
    return int(value[0])


def geometry(conv: nn.Conv2d, name: str) -> dict[str, int]:
    """in/out channels, square kernel, stride, padding, dilation and groups of ``conv``."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": single(conv.kernel_size, f"{name}.kernel_size"),
        "stride": single(conv.stride, f"{name}.stride"),
        "padding": single(conv.padding, f"{name}.padding"),
        "dilation": single(conv.dilation, f"{name}.dilation"),
        "groups": conv.groups,
    }


def activation_of(foreign: nn.Module, name: str) -> nn.Module | None:
    """A copy of the copy's activation module ``name`` (users swap ReLU for SiLU)."""
    act = getattr(foreign, name, None)
    return copy.deepcopy(act) if isinstance(act, nn.Module) else None


def has_se(foreign: nn.Module) -> bool:
    se = getattr(foreign, "se", None)
    return isinstance(se, nn.Module) and not isinstance(se, nn.Identity)


# --------------------------------------------------------------------------- probes


def probe_generator() -> torch.Generator:
    """The fixed-seed generator every probe draws from (adoption is deterministic)."""
    return torch.Generator().manual_seed(_PROBE_SEED)


def _label(shape: Sequence[int], scale: float) -> str:
    return f"{'×'.join(str(n) for n in shape)} at scale {scale:g}"


def _round_up(size: int, stride: int) -> int:
    return stride * math.ceil(size / stride)


def image_probes(channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[Probe]:
    """Four float64 (B, C, H, W) probes, cheap enough for wide blocks (float64 convs at
    thousands of channels) yet each case seen:

    ====================  =====  ======  ==========================================
    size                  batch  scale   shows
    ====================  =====  ======  ==========================================
    S×S                   2      1       the function itself (border and interior)
    (S+5)×(S+11)          1      1e2     clamps (ReLU6), sizes above 16 px, batch 1
    (S+1)×(S−2)           2      1e-2    non-square odd maps, thresholds near 0
    S×S                   1      1e-2    batch 1 at another scale
    ====================  =====  ======  ==========================================

    S is large enough that border handling and the interior both show in the output. Sides
    are rounded up to a multiple of the stride (strided pooling paths need it).
    """
    base = max(12, 2 * dilation * (kernel - 1) + 6)
    plan = (
        ((base, base), 2, SCALES[0]),
        ((base + 5, base + 11), 1, SCALES[1]),
        ((base + 1, base - 2), 2, SCALES[2]),
        ((base, base), 1, SCALES[2]),
    )
    generator = probe_generator()
    probes = []
    for (height, width), batch, scale in plan:
        shape = (batch, channels, _round_up(height, stride), _round_up(width, stride))
        x = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        probes.append(Probe((x,), _label(shape, scale)))
    return probes


def kxk_probes(conv_path: str) -> Callable[[nn.Module], list[Probe]]:
    """A layout's probe maker: :func:`image_probes` for the geometry of the foreign block's
    KxK conv at ``conv_path`` (its input channels, kernel, stride and dilation)."""

    def probe(foreign: nn.Module) -> list[Probe]:
        conv = foreign.get_submodule(conv_path)
        return image_probes(
            conv.in_channels,
            single(conv.kernel_size, "kernel_size"),
            single(conv.stride, "stride"),
            single(conv.dilation, "dilation"),
        )

    return probe


def scaled_probes(example: tuple, what: str) -> list[Probe]:
    """Probes from a block's inputs seen on the user's example: as seen, and random inputs
    of the same shapes at scale 1e2 (only tensors are replaced)."""
    generator = probe_generator()

    def random_like(value: object) -> object:
        if isinstance(value, Tensor) and value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            return noise * SCALES[1]
        if isinstance(value, (tuple, list)):
            return type(value)(random_like(item) for item in value)
        return value

    shapes = [tuple(v.shape) for v in example if isinstance(v, Tensor)]
    shape = "×".join(str(n) for n in shapes[0]) if shapes else "?"
    return [
        Probe(example, f"{shape} seen on {what}"),
        Probe(tuple(random_like(v) for v in example), f"{shape} at scale {SCALES[1]:g}"),
    ]
