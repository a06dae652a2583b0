"""Model loaders (the seed's ``load_*`` helpers, in its argument order) and ``MODELS``, the name → builder table.

A builder takes ``(config, input_shape, output_dim, **options)`` — ``input_shape`` without the batch dimension, e.g.
(3, 32, 32) or (64,); ``options`` are settings some models read (``beta``, ``voting_method``, ``heads``) — and
returns a model whose layers are an ``nn.ModuleList`` called ``blocks``. ``build_model`` checks the name and shapes
first. The Transformers (``vit``, ``gpt``) live in ``transformers.py``, imported when the first one is built.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .feedforward_nn import (Activation, EnsembleFeedForwardCNN, EnsembleFeedForwardNetwork, FeedForwardCNN,
                             FeedForwardNetwork, ResidualFeedForwardCNN)

# ResNets use the 3×3 stride-1 stem without max-pool up to this input width: the ImageNet stem would shrink a 32×32
# image to 8×8 before the first stage.
CIFAR_STEM_MAX_WIDTH = 64


def load_feedforward(config: Sequence[int], input_dim: int, output_dim: int,
                     activation: Activation = nn.ReLU, final_activation: Activation = None) -> FeedForwardNetwork:
    return FeedForwardNetwork(config, input_dim, output_dim, activation, final_activation)


def load_feedforward_cnn(config: Sequence[int], in_channels: int, output_dim: int,
                         activation: Activation = nn.ReLU, final_activation: Activation = None,
                         batch_norm: bool = True, stem_stride: int = 2) -> FeedForwardCNN:
    return FeedForwardCNN(config, in_channels, output_dim, activation, final_activation, batch_norm, stem_stride)


def load_residual_feedforward_cnn(config: Sequence[int], in_channels: int, output_dim: int, beta: float = 0.5,
                                  activation: Activation = nn.ReLU, final_activation: Activation = None,
                                  batch_norm: bool = True, stem_stride: int = 2) -> ResidualFeedForwardCNN:
    return ResidualFeedForwardCNN(config, in_channels, output_dim, beta, activation, final_activation,
                                  batch_norm, stem_stride)


def load_feedforward_ensemble(configs: Sequence[Sequence[int]], input_dim: int, output_dim: int,
                              voting_method: str = "average", **member_kwargs) -> EnsembleFeedForwardNetwork:
    return EnsembleFeedForwardNetwork(configs, input_dim, output_dim, voting_method, **member_kwargs)


def load_feedforward_cnn_ensemble(configs: Sequence[Sequence[int]], in_channels: int, output_dim: int,
                                  voting_method: str = "average", **member_kwargs) -> EnsembleFeedForwardCNN:
    return EnsembleFeedForwardCNN(configs, in_channels, output_dim, voting_method, **member_kwargs)


def load_resnet18(num_classes: int = 1000, cifar_stem: bool = False, pretrained: bool = False,
                  *, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (10 blocks); see ``resnets.resnet18``. The ResNets' module loads with the first one built."""
    from .resnets import resnet18
    return resnet18(num_classes, cifar_stem, pretrained, in_channels=in_channels)


def load_resnet34(num_classes: int = 1000, cifar_stem: bool = False, pretrained: bool = False,
                  *, in_channels: int = 3) -> nn.Module:
    """ResNet-34 (18 blocks); see ``resnets.resnet34``."""
    from .resnets import resnet34
    return resnet34(num_classes, cifar_stem, pretrained, in_channels=in_channels)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0  # numpy ints too


def _widths(name: str, config: object) -> list[int]:
    if isinstance(config, (list, tuple)) and config and all(_is_positive_int(w) for w in config):
        return [int(w) for w in config]
    raise ValueError(f"model {name!r} needs config to be a non-empty list of positive ints "
                     f"(one width per layer, e.g. [16, 16]), got {config!r}")


def _member_widths(name: str, config: object) -> list[list[int]]:
    if (isinstance(config, (list, tuple)) and config and all(
            isinstance(row, (list, tuple)) and row and all(_is_positive_int(w) for w in row) for row in config)):
        return [[int(w) for w in row] for row in config]
    raise ValueError(f"model {name!r} needs config to be a non-empty list of non-empty lists of positive ints "
                     f"(one row per member, e.g. [[16, 16], [32, 32]]), got {config!r}")


def _channels(name: str, input_shape: tuple[int, ...]) -> int:
    """The channels of a (C, H, W) input shape; ValueError for any other rank."""
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs a 3-D input_shape (C, H, W), got {tuple(input_shape)!r}")
    return input_shape[0]


def _resnet(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A builder for a fixed-architecture ResNet: config is ignored; small inputs get the CIFAR stem."""
    def build(config: object, input_shape: tuple[int, ...], output_dim: int, **options: Any) -> nn.Module:
        return factory(output_dim, cifar_stem=input_shape[-1] <= CIFAR_STEM_MAX_WIDTH,
                       in_channels=_channels(name, input_shape))
    return build


def _transformer(name: str) -> Callable[..., nn.Module]:
    """A builder of ``vit`` or ``gpt`` (``transformers.py``, imported with the first one built)."""
    def build(config: object, input_shape: tuple[int, ...], output_dim: int, heads: int = 0,
              **options: Any) -> nn.Module:
        from .transformers import CharTransformer, VisionTransformer
        model = VisionTransformer if name == "vit" else CharTransformer
        return model(config, input_shape, output_dim, heads=heads)
    return build


# Models whose default config is their own: the shared --config default [16, 32, 32] (unequal widths, meant for
# the CNNs) does not suit a Transformer, so dol1.py gives these models this config when --config is not given.
DEFAULT_CONFIGS: dict[str, list[int]] = {"vit": [64, 64], "gpt": [64, 64]}
# Models of token sequences: they and only they take the language_model task (python_docs).
LANGUAGE_MODELS = ("gpt",)


def task_mismatch(model: str, dataset: str, task: str) -> str | None:
    """Why ``model`` cannot train on ``dataset`` of ``task`` (a language model on other data, another model on
    text), or None."""
    if model in LANGUAGE_MODELS and task != "language_model":
        return (f"--model {model} is a character language model: it needs a text data set (--dataset_name "
                f"python_docs), not {dataset} (a {task} task)")
    if model not in LANGUAGE_MODELS and task == "language_model":
        return (f"--dataset_name {dataset} is a language_model task (sequences of character ids): only "
                f"--model {' | '.join(LANGUAGE_MODELS)} takes it, not {model}")
    return None


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear_nn": lambda config, shape, out, **o: FeedForwardNetwork(  # MLP with identity activations
        _widths("linear_nn", config), math.prod(shape), out, activation=nn.Identity),
    "mlp": lambda config, shape, out, **o: FeedForwardNetwork(_widths("mlp", config), math.prod(shape), out),
    "cnn": lambda config, shape, out, **o: FeedForwardCNN(_widths("cnn", config), _channels("cnn", shape), out),
    "residual_cnn": lambda config, shape, out, beta=0.5, **o: ResidualFeedForwardCNN(
        _widths("residual_cnn", config), _channels("residual_cnn", shape), out, beta=beta),
    "cnn_ensemble": lambda config, shape, out, voting_method="average", **o: EnsembleFeedForwardCNN(
        _member_widths("cnn_ensemble", config), _channels("cnn_ensemble", shape), out, voting_method),
    "feedforward_ensemble": lambda config, shape, out, voting_method="average", **o: EnsembleFeedForwardNetwork(
        _member_widths("feedforward_ensemble", config), math.prod(shape), out, voting_method),
    "ResNet18": _resnet("ResNet18", load_resnet18),
    "ResNet34": _resnet("ResNet34", load_resnet34),
    "vit": _transformer("vit"),  # small Vision Transformer (transformers.py, loaded when built)
    "gpt": _transformer("gpt"),  # small decoder-only character Transformer (transformers.py)
}


def build_model(name: str, config: object, input_shape: Sequence[int], output_dim: int, **options: Any) -> nn.Module:
    """Build the model registered under ``name`` in ``MODELS`` (in training mode, on the CPU).

    Raises:
        ValueError: an unknown name, a malformed config, an input shape the model cannot take, or a bad option
            value (beta outside [0, 1], an unknown voting method, heads that do not divide a Transformer's width).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else ()
    if not shape or not all(_is_positive_int(d) for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    if not _is_positive_int(output_dim):
        raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
    return MODELS[name](config, tuple(int(d) for d in shape), int(output_dim), **options)
