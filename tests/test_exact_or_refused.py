"""Issue 19, fuse side: every conversion reparam makes is exact or refused, and never silent.

One test per case; each fails on the code before the fix (the issue's case number is in the
test name).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_case11_fuse_alone_sees_every_builtin_registration():
    """`from reparam.convert import fuse` in a fresh interpreter, nothing else of reparam
    imported: two pasted ACBlock copies (no conversion method of their own) are adopted and
    fused to one conv each (before: 6 convs left, nothing said)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from torch import nn
        from reparam.convert import fuse_with_report
        from fixtures_foreign import UserACBlock, randomise_batchnorms
        model = randomise_batchnorms(nn.Sequential(UserACBlock(3, 4, 3, padding=1),
                                                   UserACBlock(4, 4, 3, padding=1))).eval()
        x = torch.randn(2, 3, 9, 9)
        fused, report = fuse_with_report(model)
        convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
        error = (fused(x) - model(x)).abs().max() / model(x).abs().max()
        print(convs, len(report.adopted), float(error))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    convs, adopted, error = result.stdout.split()
    assert (int(convs), int(adopted)) == (2, 2)
    assert float(error) <= 1e-5
