"""Built-in dense-prediction architectures: definitions only, no weights.

The FCNs follow the reference Caffe nets of Long, Shelhamer & Darrell (CVPR
2015), ``voc-fcn32s``, ``voc-fcn16s``, ``voc-fcn8s`` and ``voc-fcn-alexnet``:
conv1 padded by 100, max pooling with ceil rounding, fully connected layers
as convolutions, bilinear transposed convolutions frozen at their initial
weights, and crops whose offsets come from the nets' coordinate maps.

Every FCN exposes ``features`` (everything up to pool5) and ``head``
(fc6 .. score_fr), so ``nn.Sequential(model.features, model.head)`` is the
coarse FCN whose receptive field is the paper's Table 1. All models trace
with ``torch.fx.symbolic_trace``: crops are plain slices with integer literal
starts and stops taken from another tensor's ``.size(k)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pipeline.errors import ModelError

VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
ALEXNET_WIDTHS = (96, 256, 384, 384, 256)


def bilinear_kernel(channels: int, k: int) -> Tensor:
    """Weight ``(channels, channels, k, k)`` of a per-channel bilinear upsampler.

    The FCN reference ``upsample_filt``: each channel is upsampled by itself
    (no mixing across channels) with a separable triangle filter.
    """
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(k, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(channels, channels, k, k)
    diagonal = torch.arange(channels)
    weight[diagonal, diagonal] = taps[:, None] * taps[None, :]
    return weight


def _upscore(channels: int, k: int, stride: int) -> nn.ConvTranspose2d:
    """A bias-free transposed convolution, bilinear and frozen (``lr_mult: 0``)."""
    up = nn.ConvTranspose2d(channels, channels, k, stride=stride, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, k))
    up.weight.requires_grad_(False)
    return up


def _vgg_block(index: int, c_in: int, c_out: int, depth: int) -> nn.Sequential:
    """Block ``index`` (1-based) of VGG16: ``depth`` 3x3 conv+ReLU, then pool."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for j in range(1, depth + 1):
        pad = 100 if (index, j) == (1, 1) else 1
        layers[f"conv{index}_{j}"] = nn.Conv2d(c_in if j == 1 else c_out, c_out, 3, padding=pad)
        layers[f"relu{index}_{j}"] = nn.ReLU(inplace=True)
    layers[f"pool{index}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
    return nn.Sequential(layers)


def _vgg16_features(channels: Sequence[int]) -> nn.Sequential:
    """VGG16 up to pool5 as five named blocks ``block1`` .. ``block5``."""
    if len(channels) != 5:
        raise ModelError(f"VGG16 needs 5 block widths, got {len(channels)}: {tuple(channels)}")
    c_ins = (3, *channels[:-1])
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block{i + 1}", _vgg_block(i + 1, c_ins[i], channels[i], VGG16_DEPTHS[i]))
        for i in range(5)
    )
    return nn.Sequential(blocks)


def _head(c_in: int, fc_channels: int, k: int, num_classes: int) -> nn.Sequential:
    """fc6 (``k`` x ``k``), fc7 (1x1) and score_fr (1x1) as convolutions."""
    return nn.Sequential(
        OrderedDict(
            fc6=nn.Conv2d(c_in, fc_channels, k),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout2d(0.5),
            fc7=nn.Conv2d(fc_channels, fc_channels, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout2d(0.5),
            score_fr=nn.Conv2d(fc_channels, num_classes, 1),
        )
    )


class FCN32s(nn.Module):
    """FCN-32s on VGG16: one 32x bilinear upsampling of the coarse scores."""

    def __init__(self, num_classes: int, channels: Sequence[int], fc_channels: int) -> None:
        super().__init__()
        self.features = _vgg16_features(channels)
        self.head = _head(channels[-1], fc_channels, 7, num_classes)
        self.upscore = _upscore(num_classes, 64, 32)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, num_classes, H, W)`` for an input ``(N, 3, H, W)``."""
        up = self.upscore(self.head(self.features(x)))
        return up[:, :, 19 : 19 + x.size(2), 19 : 19 + x.size(3)]


class FCN16s(nn.Module):
    """FCN-16s on VGG16: coarse scores fused with pool4 scores, then 16x up."""

    def __init__(self, num_classes: int, channels: Sequence[int], fc_channels: int) -> None:
        super().__init__()
        self.features = _vgg16_features(channels)
        self.head = _head(channels[-1], fc_channels, 7, num_classes)
        self.score_pool4 = nn.Conv2d(channels[3], num_classes, 1)
        self.upscore2 = _upscore(num_classes, 4, 2)
        self.upscore16 = _upscore(num_classes, 32, 16)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, num_classes, H, W)`` for an input ``(N, 3, H, W)``."""
        block = self.features.get_submodule
        pool4 = block("block4")(block("block3")(block("block2")(block("block1")(x))))
        up2 = self.upscore2(self.head(block("block5")(pool4)))
        p4 = self.score_pool4(pool4)
        fuse4 = up2 + p4[:, :, 5 : 5 + up2.size(2), 5 : 5 + up2.size(3)]
        up = self.upscore16(fuse4)
        return up[:, :, 27 : 27 + x.size(2), 27 : 27 + x.size(3)]


class FCN8s(nn.Module):
    """FCN-8s on VGG16: coarse scores fused with pool4 and pool3 scores, then 8x up."""

    def __init__(self, num_classes: int, channels: Sequence[int], fc_channels: int) -> None:
        super().__init__()
        self.features = _vgg16_features(channels)
        self.head = _head(channels[-1], fc_channels, 7, num_classes)
        self.score_pool4 = nn.Conv2d(channels[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(channels[2], num_classes, 1)
        self.upscore2 = _upscore(num_classes, 4, 2)
        self.upscore_pool4 = _upscore(num_classes, 4, 2)
        self.upscore8 = _upscore(num_classes, 16, 8)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, num_classes, H, W)`` for an input ``(N, 3, H, W)``."""
        block = self.features.get_submodule
        pool3 = block("block3")(block("block2")(block("block1")(x)))
        pool4 = block("block4")(pool3)
        up2 = self.upscore2(self.head(block("block5")(pool4)))
        p4 = self.score_pool4(pool4)
        fuse4 = up2 + p4[:, :, 5 : 5 + up2.size(2), 5 : 5 + up2.size(3)]
        up4 = self.upscore_pool4(fuse4)
        p3 = self.score_pool3(pool3)
        fuse3 = up4 + p3[:, :, 9 : 9 + up4.size(2), 9 : 9 + up4.size(3)]
        up = self.upscore8(fuse3)
        return up[:, :, 31 : 31 + x.size(2), 31 : 31 + x.size(3)]


def _alexnet_features(channels: Sequence[int]) -> nn.Sequential:
    """AlexNet (CaffeNet order: pool before LRN) up to pool5."""
    if len(channels) != 5:
        raise ModelError(f"AlexNet needs 5 conv widths, got {len(channels)}: {tuple(channels)}")
    c1, c2, c3, c4, c5 = channels
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, c1, 11, stride=4, padding=100),
            relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True),
            norm1=nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
            conv2=nn.Conv2d(c1, c2, 5, padding=2, groups=2),
            relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(3, 2, ceil_mode=True),
            norm2=nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75),
            conv3=nn.Conv2d(c2, c3, 3, padding=1),
            relu3=nn.ReLU(inplace=True),
            conv4=nn.Conv2d(c3, c4, 3, padding=1, groups=2),
            relu4=nn.ReLU(inplace=True),
            conv5=nn.Conv2d(c4, c5, 3, padding=1, groups=2),
            relu5=nn.ReLU(inplace=True),
            pool5=nn.MaxPool2d(3, 2, ceil_mode=True),
        )
    )


class FCNAlexNet(nn.Module):
    """FCN-AlexNet: AlexNet features, fc6 6x6, one 32x upsampling (kernel 63)."""

    def __init__(self, num_classes: int, channels: Sequence[int], fc_channels: int) -> None:
        super().__init__()
        self.features = _alexnet_features(channels)
        self.head = _head(channels[-1], fc_channels, 6, num_classes)
        self.upscore = _upscore(num_classes, 63, 32)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, num_classes, H, W)`` for an input ``(N, 3, H, W)``."""
        up = self.upscore(self.head(self.features(x)))
        return up[:, :, 18 : 18 + x.size(2), 18 : 18 + x.size(3)]


def fcn32s_vgg16(
    num_classes: int = 21, channels: Sequence[int] = VGG16_WIDTHS, fc_channels: int = 4096
) -> FCN32s:
    """FCN-32s (``voc-fcn32s``); ``channels`` are the five VGG16 block widths."""
    return FCN32s(num_classes, channels, fc_channels)


def fcn16s_vgg16(
    num_classes: int = 21, channels: Sequence[int] = VGG16_WIDTHS, fc_channels: int = 4096
) -> FCN16s:
    """FCN-16s (``voc-fcn16s``); ``channels`` are the five VGG16 block widths."""
    return FCN16s(num_classes, channels, fc_channels)


def fcn8s_vgg16(
    num_classes: int = 21, channels: Sequence[int] = VGG16_WIDTHS, fc_channels: int = 4096
) -> FCN8s:
    """FCN-8s (``voc-fcn8s``); ``channels`` are the five VGG16 block widths."""
    return FCN8s(num_classes, channels, fc_channels)


def fcn_alexnet(
    num_classes: int = 21, channels: Sequence[int] = ALEXNET_WIDTHS, fc_channels: int = 4096
) -> FCNAlexNet:
    """FCN-AlexNet (``voc-fcn-alexnet``); widths of conv2, conv4, conv5 inputs must be even."""
    return FCNAlexNet(num_classes, channels, fc_channels)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv (padding 1) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNetSmall(nn.Module):
    """A small U-Net; input height and width must be multiples of ``2 ** depth``."""

    def __init__(self, in_channels: int, num_classes: int, base: int, depth: int) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        c_ins = [in_channels, *widths[:-2]]
        self.down = nn.ModuleList(_double_conv(c, w) for c, w in zip(c_ins, widths[:-1]))
        self.pool = nn.MaxPool2d(2)
        self.bottom = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in reversed(widths[:-1])
        )
        self.merge = nn.ModuleList(_double_conv(2 * w, w) for w in reversed(widths[:-1]))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, num_classes, H, W)`` for an input ``(N, in_channels, H, W)``."""
        skips: list[Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([skip, up(x)], dim=1))
        return self.classifier(x)


def unet_small(
    in_channels: int = 3, num_classes: int = 4, base: int = 8, depth: int = 3
) -> UNetSmall:
    """A small U-Net of ``depth`` poolings; sizes must be multiples of ``2 ** depth``."""
    if depth < 1 or base < 1:
        raise ModelError(f"unet_small needs depth >= 1 and base >= 1, got {depth=}, {base=}")
    return UNetSmall(in_channels, num_classes, base, depth)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fcn32s-vgg16": fcn32s_vgg16,
    "fcn16s-vgg16": fcn16s_vgg16,
    "fcn8s-vgg16": fcn8s_vgg16,
    "fcn-alexnet": fcn_alexnet,
    "unet-small": unet_small,
}


def build(name: str, **kwargs: object) -> nn.Module:
    """The architecture registered as ``name``, built with ``kwargs``."""
    factory = ARCHITECTURES.get(name)
    if factory is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {name!r}; known architectures: {known}")
    return factory(**kwargs)
