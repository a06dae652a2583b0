"""ResNet-18/34 as a list of blocks, weight-compatible with torchvision.

``model.blocks`` is ``[stem, BasicBlock × sum(layers), head]`` (10 blocks for ResNet-18,
18 for ResNet-34) and ``forward`` applies them in order. Inside the blocks the submodules
keep torchvision's names (``conv1``, ``bn1``, ``downsample.0``, ``fc``), and two state-dict
hooks translate between our module paths and torchvision's keys:

    blocks.0.conv1.weight        <->  conv1.weight
    blocks.3.downsample.0.weight <->  layer2.0.downsample.0.weight
    blocks.9.fc.bias             <->  fc.bias

so ``state_dict()`` has exactly torchvision's keys and ``load_state_dict`` accepts them with
``strict=True`` in both directions. ``named_parameters()`` keeps the internal ``blocks.*``
names (that is what engines iterate over); ``load_state_dict`` accepts those too.

torchvision itself is imported only when pretrained weights are requested.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
from torch import nn

_PRETRAINED_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights"}
_IMAGENET_CLASSES = 1000


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class Stem(nn.Module):
    """conv1 → bn1 → relu → maxpool; with ``cifar_stem`` a 3×3 stride-1 conv and no max-pool."""

    def __init__(self, in_channels: int = 3, cifar_stem: bool = False) -> None:
        super().__init__()
        if cifar_stem:
            self.conv1 = _conv3x3(in_channels, 64)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # Not in place here or below: engines cache block inputs and torch.func transforms
        # reject some in-place updates; the logits are the same as torchvision's.
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4); H, W with cifar_stem


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3×3 convs plus the (possibly projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Head(nn.Module):
    """Global average pool → flatten → fc."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (N, num_classes)


def _rename(key: str, table: dict[str, str]) -> str:
    """Replace the longest of the key's one- or two-component prefixes found in ``table``."""
    parts = key.split(".")
    for n in (2, 1):
        head = ".".join(parts[:n]) + "."
        if len(parts) > n and head in table:
            return table[head] + key[len(head):]
    return key


def _rename_in_place(state_dict: dict, prefix: str, table: dict[str, str]) -> None:
    """Rename the keys under ``prefix`` with ``table``, keeping the order of all keys."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            key = prefix + _rename(key[len(prefix):], table)
        state_dict[key] = value


def _to_torchvision_keys(module: ResNet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _rename_in_place(state_dict, prefix, module._to_torchvision)


def _from_torchvision_keys(module: ResNet, state_dict: dict, prefix: str, *args) -> None:
    module._load_prefix = prefix  # read by _report_torchvision_keys, right after this load
    _rename_in_place(state_dict, prefix, module._from_torchvision)


def _report_torchvision_keys(module: ResNet, incompatible_keys) -> None:
    # Missing/unexpected keys are reported under torchvision's names, as the user wrote them.
    prefix = module._load_prefix
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + _rename(k[len(prefix):], module._to_torchvision) if k.startswith(prefix) else k
                   for k in keys]


class ResNet(nn.Module):
    """ResNet with BasicBlocks (ResNet-18/34) whose blocks are stem, each BasicBlock, head.

    ``state_dict()`` uses torchvision's keys (see the module docstring), so weights move
    between this model and ``torchvision.models.resnet18/34`` with ``strict=True``.

    Args:
        layers: BasicBlocks per stage, [2, 2, 2, 2] for ResNet-18, [3, 4, 6, 3] for ResNet-34.
        num_classes: outputs of the fc layer.
        cifar_stem: 3×3 stride-1 first conv and no max-pool, for small (e.g. 32×32) inputs.
            The keys stay torchvision's, but conv1.weight then has shape (64, C, 3, 3) instead
            of (64, C, 7, 7), so such weights do not load into torchvision's model (nor back).
        in_channels: input channels (3 for torchvision-compatible weights).
        zero_init_residual: zero the last BN of each residual branch (arXiv 1706.02677).
    """

    def __init__(self, layers: Sequence[int], num_classes: int = _IMAGENET_CLASSES, cifar_stem: bool = False,
                 in_channels: int = 3, zero_init_residual: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = [Stem(in_channels, cifar_stem)]
        self._to_torchvision = {"blocks.0.": ""}
        inplanes = 64
        for stage, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            for i in range(n_blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                self._to_torchvision[f"blocks.{len(blocks)}."] = f"layer{stage}.{i}."
                blocks.append(BasicBlock(inplanes, planes, stride))
                inplanes = planes
        self._to_torchvision[f"blocks.{len(blocks)}."] = ""
        blocks.append(Head(inplanes, num_classes))
        self.blocks = nn.ModuleList(blocks)

        # torchvision names stem and head children at the top level (conv1., fc.), the
        # BasicBlocks as layer<s>.<i>.
        self._from_torchvision = {f"{name}.": f"blocks.0.{name}." for name, _ in blocks[0].named_children()}
        self._from_torchvision.update({f"{name}.": f"blocks.{len(blocks) - 1}.{name}."
                                       for name, _ in blocks[-1].named_children()})
        self._from_torchvision.update({tv: ours for ours, tv in self._to_torchvision.items() if tv})
        self._load_prefix = ""
        self.register_state_dict_post_hook(_to_torchvision_keys)
        self.register_load_state_dict_pre_hook(_from_torchvision_keys)
        self.register_load_state_dict_post_hook(_report_torchvision_keys)

        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _load_pretrained(model: ResNet, arch: str) -> None:
    """Load torchvision's ImageNet weights for ``arch`` into ``model``.

    Raises:
        RuntimeError: if the weights cannot be obtained (no network and no cached download).
    """
    import torchvision  # lazy: only pretrained weights need torchvision

    weights = getattr(torchvision.models, _PRETRAINED_WEIGHTS[arch]).IMAGENET1K_V1
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise RuntimeError(
            f"could not load pretrained {arch} weights: pretrained weights need network access / a cached "
            f"download at {torch.hub.get_dir()} ({type(err).__name__}: {err})") from err
    model.load_state_dict(state_dict)


def _build(arch: str, layers: Sequence[int], num_classes: int, cifar_stem: bool, pretrained: bool,
           in_channels: int) -> ResNet:
    if pretrained and (num_classes != _IMAGENET_CLASSES or cifar_stem or in_channels != 3):
        raise ValueError(f"pretrained {arch} weights need num_classes={_IMAGENET_CLASSES}, cifar_stem=False and "
                         f"in_channels=3, got num_classes={num_classes}, cifar_stem={cifar_stem}, "
                         f"in_channels={in_channels}")
    model = ResNet(layers, num_classes, cifar_stem, in_channels)
    if pretrained:
        _load_pretrained(model, arch)
    return model


def resnet18(num_classes: int = _IMAGENET_CLASSES, cifar_stem: bool = False, pretrained: bool = False,
             *, in_channels: int = 3) -> ResNet:
    """ResNet-18 (10 blocks), weight-compatible with ``torchvision.models.resnet18``.

    Args:
        num_classes: outputs of the fc layer.
        cifar_stem: 3×3 stride-1 stem without max-pool for small inputs (see ``ResNet``).
        pretrained: load torchvision's ImageNet weights (downloads them unless cached).
        in_channels: input channels.

    Raises:
        ValueError: if pretrained is combined with num_classes != 1000, cifar_stem or in_channels != 3.
        RuntimeError: if pretrained weights cannot be downloaded or read; random weights are never returned.
    """
    return _build("resnet18", (2, 2, 2, 2), num_classes, cifar_stem, pretrained, in_channels)


def resnet34(num_classes: int = _IMAGENET_CLASSES, cifar_stem: bool = False, pretrained: bool = False,
             *, in_channels: int = 3) -> ResNet:
    """ResNet-34 (18 blocks), weight-compatible with ``torchvision.models.resnet34``.

    Args and Raises: as for ``resnet18``.
    """
    return _build("resnet34", (3, 4, 6, 3), num_classes, cifar_stem, pretrained, in_channels)
