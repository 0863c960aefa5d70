"""The record of what a model-wide fuse did: :class:`FuseReport`.

Every module the fuse touched or left ends up in exactly one list: ``blocks`` (converted),
``adopted`` (a user's copy replaced by reparam's block) or ``not_fused`` (left as it was,
with the reason and, where there is one, what to do about it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["CONV_BN", "LINEAR_BN", "FuseReport"]

CONV_BN = "Conv+BatchNorm"
LINEAR_BN = "Linear+BatchNorm1d"


@dataclass
class FuseReport:
    """What ``fuse`` did.

    Attributes:
        blocks: modules converted, per type name (``Conv+BatchNorm`` for folded pairs).
        details: notes the fusers wrote, worth showing a user.
        traced: whether the ``torch.fx`` pass ran (None when not asked for).
        trace_error: why tracing failed ("" otherwise).
        probed: whether the example-input pass ran (None without ``example_inputs``).
        probe_error: why the probe forward failed ("" otherwise).
        adopted: ``"path: ForeignType → ReparamType"`` for each user block adopted.
        not_fused: ``(module path, reason)`` for each block or pair left as it was.
    """

    blocks: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    traced: bool | None = None
    trace_error: str = ""
    probed: bool | None = None
    probe_error: str = ""
    adopted: list[str] = field(default_factory=list)
    not_fused: list[tuple[str, str]] = field(default_factory=list)

    def record(self, kind: str, detail: str = "") -> None:
        self.blocks[kind] += 1
        if detail:
            self.details.append(detail)

    def skip(self, path: str, reason: str) -> None:
        """Note that the module at ``path`` was left unfused, and why (once per path)."""
        if all(existing != path for existing, _ in self.not_fused):
            self.not_fused.append((path, reason))

    def add_reason(self, path: str, reason: str) -> None:
        """Like :meth:`skip`, but a path already listed gets ``reason`` added to its entry
        (one entry per module, holding every reason it was left)."""
        for index, (existing, why) in enumerate(self.not_fused):
            if existing == path:
                self.not_fused[index] = (path, f"{why}; {reason}")
                return
        self.not_fused.append((path, reason))

    def unskip(self, path: str) -> str | None:
        """Take ``path`` off ``not_fused`` (it was converted after all); returns its reason."""
        for index, (existing, why) in enumerate(self.not_fused):
            if existing == path:
                del self.not_fused[index]
                return why
        return None

    def summary(self) -> str:
        """A few lines a person can read: what was fused, adopted, and left alone."""
        fused = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.blocks.items()))
        lines = [f"fused: {fused or 'nothing'}"]
        if self.adopted:
            lines += ["adopted:", *(f"  {entry}" for entry in self.adopted)]
        if self.not_fused:
            lines += ["not fused:", *(f"  {path}: {reason}" for path, reason in self.not_fused)]
        if self.details:
            lines += ["notes:", *(f"  {detail}" for detail in self.details)]
        if self.trace_note:
            lines.append(self.trace_note)
        if self.probed is False:
            lines.append(f"probe forward failed: {self.probe_error}")
        return "\n".join(lines)

    @property
    def trace_note(self) -> str:
        """One line on how pairs were found when torch.fx could not trace the model ("" when
        it could): by the probe forward, or not at all (then: pass example_inputs)."""
        if self.traced is not False:
            return ""
        if self.probed:
            how = "Conv→BN pairs were found by the probe forward on the example inputs"
        else:
            how = "no Conv→BN pair is proven without a trace; pass example_inputs to fold them"
        return f"torch.fx trace failed ({self.trace_error}); {how}"

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """The report as plain JSON-able types."""
        return {
            "blocks": dict(sorted(self.blocks.items())),
            "details": list(self.details),
            "traced": self.traced,
            "trace_error": self.trace_error,
            "probed": self.probed,
            "probe_error": self.probe_error,
            "adopted": list(self.adopted),
            "not_fused": [{"path": path, "reason": reason} for path, reason in self.not_fused],
            "trace_note": self.trace_note,
        }
