"""Small Transformers with blocks: ``vit`` (a Vision Transformer for images) and ``gpt`` (a decoder-only character
model), imported by their builders in ``Models.py`` on first use (a run of the other models never imports this).

Both have the same block layout (``blocks`` is an ``nn.ModuleList``, every parameter in exactly one block, and
``forward`` is ``for block in blocks: x = block(x)``):

* block 0, the embedding: ``vit`` cuts the image into patches (a strided convolution), prepends a class token and
  adds learned positions; ``gpt`` adds learned token and position embeddings. Out: (N, S, width).
* blocks 1 … L, one per Transformer layer, pre-LayerNorm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``
  (both residuals inside the block; MLP width 4·width, GELU). ``gpt``'s attention is causal.
* block L + 1, the head: final LayerNorm + Linear; ``vit`` classifies from the class token (N, classes), ``gpt``
  predicts the next character at every position (N, T, vocabulary).

``config`` lists one width per layer and they must be equal (``[64, 64, 64]``: three layers of width 64); ``heads``
0 means width // 16. ``vit`` takes (C, H, W) inputs and picks its patch size from them (:func:`patch_size`: an 8×8
grid of patches, 4×4 patches on 32×32 images); ``gpt`` takes (T,) integer inputs and its context length T from them.

Attention is written as plain matrix products and a softmax (no fused kernel, no ``scaled_dot_product_attention``):
``torch.func``'s ``vmap(jvp(grad))`` has no rule for the fused kernels, and the Hessian units need exactly that. There
is no dropout anywhere: a Hessian probe must see the same function every time.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .feedforward_nn import _Blockwise

HEAD_WIDTH = 16  # heads = 0 means width // HEAD_WIDTH (heads of 16 dimensions)
PATCH_GRID = 8  # vit: patch = image side // PATCH_GRID, so a 32×32 image is an 8×8 grid of 4×4 patches
MLP_RATIO = 4
# Token and position embeddings start as N(0, 1) (nn.Embedding's default), not GPT-2's N(0, 0.02): at these widths and
# the default Adam step 0.01, 60 steps reached test loss 2.19 (gpt, python_docs) and 1.58 (vit, digits) with 1.0,
# 2.71 and 2.28 with 0.02: small positions drown in the first LayerNorm, so the model barely sees where a token is.
EMBED_STD = 1.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layer_shape(name: str, config: object, heads: int = 0) -> tuple[int, int, int]:
    """(width, layers, heads) of a ``vit``/``gpt`` config.

    Raises:
        ValueError: naming ``config`` (or ``--heads``) and the valid choice: widths that are not positive ints or
            differ, a width not divisible by the heads, a width below 16 with ``heads = 0``, negative heads.
    """
    ok = isinstance(config, (list, tuple)) and config and all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0 for w in config)
    if not ok or len(set(config)) != 1:
        raise ValueError(f"model {name!r} needs config to be one positive width per Transformer layer, all equal (e.g. "
                         f"--config \"[64, 64]\": two layers of width 64), got {config!r}")
    width = int(config[0])
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 0:
        raise ValueError(f"model {name!r} needs --heads >= 0 (0 = width // {HEAD_WIDTH}), got {heads!r}")
    valid = f"valid --heads for width {width}: {_divisors(width)}"
    if heads == 0 and width < HEAD_WIDTH:
        raise ValueError(f"model {name!r}: config {config!r} has width {width} < {HEAD_WIDTH}, so --heads 0 "
                         f"(width // {HEAD_WIDTH}) gives no head; give a config width >= {HEAD_WIDTH} or {valid}")
    n_heads = heads or width // HEAD_WIDTH
    if width % n_heads:
        given = f"--heads {heads}" if heads else f"--heads 0 (width // {HEAD_WIDTH} = {n_heads})"
        raise ValueError(f"model {name!r}: width {width} of config {config!r} is not divisible by {given}; {valid}")
    return width, len(config), n_heads


def patch_size(height: int, width: int) -> int:
    """The ViT patch side for an image: side // 8 (an 8×8 grid of patches), lowered until it divides both sides;
    4 on 32×32 images (digits, MNIST and CIFAR here), 28 on 224×224, 1 below 16×16."""
    patch = max(1, min(height, width) // PATCH_GRID)
    while height % patch or width % patch:
        patch -= 1
    return patch


def attention(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Multi-head self-attention from the packed projections ``qkv`` (N, S, 3·width) -> (N, S, width).

    Plain matrix products and a softmax on purpose (not ``scaled_dot_product_attention`` or a fused kernel), so
    that ``torch.func`` can take Hessian-vector products (``vmap(jvp(grad))``) through it.
    """
    n, s, three_width = qkv.shape
    width = three_width // 3
    q, k, v = qkv.view(n, s, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each (N, heads, S, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)  # (N, heads, S, S)
    if causal:
        future = torch.ones(s, s, dtype=torch.bool, device=qkv.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, s, width)


class TransformerLayer(nn.Module):
    """One pre-LayerNorm Transformer layer, both residuals inside: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.GELU(), nn.Linear(MLP_RATIO * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, S, width) -> (N, S, width)
        x = x + self.proj(attention(self.qkv(self.norm1(x)), self.heads, self.causal))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """ViT block 0: (N, C, H, W) -> (N, 1 + patches, width): patches by a strided convolution, a class token in
    front, learned positions added."""

    def __init__(self, channels: int, height: int, width_px: int, patch: int, width: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, 1 + (height // patch) * (width_px // patch), width) * EMBED_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (N, patches, width)
        return torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1) + self.position


class TokenEmbedding(nn.Module):
    """GPT block 0: character ids (N, T) -> (N, T, width), token plus learned position embeddings."""

    def __init__(self, vocabulary: int, context: int, width: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocabulary, width)
        nn.init.normal_(self.token.weight, std=EMBED_STD)
        self.position = nn.Parameter(torch.randn(1, context, width) * EMBED_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token(ids) + self.position[:, :ids.shape[1]]


class Head(nn.Module):
    """The last block: LayerNorm + Linear, on the class token (``vit``: (N, classes)) or on every position
    (``gpt``: (N, T, vocabulary))."""

    def __init__(self, width: int, output_dim: int, class_token: bool) -> None:
        super().__init__()
        self.class_token = class_token
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x[:, 0] if self.class_token else x))


class VisionTransformer(_Blockwise):
    """``vit``: PatchEmbedding, one TransformerLayer per config entry, Head on the class token; len(config) + 2
    blocks. ``input_shape`` is (C, H, W)."""

    def __init__(self, config: Sequence[int], input_shape: Sequence[int], output_dim: int, heads: int = 0) -> None:
        super().__init__()
        width, layers, heads = layer_shape("vit", config, heads)
        if len(input_shape) != 3:
            raise ValueError(f"model 'vit' needs a 3-D input_shape (C, H, W) (images), got {tuple(input_shape)!r}")
        channels, height, width_px = input_shape
        self.patch = patch_size(height, width_px)
        self.blocks = nn.ModuleList([PatchEmbedding(channels, height, width_px, self.patch, width),
                                     *(TransformerLayer(width, heads, causal=False) for _ in range(layers)),
                                     Head(width, output_dim, class_token=True)])


class CharTransformer(_Blockwise):
    """``gpt``: TokenEmbedding, one causal TransformerLayer per config entry, Head at every position; len(config)
    + 2 blocks. ``input_shape`` is (T,), the context; ``output_dim`` the vocabulary size."""

    def __init__(self, config: Sequence[int], input_shape: Sequence[int], output_dim: int, heads: int = 0) -> None:
        super().__init__()
        width, layers, heads = layer_shape("gpt", config, heads)
        if len(input_shape) != 1:
            raise ValueError(f"model 'gpt' needs a 1-D input_shape (T,) (sequences of character ids), got "
                             f"{tuple(input_shape)!r}")
        self.context = int(input_shape[0])
        self.blocks = nn.ModuleList([TokenEmbedding(output_dim, self.context, width),
                                     *(TransformerLayer(width, heads, causal=True) for _ in range(layers)),
                                     Head(width, output_dim, class_token=False)])
