"""torch.compile(fullgraph=True) of models with the dynamic blocks: no graph break, and the
compiled model equals eager, in inference and in a training step (output and gradients).

One tiny shape each (compiling is slow). The ``aot_eager`` backend traces the forward and
the backward through AOTAutograd, as inductor does, without generating code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam.blocks.drconv import DRConv2d
from reparam.blocks.involution import Involution
from reparam.testing import randomize_batchnorm


def _involution_model() -> tuple[nn.Module, torch.Tensor]:
    block = randomize_batchnorm(Involution(16, 3, group_channels=8), 0)
    return nn.Sequential(nn.Conv2d(4, 16, 1), block, nn.ReLU()), torch.randn(2, 4, 6, 5)


def _drconv_model() -> tuple[nn.Module, torch.Tensor]:
    block = DRConv2d(4, 6, 3, region_num=4, padding=1)
    return nn.Sequential(nn.Conv2d(3, 4, 1), block, nn.ReLU()), torch.randn(2, 3, 6, 5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [_involution_model, _drconv_model], ids=["inv", "dr"])
def test_compiles_without_graph_breaks_and_equals_eager(make):
    torch.manual_seed(0)
    model, x = make()
    model = model.double()
    x = x.double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-10, atol=1e-12)

    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for run in (model, compiled):
        model.load_state_dict(state)  # the same BN statistics for both
        model.zero_grad()
        inp = x.clone().requires_grad_()
        out = run(inp)
        out.square().sum().backward()
        results.append([out.detach(), inp.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
