"""T2T module: published structure and keys, sizes from the unfold formula, dynamic export."""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim

from reparam.blocks.t2t import T2TModule
from reparam.errors import UserInputError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _module(dtype=torch.float32, **kwargs) -> T2TModule:
    torch.manual_seed(0)
    options = dict(img_size=32, in_chans=3, embed_dim=24, token_dim=8) | kwargs
    return T2TModule(**options).to(dtype)


def _published_forward(module: T2TModule, x: torch.Tensor) -> torch.Tensor:
    """The published forward (square inputs): folds tokens back with int(sqrt(N))."""

    def attention(layer, tokens):
        normed = layer.norm1(tokens)
        q, k, v = layer.attn.qkv(normed).chunk(3, dim=-1)
        scale = normed.shape[-1] ** -0.5  # published: head_dim of the *input* width
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        tokens = v + layer.attn.proj(attn @ v)
        hidden = layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.norm2(tokens))))
        return tokens + hidden

    def fold(tokens):
        batch, count, channels = tokens.shape
        side = int(math.sqrt(count))
        return tokens.transpose(1, 2).reshape(batch, channels, side, side)

    tokens = attention(module.attention1, module.soft_split0(x).transpose(1, 2))
    tokens = attention(module.attention2, module.soft_split1(fold(tokens)).transpose(1, 2))
    return module.project(module.soft_split2(fold(tokens)).transpose(1, 2))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("size", [32, 45, 64])
def test_matches_published_forward_on_square_inputs(size, dtype, tol):
    module = _module(dtype).eval()
    x = torch.randn(2, 3, size, size, dtype=dtype)
    with torch.no_grad():
        assert _rel(module(x), _published_forward(module, x)) <= tol


@pytest.mark.parametrize("size", [(32, 48), (45, 61), (19, 100)])
def test_non_square_sizes_follow_the_unfold_formula(size):
    module = _module().eval()
    height, width = size
    with torch.no_grad():
        out = module(torch.randn(2, 3, height, width))
    for kernel, stride, padding in ((7, 4, 2), (3, 2, 1), (3, 2, 1)):
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
    assert out.shape == (2, height * width, 24)
    assert module.grid_size(*size) == (height, width)


def test_num_patches():
    assert T2TModule(img_size=224, embed_dim=16, token_dim=8).num_patches == 14 * 14
    assert T2TModule(img_size=100, embed_dim=16, token_dim=8).num_patches == 7 * 7


def test_published_state_dict_keys():
    keys = set(_module().state_dict())
    for layer in ("attention1", "attention2"):
        for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            assert {f"{layer}.{name}.weight", f"{layer}.{name}.bias"} <= keys
        assert f"{layer}.attn.qkv.weight" in keys and f"{layer}.attn.qkv.bias" not in keys
    assert {"project.weight", "project.bias"} <= keys
    assert _module().attention1.attn.qkv.in_features == 3 * 7 * 7


def test_training_step_changes_weights():
    module = _module().train()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    for name, p in module.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_export_keeps_sizes_dynamic():
    module = _module().eval()
    dims = {
        0: Dim("batch", min=1, max=64),
        2: Dim("h", min=32, max=512),
        3: Dim("w", min=32, max=512),
    }
    program = torch.export.export(module, (torch.randn(2, 3, 32, 32),), dynamic_shapes=(dims,))
    for size in [(45, 61), (64, 64), (33, 97)]:
        x = torch.randn(3, 3, *size)
        with torch.no_grad():
            assert _rel(program.module()(x), module(x)) <= 1e-6


def test_errors():
    with pytest.raises(UserInputError, match="token_dim"):
        T2TModule(token_dim=0)
    with pytest.raises(UserInputError, match=r"\(B, 3, H, W\)"):
        _module()(torch.randn(1, 4, 32, 32))


# T2T-ViT's Token_performer (models/token_performer.py): one kqv Linear (with bias) split as
# k, q, v; positive random features from the saved matrix w; MLP as Sequential(0, GELU, 2).
def _performer_keys(dim: int, emb: int) -> dict[str, tuple[int, ...]]:
    m = int(emb * 0.5)
    keys = {"kqv.weight": (3 * emb, dim), "kqv.bias": (3 * emb,), "w": (m, emb)}
    keys |= {"proj.weight": (emb, emb), "proj.bias": (emb,)}
    keys |= {"norm1.weight": (dim,), "norm1.bias": (dim,), "norm2.weight": (emb,)}
    keys |= {"norm2.bias": (emb,), "mlp.0.weight": (emb, emb), "mlp.0.bias": (emb,)}
    return keys | {"mlp.2.weight": (emb, emb), "mlp.2.bias": (emb,)}


def _published_performer(
    state: dict, prefix: str, x: torch.Tensor, training: bool = False
) -> torch.Tensor:
    """The published performer layer, written from its equations with plain tensor ops; its
    two Dropout(0.1) (after proj, at the end of the MLP) act in training mode."""
    p = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    f = torch.nn.functional
    emb, m = p["proj.weight"].shape[0], p["w"].shape[0]
    normed = f.layer_norm(x, (x.shape[-1],), p["norm1.weight"], p["norm1.bias"])
    kqv = f.linear(normed, p["kqv.weight"], p["kqv.bias"])
    k, q, v = kqv[..., :emb], kqv[..., emb : 2 * emb], kqv[..., 2 * emb :]

    def prm(t):
        half_norm = (t * t).sum(-1, keepdim=True).expand(*t.shape[:-1], m) / 2
        return torch.exp(torch.einsum("bti,mi->btm", t, p["w"]) - half_norm) / math.sqrt(m)

    kp, qp = prm(k), prm(q)
    d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)
    kptv = torch.einsum("bin,bim->bnm", v, kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (d.expand(-1, -1, emb) + 1e-8)
    y = v + f.dropout(f.linear(y, p["proj.weight"], p["proj.bias"]), 0.1, training)
    hidden = f.layer_norm(y, (emb,), p["norm2.weight"], p["norm2.bias"])
    hidden = f.linear(
        f.gelu(f.linear(hidden, p["mlp.0.weight"], p["mlp.0.bias"])),
        p["mlp.2.weight"],
        p["mlp.2.bias"],
    )
    return y + f.dropout(hidden, 0.1, training)


def _published_performer_state(in_chans, token_dim, embed_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer, dim in (("attention1", in_chans * 49), ("attention2", token_dim * 9)):
        for key, shape in _performer_keys(dim, token_dim).items():
            scale = 1.0 if key == "w" else 0.2
            state[f"{layer}.{key}"] = scale * torch.randn(shape, generator=generator, dtype=dtype)
    state["project.weight"] = torch.randn(
        embed_dim, token_dim * 9, generator=generator, dtype=dtype
    )
    state["project.bias"] = torch.randn(embed_dim, generator=generator, dtype=dtype)
    return state


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_performer_loads_published_keys_strictly_and_computes_the_same(dtype, tol, training):
    """Also in training mode (issue 19 case 10): the published four Dropout(0.1) draw the
    same masks from the same RNG state (before: no dropout, 0.20 off in training)."""
    state = _published_performer_state(3, 8, 24, dtype)
    module = T2TModule(img_size=32, embed_dim=24, token_dim=8, tokens_type="performer")
    module = module.to(dtype).train(training)
    dropouts = [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    assert [m.p for m in dropouts] == [0.1] * 4
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    module.load_state_dict(state, strict=True)
    assert not module.attention1.w.requires_grad  # a saved, fixed random-feature matrix
    x = torch.randn(2, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    tokens = module.soft_split0(x).transpose(1, 2)
    tokens = _published_performer(state, "attention1.", tokens, training)
    grid = tokens.transpose(1, 2).reshape(2, 8, 8, 8)
    tokens = module.soft_split1(grid).transpose(1, 2)
    tokens = _published_performer(state, "attention2.", tokens, training)
    grid = tokens.transpose(1, 2).reshape(2, 8, 4, 4)
    expected = torch.nn.functional.linear(
        module.soft_split2(grid).transpose(1, 2), state["project.weight"], state["project.bias"]
    )
    torch.manual_seed(7)
    with torch.no_grad():
        assert _rel(module(x), expected) <= tol


def test_tokens_type_default_and_validation():
    assert _module().tokens_type == "transformer"  # keeps the earlier keys (attn.qkv, mlp.fc1)
    performer = _module(tokens_type="performer")
    w = performer.attention2.w
    assert w.shape == (4, 8)
    # Orthogonal rows scaled by √m, as published.
    torch.testing.assert_close(w @ w.t(), 4.0 * torch.eye(4), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserInputError, match="tokens_type"):
        _module(tokens_type="convolution")
