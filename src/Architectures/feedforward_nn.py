"""Block-aware feed-forward models: MLP, plain CNN, residual CNN and their ensembles.

Every model keeps its layers in an ``nn.ModuleList`` called ``blocks`` and every
parameter lives in exactly one block. For the single models ``forward`` is literally
``for block in self.blocks: x = block(x)``, so an engine may run a frozen prefix of
blocks under ``torch.no_grad()`` and then train one block on the cached activation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

# A module class (``nn.ReLU``), a module instance (copied per use) or None (identity).
Activation = type[nn.Module] | Callable[[], nn.Module] | nn.Module | None


def _make_activation(activation: Activation) -> nn.Module:
    """Return a fresh activation module; None means identity."""
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        # A copy, so that activations with parameters (PReLU) stay in one block.
        return copy.deepcopy(activation)
    return activation()


def _check_widths(config: Sequence[int], what: str = "config") -> list[int]:
    """Return ``config`` as a list, raising ValueError unless it is a non-empty list of positive ints."""
    widths = list(config) if isinstance(config, (list, tuple)) else None
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{what} must be a non-empty list of positive ints (one width per layer), got {config!r}")
    return widths


def _check_beta(beta: float) -> float:
    """Return ``beta``, raising ValueError unless it lies in [0, 1]."""
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
    """Any list of modules as a block model: ``blocks[0]`` … ``blocks[-1]`` applied in order.

    For tiny models in tests, notebooks and benchmarks, e.g. ``BlockSequential([nn.Linear(4, 5), nn.Tanh(),
    nn.Linear(5, 3)])``; every engine and measurement unit takes it like the built-in models.
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


# ---------------------------------------------------------------- MLP blocks


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
    """Hidden layer: Linear + activation."""

    def __init__(self, input_dim: int, output_dim: int, activation: Activation = nn.ReLU) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class FinalBlock(nn.Module):
    """Output layer: Linear + optional final activation (identity when None)."""

    def __init__(self, input_dim: int, output_dim: int, final_activation: Activation = None) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)
        self.activation = _make_activation(final_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class FeedForwardNetwork(_Blockwise):
    """Fully connected network with one block per linear layer.

    Blocks: ``InitialBlock`` (flatten, input_dim → config[0]), ``LinearBlock`` for each
    consecutive pair of widths, ``FinalBlock`` (config[-1] → output_dim); len(config) + 1 in all.

    Args:
        config: hidden widths, e.g. ``[64, 64]``.
        input_dim: number of input features (C·H·W for images).
        output_dim: number of outputs (classes or regression targets).
        activation: hidden activation class, or None for identity (a linear network).
        final_activation: activation after the last layer, or None.

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


# ---------------------------------------------------------------- CNN blocks


class ConvBlock(nn.Module):
    """3×3 convolution (padding 1) + optional BatchNorm2d + activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 activation: Activation = nn.ReLU, batch_norm: bool = True) -> None:
        super().__init__()
        # The conv bias is redundant in front of BatchNorm (BN subtracts the mean).
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
    """Plain CNN with one ``ConvBlock`` per config entry and a ``HeadBlock``.

    The first conv uses stride ``stem_stride`` (32×32 inputs become 16×16, which keeps CPU
    training cheap); the others use stride 1. len(blocks) = len(config) + 1.

    Args:
        config: channel widths, e.g. ``[16, 32, 32]``.
        in_channels: input channels (3 for RGB).
        output_dim: number of outputs.
        activation: activation class after each conv, or None for identity.
        final_activation: activation after the head's Linear, or None.
        batch_norm: put a BatchNorm2d after each conv.
        stem_stride: stride of the first conv.

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
    """Residual block mixing skip and residual branch with weight ``beta``.

    ``out = act(beta · skip(x) + (1 − beta) · F(x))`` with
    ``F = conv3×3 → BN → act → conv3×3 → BN`` and ``skip`` the identity when the channel
    count is unchanged, otherwise a 1×1 conv projection (+ BN). beta = 1 passes the skip
    path only, beta = 0 the residual branch only; with ReLU, beta = 0.5 gives half the usual
    ResNet output act(skip(x) + F(x)).

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
        # A channel change needs a projection on the skip path: the identity cannot add tensors of two widths.
        self.skip = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=not batch_norm), norm(out_channels))
        self.activation = _make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.beta * self.skip(x) + (1.0 - self.beta) * self.residual(x))


class ResidualFeedForwardCNN(_Blockwise):
    """CNN of residual blocks: a conv stem, one ``ResidualBlock`` per width change, a head.

    Block 0 is a ``ConvBlock`` in_channels → config[0] with stride ``stem_stride``; block i
    (1 ≤ i < len(config)) is ``ResidualBlock(config[i-1], config[i], beta)`` computing
    ``act(beta · skip(x) + (1 − beta) · F(x))`` (see ``ResidualBlock``); the last block is the
    ``HeadBlock``. len(blocks) = len(config) + 1. The seed's default is config [8] * 5, beta 0.5.

    Raises:
        ValueError: if ``config`` is not a non-empty list of positive ints or beta is outside [0, 1].
    """

    def __init__(self, config: Sequence[int], in_channels: int, output_dim: int, beta: float = 0.5,
                 activation: Activation = nn.ReLU, final_activation: Activation = None,
                 batch_norm: bool = True, stem_stride: int = 2) -> None:
        super().__init__()
        widths = _check_widths(config)
        beta = _check_beta(beta)
        blocks: list[nn.Module] = [ConvBlock(in_channels, widths[0], stem_stride, activation, batch_norm)]
        blocks += [ResidualBlock(c_in, c_out, beta, activation, batch_norm)
                   for c_in, c_out in zip(widths, widths[1:])]
        blocks.append(HeadBlock(widths[-1], output_dim, final_activation))
        self.blocks = nn.ModuleList(blocks)


# ---------------------------------------------------------------- ensembles


def _average_vote(outputs: torch.Tensor, training: bool) -> torch.Tensor:
    """Mean over members: (M, N, D) → (N, D)."""
    return outputs.mean(dim=0)


def _random_vote(outputs: torch.Tensor, training: bool) -> torch.Tensor:
    """One random member per sample while training; the mean in evaluation."""
    if not training:
        return outputs.mean(dim=0)
    n_members, n_samples = outputs.shape[:2]
    chosen = torch.randint(n_members, (n_samples,), device=outputs.device)
    return outputs[chosen, torch.arange(n_samples, device=outputs.device)]


VOTING_METHODS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "average": _average_vote,
    "random": _random_vote,
}


def _check_voting(voting_method: str) -> str:
    """Return ``voting_method``, raising ValueError unless it is a key of ``VOTING_METHODS``."""
    if voting_method not in VOTING_METHODS:
        raise ValueError(f"unknown voting_method {voting_method!r}; valid: {sorted(VOTING_METHODS)}")
    return voting_method


def _check_member_configs(configs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Return ``configs`` as a list of width lists, raising ValueError if it is not a 2-D config."""
    rows = list(configs) if isinstance(configs, (list, tuple)) else None
    if not rows or not all(isinstance(row, (list, tuple)) for row in rows):
        raise ValueError("configs must be a non-empty list of non-empty lists of positive ints "
                         f"(one row per member), got {configs!r}")
    return [_check_widths(row, f"configs[{i}]") for i, row in enumerate(rows)]


class _Ensemble(nn.Module):
    """Base of the ensembles: members, their concatenated blocks and the vote."""

    def __init__(self, members: list[nn.Module], voting_method: str) -> None:
        super().__init__()
        self.voting_method = _check_voting(voting_method)
        self.members = nn.ModuleList(members)
        # The same block objects as in the members, not copies: training a block of
        # ``self.blocks`` trains the member. (state_dict lists these tensors under both
        # ``members.*`` and ``blocks.*``, as PyTorch does for any shared module.)
        self.blocks = nn.ModuleList([block for member in members for block in member.blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x) for member in self.members])  # (M, N, D)
        return VOTING_METHODS[self.voting_method](outputs, self.training)


class EnsembleFeedForwardNetwork(_Ensemble):
    """Ensemble of ``FeedForwardNetwork`` members, one per row of a 2-D config.

    ``blocks`` concatenates the members' blocks in member order (the same modules).
    Voting: ``"average"`` averages the member outputs; ``"random"`` picks one random member
    per sample while training (``self.training``) and averages in eval mode, so reported
    accuracy is deterministic (a random vote in evaluation would make the reported accuracy random).

    Args:
        configs: one width list per member, e.g. ``[[16, 16], [32, 32]]``.
        input_dim, output_dim: as for ``FeedForwardNetwork``.
        voting_method: a key of ``VOTING_METHODS``.
        **member_kwargs: passed to every member (activation, final_activation).

    Raises:
        ValueError: for a malformed config or an unknown voting method.
    """

    def __init__(self, configs: Sequence[Sequence[int]], input_dim: int, output_dim: int,
                 voting_method: str = "average", **member_kwargs) -> None:
        rows = _check_member_configs(configs)
        _check_voting(voting_method)
        super().__init__([FeedForwardNetwork(row, input_dim, output_dim, **member_kwargs) for row in rows],
                         voting_method)


class EnsembleFeedForwardCNN(_Ensemble):
    """Ensemble of ``FeedForwardCNN`` members, one per row of a 2-D config.

    ``blocks`` concatenates the members' blocks in member order (the same modules);
    [[16, 16], [32, 32], [32, 64]] gives 9 blocks. Voting: ``"average"`` averages the member
    outputs; ``"random"`` picks one random member per sample while training and averages in
    eval mode.

    Args:
        configs: one channel-width list per member.
        in_channels, output_dim: as for ``FeedForwardCNN``.
        voting_method: a key of ``VOTING_METHODS``.
        **member_kwargs: passed to every member (activation, batch_norm, stem_stride, ...).

    Raises:
        ValueError: for a malformed config or an unknown voting method.
    """

    def __init__(self, configs: Sequence[Sequence[int]], in_channels: int, output_dim: int,
                 voting_method: str = "average", **member_kwargs) -> None:
        rows = _check_member_configs(configs)
        _check_voting(voting_method)
        super().__init__([FeedForwardCNN(row, in_channels, output_dim, **member_kwargs) for row in rows],
                         voting_method)
