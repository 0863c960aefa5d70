"""Tokens-to-Token module of T2T-ViT (Yuan et al., ICCV 2021), transformer and performer.

Progressive soft split: the image is unfolded into overlapping 7x7 patches (stride 4,
padding 2), a token transformer layer mixes the tokens, the tokens are folded back into an
image-shaped grid, unfolded again into 3x3 patches (stride 2, padding 1), mixed again,
folded, unfolded once more (3x3, stride 2, padding 1) and projected to ``embed_dim``.

The published code folds tokens back with ``int(sqrt(N))``: square inputs only, and under
export the traced size is baked into the graph, which then fails at other resolutions
(https://github.com/yitu-opensource/T2T-ViT, ``models/t2t_vit.py``). Here every grid
size comes from the unfold formula
floor((L + 2p − d(k − 1) − 1) / s) + 1 applied to the input's height and width, so
non-square inputs work and exported graphs keep dynamic H/W.

State-dict keys follow the published ``T2T_module`` with ``tokens_type='transformer'``
(``attention1.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``attention2.*``,
``project``). The token attention keeps the published details: one head, no qkv bias, the
scale computed from the *input* token width (dim**-0.5), and the residual taken from v
because the layer changes the token width.

``tokens_type="performer"`` uses the published ``Token_performer``
(https://github.com/yitu-opensource/T2T-ViT/blob/main/models/token_performer.py), the
default of the released T2t_vit_7…24 checkpoints: linear attention with m = emb/2 positive
random features φ(x) = exp(Wx − |x|²/2)/√m, W a fixed orthogonal matrix scaled by √m and
saved as the parameter ``w`` (not trained), so

    y = v + proj( φ(q)·(φ(k)ᵀv) / (φ(q)·Σ_t φ(k_t) + ε) ),   out = y + MLP(LN(y))

with k, q, v split from one ``kqv`` projection (with bias), in that order, and the published
dropouts (rate 0.1) on proj's output and at the end of the MLP: two per layer, four in
the module, so training mode draws the same masks from the same RNG state. Keys:
``attention{1,2}.{kqv,proj,norm1,norm2,mlp.0,mlp.2,w}``. The published code computes the
features in float32 whatever the input dtype; here they stay in the input's dtype.
T2TModule keeps ``tokens_type="transformer"`` as its default (reparam's earlier behaviour
and state-dict keys); pass ``"performer"`` to load the released T2T-ViT checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reparam.errors import BlockConfigError, UserInputError
from reparam.ops.corr import corr_output_size

__all__ = ["T2TModule", "TokenPerformer", "TokenTransformer"]

TOKENS_TYPES = ("transformer", "performer")

# (kernel, stride, padding) of the three soft splits.
_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


class _TokenAttention(nn.Module):
    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return v + self.proj(attention @ v)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenTransformer(nn.Module):
    """T2T's token transformer layer: (B, N, dim) → (B, N, out_dim).

    x ↦ a = attn(LN(x)) (residual from v); a + MLP(LN(a)).

    Args:
        dim: input token width.
        out_dim: output token width (the published ``in_dim``).
        mlp_ratio: MLP hidden width / out_dim.
        qkv_bias: bias on the qkv projection.
    """

    def __init__(
        self, dim: int, out_dim: int, mlp_ratio: float = 1.0, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _TokenAttention(dim, out_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = _Mlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """T2T's performer token layer: (B, N, dim) → (B, N, out_dim), linear in N.

    Args:
        dim: input token width.
        out_dim: output token width (the published ``in_dim``; one head).
        kernel_ratio: random features m = int(out_dim · kernel_ratio).
        dropout: rate of the two published dropouts (after ``proj`` and at the end of the
            MLP; 0.1 as published), active in training mode only.
    """

    epsilon = 1e-8  # keeps the normaliser away from 0, as published

    def __init__(
        self, dim: int, out_dim: int, kernel_ratio: float = 0.5, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.emb = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(dropout)  # on proj's output, before the residual (published dp1)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        # The published MLP ends in Dropout(dp2): keys mlp.0 / mlp.2, index 3 has none.
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, out_dim),
            nn.GELU(),
            nn.Linear(out_dim, out_dim),
            nn.Dropout(dropout),
        )
        self.m = max(1, int(out_dim * kernel_ratio))
        features = nn.init.orthogonal_(torch.empty(self.m, out_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(features, requires_grad=False)

    def random_features(self, x: Tensor) -> Tensor:
        """φ(x) = exp(w·x − |x|²/2) / √m, (B, T, emb) → (B, T, m)."""
        return torch.exp(x @ self.w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def forward(self, x: Tensor) -> Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)
        normaliser = qp @ kp.sum(1).unsqueeze(-1)  # (B, T, 1)
        y = (qp @ (kp.transpose(1, 2) @ v)) / (normaliser + self.epsilon)
        y = v + self.dp(self.proj(y))  # the residual from v: the layer changes the width
        return y + self.mlp(self.norm2(y))


class T2TModule(nn.Module):
    """Tokens-to-Token: three soft splits with two token transformer layers in between.

    Args:
        img_size: nominal (square) input size; only sets :attr:`num_patches`. Any input
            size works in :meth:`forward`.
        in_chans: input channels.
        embed_dim: output token width.
        token_dim: token width inside the module.
        mlp_ratio: MLP hidden width / token_dim of the token transformers.
        tokens_type: ``"transformer"`` (default here) or ``"performer"`` (the published
            default, for the released T2t_vit_7…24 weights; its MLP width is token_dim).

    Input (B, in_chans, H, W); output (B, h·w, embed_dim) with h, w given by
    :meth:`grid_size`.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
        mlp_ratio: float = 1.0,
        tokens_type: str = "transformer",
    ) -> None:
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise BlockConfigError(
                f"T2TModule: tokens_type must be one of {TOKENS_TYPES}, got {tokens_type!r}"
            )
        self.tokens_type = tokens_type
        for name, value in (
            ("img_size", img_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("token_dim", token_dim),
        ):
            if value < 1:
                raise BlockConfigError(f"T2TModule: {name} must be >= 1, got {value}")
        self.img_size, self.in_chans = img_size, in_chans
        self.embed_dim, self.token_dim = embed_dim, token_dim
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        if tokens_type == "performer":
            self.attention1 = TokenPerformer(in_chans * 7 * 7, token_dim)
            self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        else:
            self.attention1 = TokenTransformer(in_chans * 7 * 7, token_dim, mlp_ratio)
            self.attention2 = TokenTransformer(token_dim * 3 * 3, token_dim, mlp_ratio)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        height, width = self.grid_size(img_size, img_size)
        self.num_patches = height * width

    @staticmethod
    def grid_sizes(height, width) -> list[tuple]:
        """Token grid (h, w) after each of the three soft splits, from the unfold formula."""
        sizes = []
        for kernel, stride, padding in _SPLITS:
            height = corr_output_size(height, kernel, stride, padding, 1)
            width = corr_output_size(width, kernel, stride, padding, 1)
            sizes.append((height, width))
        return sizes

    @classmethod
    def grid_size(cls, height, width) -> tuple:
        """Final token grid (h, w) for an input of height × width."""
        return cls.grid_sizes(height, width)[-1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise UserInputError(
                f"T2TModule expects (B, {self.in_chans}, H, W) input, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        (h0, w0), (h1, w1), _ = self.grid_sizes(x.shape[2], x.shape[3])
        tokens = self.attention1(self.soft_split0(x).transpose(1, 2))
        grid = tokens.transpose(1, 2).reshape(batch, self.token_dim, h0, w0)
        tokens = self.attention2(self.soft_split1(grid).transpose(1, 2))
        grid = tokens.transpose(1, 2).reshape(batch, self.token_dim, h1, w1)
        return self.project(self.soft_split2(grid).transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"in_chans={self.in_chans}, embed_dim={self.embed_dim}, "
            f"token_dim={self.token_dim}, num_patches={self.num_patches}, "
            f"tokens_type={self.tokens_type!r}"
        )
