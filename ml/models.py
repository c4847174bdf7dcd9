"""The model zoo: the architectures and `build_model` (the checkpoint format's I/O is ml/checkpoints.py).

Every model takes NCHW float images in [0, 1] at the dataset's native shape and normalises inside
itself (the RobustBench convention), so attacks, pseudo-labelling and evaluation all work in pixel
space and an epsilon of 8/255 means 8/255 of a pixel. A built model is always

    nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=<architecture>))

and the state_dict keys ("normalize.mean", "net.conv1.weight", ...) are part of the checkpoint
format: the architectures below keep the attribute names of the reference code they copy, so the
official MART / TRADES / RST weights load under the "net." prefix.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import UserError

# Per-channel statistics of the training images in [0, 1], used as the Normalize layer's defaults.
DATASET_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}

# Used when a dataset has no known statistics: maps [0, 1] to roughly [-2, 2].
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25



class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers so they travel with the state_dict and the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --- small CNNs for CPU work and unit tests -------------------------------------------------------

def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """~0.86M parameters; adversarially trains on Fashion-MNIST on a 2-core CPU in minutes.

    One convolution at full resolution, then two at half: a second 32->32 convolution at 28x28 cost
    37% of the FLOPs, and removing it made a MART step 1.6x faster on a 2-core AVX2 CPU; with the
    examples that bought, the demo went from 75.35% to 80.45% clean (README, demo; augmentation was
    turned off in the same run).
    The adaptive pool to 7x7 keeps spatial information while making 28x28 (identity) and 32x32
    inputs give the same flattened size, so one definition serves both datasets without lazy layers
    (which cannot load a state_dict before their first forward).
    """
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes),
    )


def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """~38K parameters, for tests that must train in seconds; BatchNorm kept so that tests exercise
    the train/eval distinction the real models have."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 16), *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
    )


# --- ResNet-18, CIFAR variant (kuangliu/pytorch-cifar, as used by MART and TRADES) ---------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016) as in Rice et al.'s robust_overfitting code: the 1x1
    shortcut has no BatchNorm and takes the activated input."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """3x3 stem, no max-pool, four stages of 64/128/256/512. `preact` selects Rice et al.'s
    PreActResNet layout (no stem BN, a final BN-ReLU before pooling)."""

    def __init__(self, block: type, num_blocks: Sequence[int], num_classes: int, in_channels: int,
                 preact: bool = False):
        super().__init__()
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        # The reference uses avg_pool2d(out, 4), identical at 32x32; adaptive also accepts 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- WideResNet as in TRADES / MART / RST ---------------------------------------------------------

class WideBasic(nn.Module):
    """The TRADES/MART WRN block: BN-ReLU-conv pre-activation; when the width changes, the 1x1
    shortcut sees the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
            return x + out
        x = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(x))))
        return self.convShortcut(x) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen without dropout. The TRADES/MART file also builds an unused `sub_block1`
    that is never called in forward; it is left out here (it would only add dead parameters)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        # The reference init: He-normal with fan_out for convs, BN at identity, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        # The reference uses avg_pool2d(out, 8), identical at 32x32; adaptive also accepts 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# Architecture name -> constructor(num_classes, in_channels). ResNets keep PyTorch's default init,
# as their reference code does; the WRNs apply their own.
ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "tiny-cnn": tiny_cnn,
    "small-cnn": small_cnn,
    "resnet18": lambda k, c: ResNet(BasicBlock, [2, 2, 2, 2], k, c),
    "preact-resnet18": lambda k, c: ResNet(PreActBlock, [2, 2, 2, 2], k, c, preact=True),
    "wrn-16-4": lambda k, c: WideResNet(16, 4, k, c),
    "wrn-28-10": lambda k, c: WideResNet(28, 10, k, c),
    "wrn-34-10": lambda k, c: WideResNet(34, 10, k, c),
}


def _channel_stats(values: Sequence[float] | None, default: float, in_channels: int,
                   what: str) -> list[float]:
    if values is None:
        return [default] * in_channels
    values = [float(v) for v in values]
    if len(values) != in_channels:
        raise UserError(f"The normalisation {what} {values} has {len(values)} entries but the model "
                        f"takes {in_channels} input channel(s); give one value per channel.")
    return values


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Normalize + architecture, taking images in [0, 1]; mean/std default to 0.5/0.25 per channel."""
    if arch not in ARCHS:
        raise UserError(f"Unknown model architecture {arch!r}; choose one of {sorted(ARCHS)}.")
    mean = _channel_stats(mean, DEFAULT_MEAN, in_channels, "mean")
    std = _channel_stats(std, DEFAULT_STD, in_channels, "std")
    if any(s <= 0 for s in std):
        raise UserError(f"The normalisation std {std} must be positive in every channel.")
    return nn.Sequential(OrderedDict(
        normalize=Normalize(mean, std), net=ARCHS[arch](int(num_classes), int(in_channels))))


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters alike (buffers such as BN statistics and mean/std excluded)."""
    return sum(p.numel() for p in model.parameters())
