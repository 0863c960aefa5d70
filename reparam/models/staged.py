"""The classifier layout RepVGG and MobileOne publish: ``stage0`` … ``stage4``, ``gap``,
``linear`` (so their published checkpoints' keys load as they are)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["StagedClassifier"]


class StagedClassifier(nn.Module):
    """``linear(gap(stage4(…stage1(stage0(x)))).flatten(1))``.

    Subclasses add the modules ``stage0`` to ``stage4``, ``gap`` and ``linear``.
    """

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        """stage1..stage4 (stage0 is a single block)."""
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage0(x)
        for stage in self.stages:
            x = stage(x)
        return self.linear(self.gap(x).flatten(1))
