"""Small networks for tests: a zoo the receptive-field analysis must handle,
and the nets it must refuse.

Every factory seeds torch itself, so a name always gives the same weights,
and returns a module in eval mode that takes ``(N, 3, H, W)`` inputs and works
in float64 (``ZOO[name]().double()``). ``SIZE_RULES[name]`` says which input
sizes an entry accepts: multiples of ``multiple``, at least ``minimum`` (for
both rows and columns) for a non-empty output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models import fcn8s_vgg16, fcn32s_vgg16, fcn_alexnet, unet_small

TINY_VGG = (2, 3, 4, 4, 4)


class SizeRule(NamedTuple):
    """Inputs accepted by a zoo entry: multiples of ``multiple``, at least ``minimum``."""

    multiple: int
    minimum: int

    def near(self, size: int) -> int:
        """The smallest accepted size that is at least ``size``."""
        size = max(size, self.minimum)
        return -(-size // self.multiple) * self.multiple


def _ready(module: nn.Module) -> nn.Module:
    """``module`` in eval mode (factories end here)."""
    return module.eval()


def _randomise_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Give ``bn`` non-trivial running statistics and affine parameters."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n) * 0.5)
        bn.running_var.copy_(torch.rand(n) + 0.5)
        bn.weight.copy_(torch.rand(n) + 0.5)
        bn.bias.copy_(torch.randn(n) * 0.1)
    return bn


class Residual(nn.Module):
    """``x + body(x)`` with a shape-preserving body."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        """Residual sum."""
        return x + self.body(x)


class CropSkip(nn.Module):
    """A padded conv, a valid branch shrinking by 4, and a cropped skip sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Skip cropped by 2 on each side, added to the branch."""
        h = self.stem(x)
        y = self.branch(h)
        return h[:, :, 2 : 2 + y.size(2), 2 : 2 + y.size(3)] + y


class Concat(nn.Module):
    """Two branches of different kernels concatenated on channels, then 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 5, padding=2)
        self.mix = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branches and mix them."""
        return self.mix(torch.cat([self.a(x), self.b(x)], dim=1))


class Upsampling(nn.Module):
    """Stride-2 conv, nearest 2x up, pool, then bilinear 2x up (align_corners=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """Down, nearest up, conv, pool, bilinear up."""
        h = self.pool(self.conv(self.up(self.down(x))))
        return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)


class ReflectValid(nn.Module):
    """Reflect padding by 2, then a valid 5x5 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        """Same-size output through explicit reflect padding."""
        return self.conv(F.pad(x, (2, 2, 2, 2), mode="reflect"))


def conv_padding_stride() -> nn.Module:
    """3x3 convs with padding 1, the second with stride 2."""
    torch.manual_seed(1)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, padding=1)
        )
    )


def conv_anisotropic() -> nn.Module:
    """Kernels and strides that differ per axis: (3, 5) stride (2, 1), (5, 3) stride (1, 2)."""
    torch.manual_seed(2)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 3, (3, 5), stride=(2, 1), padding=(1, 2)),
            nn.ReLU(),
            nn.Conv2d(3, 2, (5, 3), stride=(1, 2)),
        )
    )


def conv_dilation_groups() -> nn.Module:
    """A dilated padded conv, then a grouped dilated valid conv."""
    torch.manual_seed(3)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, dilation=2, padding=2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(4, 4, 3, groups=2, dilation=3),
        )
    )


def pooling_ceil_padding() -> nn.Module:
    """Max and average pooling with padding and ceil rounding."""
    torch.manual_seed(4)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1),
            nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
            nn.AvgPool2d(3, 2, padding=1, ceil_mode=True),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(3, 2, 1),
        )
    )


def transposed_conv() -> nn.Module:
    """Two stride-2 convs undone by transposed convs with padding (output_padding 0)."""
    torch.manual_seed(5)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 3, 3, stride=2),
            nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=0),
        )
    )


def upsampling() -> nn.Module:
    """Nearest ``nn.Upsample`` and bilinear ``F.interpolate`` by 2."""
    torch.manual_seed(6)
    return _ready(Upsampling())


def elementwise() -> nn.Module:
    """BatchNorm (eval, non-trivial statistics), ReLU, LeakyReLU, Dropout between convs."""
    torch.manual_seed(7)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            _randomise_batchnorm(nn.BatchNorm2d(4)),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 3, 3),
            nn.LeakyReLU(0.2),
            nn.Dropout2d(0.3),
        )
    )


def _residual_block() -> Residual:
    """Two padded 3x3 convs with a residual sum around them."""
    convs = (nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
    return Residual(nn.Sequential(*convs))


def residual() -> nn.Module:
    """Two residual blocks, the second after a stride-2 conv."""
    torch.manual_seed(8)
    down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
    return _ready(nn.Sequential(_residual_block(), down, _residual_block()))


def crop_skip() -> nn.Module:
    """A skip addition that crops the larger map by 2 on each side."""
    torch.manual_seed(9)
    return _ready(CropSkip())


def concat() -> nn.Module:
    """Branches of 3x3 and 5x5 convs concatenated on channels."""
    torch.manual_seed(10)
    return _ready(Concat())


def dilated() -> nn.Module:
    """Dilations 2 and 4 with "same" padding."""
    torch.manual_seed(11)
    return _ready(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, dilation=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, dilation=4, padding=4),
        )
    )


def reflect_valid() -> nn.Module:
    """``F.pad`` in reflect mode, then a valid conv."""
    torch.manual_seed(12)
    return _ready(ReflectValid())


def fcn8s_tiny() -> nn.Module:
    """The FCN-8s topology (two cropped skip fusions) with tiny widths."""
    torch.manual_seed(13)
    return _ready(fcn8s_vgg16(num_classes=3, channels=TINY_VGG, fc_channels=6))


def fcn32s_tiny() -> nn.Module:
    """FCN-32s with tiny widths."""
    torch.manual_seed(14)
    return _ready(fcn32s_vgg16(num_classes=3, channels=TINY_VGG, fc_channels=6))


def fcn_alexnet_tiny() -> nn.Module:
    """FCN-AlexNet (grouped convs, LRN, kernel-63 upscore) with tiny widths."""
    torch.manual_seed(15)
    return _ready(fcn_alexnet(num_classes=3, channels=(4, 4, 4, 4, 4), fc_channels=6))


def unet_tiny() -> nn.Module:
    """``unet_small(base=4)``: depth 3, BatchNorm, concatenations."""
    torch.manual_seed(16)
    net = unet_small(base=4)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            _randomise_batchnorm(module)
    return _ready(net)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "conv_padding_stride": conv_padding_stride,
    "conv_anisotropic": conv_anisotropic,
    "conv_dilation_groups": conv_dilation_groups,
    "pooling_ceil_padding": pooling_ceil_padding,
    "transposed_conv": transposed_conv,
    "upsampling": upsampling,
    "elementwise": elementwise,
    "residual": residual,
    "crop_skip": crop_skip,
    "concat": concat,
    "dilated": dilated,
    "reflect_valid": reflect_valid,
    "fcn8s_tiny": fcn8s_tiny,
    "fcn32s_tiny": fcn32s_tiny,
    "fcn_alexnet_tiny": fcn_alexnet_tiny,
    "unet_tiny": unet_tiny,
}

SIZE_RULES: dict[str, SizeRule] = {
    "conv_padding_stride": SizeRule(1, 1),
    "conv_anisotropic": SizeRule(1, 9),
    "conv_dilation_groups": SizeRule(1, 7),
    "pooling_ceil_padding": SizeRule(1, 1),
    "transposed_conv": SizeRule(1, 5),
    "upsampling": SizeRule(1, 1),
    "elementwise": SizeRule(1, 3),
    "residual": SizeRule(1, 1),
    "crop_skip": SizeRule(1, 5),
    "concat": SizeRule(1, 1),
    "dilated": SizeRule(1, 1),
    "reflect_valid": SizeRule(1, 3),
    "fcn8s_tiny": SizeRule(1, 1),
    "fcn32s_tiny": SizeRule(1, 1),
    "fcn_alexnet_tiny": SizeRule(1, 1),
    "unet_tiny": SizeRule(8, 8),
}


class SpatialAttention(nn.Module):
    """Self-attention over all spatial positions: every output sees every input."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(3, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Attention over the flattened ``H * W`` positions."""
        n, _, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).split(2, dim=1)
        weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return (v @ weights.transpose(1, 2)).reshape(n, 2, h, w)


class DataDependentBranch(nn.Module):
    """Control flow on tensor values (cannot be traced symbolically)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 5, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        """One of two convs, depending on the sign of the input's sum."""
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class FlattenLinear(nn.Module):
    """A classifier head: flatten into Linear (fixed 16x16 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores ``(N, 5)``."""
        h = self.conv(x)
        return self.fc(h.view(h.size(0), -1))


class Resize(nn.Module):
    """``F.interpolate`` with keyword arguments fixed at construction."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.kwargs = kwargs

    def forward(self, x: Tensor) -> Tensor:
        """Conv, then resize."""
        return F.interpolate(self.conv(x), **self.kwargs)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A factory that seeds torch, builds, and returns the module in eval mode."""

    def factory() -> nn.Module:
        torch.manual_seed(100)
        return _ready(build())

    factory.__doc__ = build.__doc__
    return factory


REJECTED: dict[str, Callable[[], nn.Module]] = {
    "global_avg_pool": _seeded(
        lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1))
    ),
    "spatial_attention": _seeded(SpatialAttention),
    "data_dependent_branch": _seeded(DataDependentBranch),
    "flatten_linear": _seeded(FlattenLinear),
    "interpolate_fixed_size": _seeded(lambda: Resize(size=(32, 32), mode="nearest")),
    "bilinear_align_corners": _seeded(
        lambda: Resize(scale_factor=2, mode="bilinear", align_corners=True)
    ),
    "group_norm": _seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4))),
    "instance_norm": _seeded(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True))
    ),
}

REJECTED_INPUT_SIZE = 16
"""Every REJECTED entry runs (eagerly) on a ``(1, 3, 16, 16)`` input."""
