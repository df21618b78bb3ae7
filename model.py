"""Models: torchvision ResNet classifiers and UResNet segmenters, both taking [0, 1] images.

Normalisation is the first layer of every model, so attacks work in pixel units: an
``eps`` of 8/255 means 8 grey levels of the image the user sees.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils import ToolError, UsageError

DEPTHS = (18, 34, 50, 101, 152)
TASKS = ("classification", "segmentation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Output channels of the four decoder stages (at 1/16, 1/8, 1/4 and 1/2 of the input size).
DECODER_CHANNELS = (128, 64, 32, 32)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std kept as buffers (saved in checkpoints)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UsageError(f"mean/std need 3 values each and std > 0, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _resnet(depth: int, pretrained: bool) -> models.ResNet:
    if depth not in DEPTHS:
        raise UsageError(f"unknown depth {depth}; choose one of {', '.join(map(str, DEPTHS))}")
    builder = getattr(models, f"resnet{depth}")
    if not pretrained:
        return builder(weights=None)
    weights = models.get_model_weights(f"resnet{depth}").DEFAULT
    try:
        return builder(weights=weights)
    except Exception as err:  # network errors come in many types (URLError, OSError, ...)
        raise ToolError(f"cannot fetch ImageNet weights for resnet{depth} ({type(err).__name__}: {err}); "
                        "put them in the torch hub cache (TORCH_HOME) or train without --pretrained") from err


class ResNetClassifier(nn.Module):
    """torchvision ResNet with a ``num_classes`` head, preceded by :class:`Normalize`."""

    def __init__(self, depth: int, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, pretrained: bool = False) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = _resnet(depth, pretrained)
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class DecoderStage(nn.Module):
    """Upsample x2, concatenate the skip connection, fuse with one residual ResNet block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bottleneck: bool) -> None:
        super().__init__()
        fused = in_channels + skip_channels
        shortcut = nn.Sequential(nn.Conv2d(fused, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        if bottleneck:
            self.block: nn.Module = Bottleneck(fused, out_channels // Bottleneck.expansion, downsample=shortcut)
        else:
            self.block = BasicBlock(fused, out_channels, downsample=shortcut)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class UResNet(nn.Module):
    """U-Net whose encoder is a torchvision ResNet and whose decoder stages are ResNet blocks.

    Basic blocks decode depths 18/34, bottleneck blocks 50/101/152. Each decoder stage fuses
    one encoder skip (layer3, layer2, layer1, stem); the last works at half resolution and the
    logits are upsampled bilinearly x2, as in DeepLab: a full-resolution stage made the CPU
    training step 1.7x slower. Returns per-pixel logits (no softmax) at the input resolution
    for any input size: inputs are padded to a multiple of 32 inside and the logits cropped.
    """

    def __init__(self, depth: int, num_classes: int = 3, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, pretrained: bool = False) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        net = _resnet(depth, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.encoder = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        bottleneck = depth >= 50
        expansion = Bottleneck.expansion if bottleneck else BasicBlock.expansion
        skips = [256 * expansion, 128 * expansion, 64 * expansion, 64]
        channels = [512 * expansion, *DECODER_CHANNELS]
        self.decoder = nn.ModuleList(
            DecoderStage(channels[i], skips[i], channels[i + 1], bottleneck) for i in range(len(skips)))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = self.normalize(x)
        pad_h, pad_w = (-height) % 32, (-width) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        stem = self.stem(x)
        features = [stem]
        y = self.pool(stem)
        for layer in self.encoder:
            y = layer(y)
            features.append(y)
        for stage, skip in zip(self.decoder, reversed(features[:-1])):
            y = stage(y, skip)
        logits = F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def build_model(task: str, depth: int, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, pretrained: bool = False) -> nn.Module:
    """The classifier or segmenter for ``task``; both take [0, 1] images."""
    if task == "classification":
        return ResNetClassifier(depth, num_classes, mean, std, pretrained)
    if task == "segmentation":
        return UResNet(depth, num_classes, mean, std, pretrained)
    raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


#: (convolution, batch norm) attribute pairs of torchvision's ResNet, BasicBlock and Bottleneck.
_CONV_BN_ATTRIBUTES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm2d folded into the Conv2d before it.

    In eval mode a batch norm is a fixed per-channel affine map, so the folded network is the
    same function up to float rounding (logits move by ~1e-6) while each attack step skips
    the batch norms' forward and backward and keeps fewer activations for it (ResNet18 at
    128 px on a 2-core CPU: 1.15x faster sweeps; UResNet18: 135 MB less peak memory). The
    original ``model`` is left untouched.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
        for conv_name, bn_name in _CONV_BN_ATTRIBUTES:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded


def _fold_sequential(sequence: nn.Sequential) -> None:
    children = list(sequence)
    for i in range(len(children) - 1):
        if isinstance(children[i], nn.Conv2d) and isinstance(children[i + 1], nn.BatchNorm2d):
            sequence[i] = fuse_conv_bn_eval(children[i], children[i + 1])
            sequence[i + 1] = nn.Identity()
