"""Block-aware feed-forward models: MLP, plain CNN, residual CNN and their ensembles.

Every model keeps its layers in an ``nn.ModuleList`` called ``blocks`` and every parameter lives in exactly one
block. For the single models ``forward`` is ``for block in self.blocks: x = block(x)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

# A module class (``nn.ReLU``), a module instance (copied per use) or None (identity).
Activation = type[nn.Module] | Callable[[], nn.Module] | nn.Module | None


def _make_activation(activation: Activation) -> nn.Module:
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)  # a copy, so that activations with parameters (PReLU) stay in one block
    return activation()


def _check_widths(config: Sequence[int], what: str = "config") -> list[int]:
    widths = list(config) if isinstance(config, (list, tuple)) else None
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{what} must be a non-empty list of positive ints (one width per layer), got {config!r}")
    return widths


def _check_beta(beta: float) -> float:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    return float(beta)


class _Blockwise(nn.Module):
    """Base of all single models: ``forward`` applies ``self.blocks`` in order."""

    blocks: nn.ModuleList

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BlockSequential(_Blockwise):
    """Any list of modules as a block model, e.g. ``BlockSequential([nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)])``
    for tiny models in tests, notebooks and benchmarks; every engine and unit takes it like the built-in models."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class InitialBlock(nn.Module):
    """Flatten the input (images ``(N, C, H, W)`` or vectors ``(N, D)``), then Linear + activation."""

    def __init__(self, input_dim: int, output_dim: int, activation: Activation = nn.ReLU) -> None:
        super().__init__()
        self.flatten = nn.Flatten(start_dim=1)
        self.linear = nn.Linear(input_dim, output_dim)
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(self.flatten(x)))  # (N, output_dim)


class LinearBlock(nn.Module):
    """Linear + activation: a hidden layer (``FinalBlock``: the output layer, with an optional final activation)."""

    def __init__(self, input_dim: int, output_dim: int, activation: Activation = nn.ReLU) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class FinalBlock(LinearBlock):
    def __init__(self, input_dim: int, output_dim: int, final_activation: Activation = None) -> None:
        super().__init__(input_dim, output_dim, final_activation)


class FeedForwardNetwork(_Blockwise):
    """Fully connected network, one block per linear layer: ``InitialBlock`` (input_dim → config[0]), a
    ``LinearBlock`` per pair of widths, ``FinalBlock`` (config[-1] → output_dim); len(config) + 1 blocks.
    ``activation=None`` gives a deep linear network.

    Raises:
        ValueError: if ``config`` is not a non-empty list of positive ints.
    """

    def __init__(self, config: Sequence[int], input_dim: int, output_dim: int,
                 activation: Activation = nn.ReLU, final_activation: Activation = None) -> None:
        super().__init__()
        widths = _check_widths(config)
        blocks: list[nn.Module] = [InitialBlock(input_dim, widths[0], activation)]
        blocks += [LinearBlock(w_in, w_out, activation) for w_in, w_out in zip(widths, widths[1:])]
        blocks.append(FinalBlock(widths[-1], output_dim, final_activation))
        self.blocks = nn.ModuleList(blocks)


class ConvBlock(nn.Module):
    """3×3 convolution (padding 1) + optional BatchNorm2d + activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 activation: Activation = nn.ReLU, batch_norm: bool = True) -> None:
        super().__init__()
        # the conv bias is redundant in front of BatchNorm (BN subtracts the mean)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn(self.conv(x)))  # (N, out_channels, H / stride, W / stride)


class HeadBlock(nn.Module):
    """Global average pool + flatten + Linear + optional final activation."""

    def __init__(self, in_channels: int, output_dim: int, final_activation: Activation = None) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, output_dim)
        self.activation = _make_activation(final_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(torch.flatten(self.pool(x), 1)))  # (N, output_dim)


class FeedForwardCNN(_Blockwise):
    """Plain CNN: one ``ConvBlock`` per config entry and a ``HeadBlock``; len(config) + 1 blocks. The first conv
    has stride ``stem_stride`` (32×32 inputs become 16×16, which keeps CPU training cheap), the others stride 1.

    Raises:
        ValueError: if ``config`` is not a non-empty list of positive ints.
    """

    def __init__(self, config: Sequence[int], in_channels: int, output_dim: int,
                 activation: Activation = nn.ReLU, final_activation: Activation = None,
                 batch_norm: bool = True, stem_stride: int = 2) -> None:
        super().__init__()
        widths = _check_widths(config)
        blocks: list[nn.Module] = [ConvBlock(in_channels, widths[0], stem_stride, activation, batch_norm)]
        blocks += [ConvBlock(c_in, c_out, 1, activation, batch_norm) for c_in, c_out in zip(widths, widths[1:])]
        blocks.append(HeadBlock(widths[-1], output_dim, final_activation))
        self.blocks = nn.ModuleList(blocks)


class ResidualBlock(nn.Module):
    """``out = act(beta · skip(x) + (1 − beta) · F(x))`` with ``F = conv3×3 → BN → act → conv3×3 → BN`` and ``skip``
    the identity, or a 1×1 conv projection (+ BN) when the channel count changes. beta = 1 passes the skip path
    only, beta = 0 the residual branch only; beta = 0.5 with ReLU is half the usual ResNet output.

    Raises:
        ValueError: if beta is outside [0, 1].
    """

    def __init__(self, in_channels: int, out_channels: int, beta: float = 0.5,
                 activation: Activation = nn.ReLU, batch_norm: bool = True) -> None:
        super().__init__()
        self.beta = _check_beta(beta)

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm), norm(out_channels),
            _make_activation(activation),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batch_norm), norm(out_channels),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=not batch_norm), norm(out_channels))
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.beta * self.skip(x) + (1.0 - self.beta) * self.residual(x))


class ResidualFeedForwardCNN(_Blockwise):
    """Residual CNN: a ``ConvBlock`` stem (stride ``stem_stride``), ``ResidualBlock(config[i-1], config[i], beta)``
    for i ≥ 1, a ``HeadBlock``; len(config) + 1 blocks.

    Raises:
        ValueError: if ``config`` is not a non-empty list of positive ints or beta is outside [0, 1].
    """

    def __init__(self, config: Sequence[int], in_channels: int, output_dim: int, beta: float = 0.5,
                 activation: Activation = nn.ReLU, final_activation: Activation = None,
                 batch_norm: bool = True, stem_stride: int = 2) -> None:
        super().__init__()
        widths, beta = _check_widths(config), _check_beta(beta)
        blocks: list[nn.Module] = [ConvBlock(in_channels, widths[0], stem_stride, activation, batch_norm)]
        blocks += [ResidualBlock(c_in, c_out, beta, activation, batch_norm)
                   for c_in, c_out in zip(widths, widths[1:])]
        blocks.append(HeadBlock(widths[-1], output_dim, final_activation))
        self.blocks = nn.ModuleList(blocks)


def _average_vote(outputs: torch.Tensor, training: bool) -> torch.Tensor:
    return outputs.mean(dim=0)  # (M, N, D) → (N, D)


def _random_vote(outputs: torch.Tensor, training: bool) -> torch.Tensor:
    """One random member per sample while training; the mean in evaluation (so reported accuracy is not random)."""
    if not training:
        return outputs.mean(dim=0)
    n_members, n_samples = outputs.shape[:2]
    chosen = torch.randint(n_members, (n_samples,), device=outputs.device)
    return outputs[chosen, torch.arange(n_samples, device=outputs.device)]


VOTING_METHODS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {"average": _average_vote,
                                                                           "random": _random_vote}


class _Ensemble(nn.Module):
    """Members and their vote; ``blocks`` concatenates the members' blocks in member order — the same modules, not
    copies, so training a block of ``self.blocks`` trains the member ([[16, 16], [32, 32], [32, 64]]: 9 blocks).

    Raises:
        ValueError: for a malformed 2-D config or an unknown voting method.
    """

    def __init__(self, configs: Sequence[Sequence[int]], member: Callable[[list[int]], nn.Module],
                 voting_method: str) -> None:
        super().__init__()
        if voting_method not in VOTING_METHODS:
            raise ValueError(f"unknown voting_method {voting_method!r}; valid: {sorted(VOTING_METHODS)}")
        rows = list(configs) if isinstance(configs, (list, tuple)) else None
        if not rows or not all(isinstance(row, (list, tuple)) for row in rows):
            raise ValueError("configs must be a non-empty list of non-empty lists of positive ints "
                             f"(one row per member), got {configs!r}")
        self.voting_method = voting_method
        self.members = nn.ModuleList([member(_check_widths(row, f"configs[{i}]")) for i, row in enumerate(rows)])
        self.blocks = nn.ModuleList([block for m in self.members for block in m.blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x) for member in self.members])  # (M, N, D)
        return VOTING_METHODS[self.voting_method](outputs, self.training)


class EnsembleFeedForwardNetwork(_Ensemble):
    """Ensemble of ``FeedForwardNetwork`` members, one per row of ``configs``; ``member_kwargs`` go to each."""

    def __init__(self, configs: Sequence[Sequence[int]], input_dim: int, output_dim: int,
                 voting_method: str = "average", **member_kwargs) -> None:
        super().__init__(configs, lambda row: FeedForwardNetwork(row, input_dim, output_dim, **member_kwargs),
                         voting_method)


class EnsembleFeedForwardCNN(_Ensemble):
    """Ensemble of ``FeedForwardCNN`` members, one per row of ``configs``; ``member_kwargs`` go to each."""

    def __init__(self, configs: Sequence[Sequence[int]], in_channels: int, output_dim: int,
                 voting_method: str = "average", **member_kwargs) -> None:
        super().__init__(configs, lambda row: FeedForwardCNN(row, in_channels, output_dim, **member_kwargs),
                         voting_method)
