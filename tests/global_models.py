"""Torch networks with global context, importable by specs (``tests.global_models:se``).

Their output at a pixel depends on the whole input, so the receptive-field analysis
refuses them; they run with a declared halo and a measured deviation.
"""

from __future__ import annotations

from typing import Any


def _squeeze_excitation(width: int) -> Any:
    from torch import nn

    class SqueezeExcitation(nn.Module):
        """Channel weights from the global average of the feature map."""

        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Sequential(nn.Conv2d(width, width, 1), nn.Sigmoid())

        def forward(self, x: Any) -> Any:
            return x * self.fc(self.pool(x))

    return SqueezeExcitation()


def se(in_channels: int = 3, num_classes: int = 3, width: int = 8) -> Any:
    """Conv, ReLU, squeeze-and-excitation, conv, ReLU, 1x1 conv to class scores."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), _squeeze_excitation(width),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1),
    )


def group_norm(in_channels: int = 3, num_classes: int = 3, width: int = 8) -> Any:
    """Conv, GroupNorm (statistics over the whole window), ReLU, conv, 1x1 conv."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1),
    )
