"""Model loaders and the name → builder table used by the frame factory.

The ``load_*`` helpers keep the seed's argument order. ``MODELS`` maps each model name of
the command line to a builder with one uniform signature::

    builder(config, input_shape, output_dim, *, beta=0.5, voting_method="average") -> nn.Module

where ``input_shape`` excludes the batch dimension, e.g. (3, 32, 32) or (64,).
``build_model`` validates the name, the config and the input shape before building.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

from torch import nn

from .feedforward_nn import (
    Activation,
    EnsembleFeedForwardCNN,
    EnsembleFeedForwardNetwork,
    FeedForwardCNN,
    FeedForwardNetwork,
    ResidualFeedForwardCNN,
)
from .resnets import ResNet, resnet18, resnet34

# ResNets switch to the 3×3 stride-1 stem without max-pool at or below this input width:
# the ImageNet stem would shrink a 32×32 image to 8×8 before the first stage.
CIFAR_STEM_MAX_WIDTH = 64


# ---------------------------------------------------------------- loaders (seed argument order)


def load_feedforward(config: Sequence[int], input_dim: int, output_dim: int,
                     activation: Activation = nn.ReLU, final_activation: Activation = None) -> FeedForwardNetwork:
    """Build a ``FeedForwardNetwork`` (one block per linear layer)."""
    return FeedForwardNetwork(config, input_dim, output_dim, activation, final_activation)


def load_feedforward_cnn(config: Sequence[int], in_channels: int, output_dim: int,
                         activation: Activation = nn.ReLU, final_activation: Activation = None,
                         batch_norm: bool = True, stem_stride: int = 2) -> FeedForwardCNN:
    """Build a ``FeedForwardCNN`` (one block per conv layer, plus the head)."""
    return FeedForwardCNN(config, in_channels, output_dim, activation, final_activation, batch_norm, stem_stride)


def load_residual_feedforward_cnn(config: Sequence[int], in_channels: int, output_dim: int, beta: float = 0.5,
                                  activation: Activation = nn.ReLU, final_activation: Activation = None,
                                  batch_norm: bool = True, stem_stride: int = 2) -> ResidualFeedForwardCNN:
    """Build a ``ResidualFeedForwardCNN`` (stem, one residual block per width pair, head)."""
    return ResidualFeedForwardCNN(config, in_channels, output_dim, beta, activation, final_activation,
                                  batch_norm, stem_stride)


def load_feedforward_ensemble(configs: Sequence[Sequence[int]], input_dim: int, output_dim: int,
                              voting_method: str = "average", **member_kwargs) -> EnsembleFeedForwardNetwork:
    """Build an ``EnsembleFeedForwardNetwork`` with one MLP member per config row."""
    return EnsembleFeedForwardNetwork(configs, input_dim, output_dim, voting_method, **member_kwargs)


def load_feedforward_cnn_ensemble(configs: Sequence[Sequence[int]], in_channels: int, output_dim: int,
                                  voting_method: str = "average", **member_kwargs) -> EnsembleFeedForwardCNN:
    """Build an ``EnsembleFeedForwardCNN`` with one CNN member per config row."""
    return EnsembleFeedForwardCNN(configs, in_channels, output_dim, voting_method, **member_kwargs)


def load_resnet18(num_classes: int = 1000, cifar_stem: bool = False, pretrained: bool = False,
                  *, in_channels: int = 3) -> ResNet:
    """Build ResNet-18 (10 blocks); see ``resnets.resnet18`` for the options and errors."""
    return resnet18(num_classes, cifar_stem, pretrained, in_channels=in_channels)


def load_resnet34(num_classes: int = 1000, cifar_stem: bool = False, pretrained: bool = False,
                  *, in_channels: int = 3) -> ResNet:
    """Build ResNet-34 (18 blocks); see ``resnets.resnet34`` for the options and errors."""
    return resnet34(num_classes, cifar_stem, pretrained, in_channels=in_channels)


# ---------------------------------------------------------------- validation


def _is_positive_int(value: object) -> bool:
    # numbers.Integral also admits numpy integers (shapes read from arrays).
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _widths(name: str, config: object) -> list[int]:
    """Return a 1-D config as a list, or raise ValueError naming the model and the bad config."""
    if isinstance(config, (list, tuple)) and config and all(_is_positive_int(w) for w in config):
        return [int(w) for w in config]
    raise ValueError(f"model {name!r} needs config to be a non-empty list of positive ints "
                     f"(one width per layer, e.g. [16, 16]), got {config!r}")


def _member_widths(name: str, config: object) -> list[list[int]]:
    """Return a 2-D config as a list of lists, or raise ValueError naming the model and the bad config."""
    if (isinstance(config, (list, tuple)) and config
            and all(isinstance(row, (list, tuple)) and row and all(_is_positive_int(w) for w in row)
                    for row in config)):
        return [[int(w) for w in row] for row in config]
    raise ValueError(f"model {name!r} needs config to be a non-empty list of non-empty lists of positive ints "
                     f"(one row per member, e.g. [[16, 16], [32, 32]]), got {config!r}")


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return a (C, H, W) input shape, or raise ValueError for any other rank."""
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs a 3-D input_shape (C, H, W), got {tuple(input_shape)!r}")
    return tuple(input_shape)


# ---------------------------------------------------------------- the table


def _linear_nn(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
               voting_method: str = "average") -> nn.Module:
    """MLP with identity activations (a deep linear network)."""
    return FeedForwardNetwork(_widths("linear_nn", config), math.prod(input_shape), output_dim,
                              activation=nn.Identity)


def _mlp(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
         voting_method: str = "average") -> nn.Module:
    """MLP with ReLU activations."""
    return FeedForwardNetwork(_widths("mlp", config), math.prod(input_shape), output_dim, activation=nn.ReLU)


def _cnn(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
         voting_method: str = "average") -> nn.Module:
    """Plain CNN with BatchNorm and a stride-2 first conv."""
    channels, _, _ = _image_shape("cnn", input_shape)
    return FeedForwardCNN(_widths("cnn", config), channels, output_dim)


def _residual_cnn(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
                  voting_method: str = "average") -> nn.Module:
    """Residual CNN mixing skip and residual paths with ``beta``."""
    channels, _, _ = _image_shape("residual_cnn", input_shape)
    return ResidualFeedForwardCNN(_widths("residual_cnn", config), channels, output_dim, beta=beta)


def _cnn_ensemble(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
                  voting_method: str = "average") -> nn.Module:
    """Ensemble of plain CNNs, one per config row."""
    channels, _, _ = _image_shape("cnn_ensemble", input_shape)
    return EnsembleFeedForwardCNN(_member_widths("cnn_ensemble", config), channels, output_dim,
                                  voting_method=voting_method)


def _feedforward_ensemble(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
                          voting_method: str = "average") -> nn.Module:
    """Ensemble of ReLU MLPs, one per config row."""
    return EnsembleFeedForwardNetwork(_member_widths("feedforward_ensemble", config), math.prod(input_shape),
                                      output_dim, voting_method=voting_method)


def _resnet_builder(name: str, factory: Callable[..., ResNet]) -> Callable[..., nn.Module]:
    def build(config: object, input_shape: tuple[int, ...], output_dim: int, *, beta: float = 0.5,
              voting_method: str = "average") -> nn.Module:
        # config is ignored: the architecture is fixed. Small inputs get the CIFAR stem.
        channels, _, width = _image_shape(name, input_shape)
        return factory(output_dim, cifar_stem=width <= CIFAR_STEM_MAX_WIDTH, in_channels=channels)

    build.__doc__ = (f"{name}; config is ignored; inputs at most {CIFAR_STEM_MAX_WIDTH} pixels wide "
                     "get the CIFAR stem (3×3 stride-1 conv, no max-pool).")
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear_nn": _linear_nn,
    "mlp": _mlp,
    "cnn": _cnn,
    "residual_cnn": _residual_cnn,
    "cnn_ensemble": _cnn_ensemble,
    "feedforward_ensemble": _feedforward_ensemble,
    "ResNet18": _resnet_builder("ResNet18", resnet18),
    "ResNet34": _resnet_builder("ResNet34", resnet34),
}


def build_model(name: str, config: object, input_shape: Sequence[int], output_dim: int, **options) -> nn.Module:
    """Build the model registered under ``name`` in ``MODELS``.

    Args:
        name: a key of ``MODELS``.
        config: widths ([16, 16]) for MLP/CNN models, one row per member ([[16], [32, 32]]) for
            ensembles; ignored by the ResNets.
        input_shape: one sample's shape without the batch dimension, e.g. (3, 32, 32) or (64,).
        output_dim: number of outputs (classes or regression targets).
        **options: ``beta`` (residual_cnn) and ``voting_method`` (ensembles).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: for an unknown name, a malformed config, an input shape the model cannot
            take, or a bad option value (beta outside [0, 1], unknown voting method).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else ()
    if not shape or not all(_is_positive_int(d) for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    shape = tuple(int(d) for d in shape)
    if not _is_positive_int(output_dim):
        raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
    return MODELS[name](config, shape, int(output_dim), **options)
