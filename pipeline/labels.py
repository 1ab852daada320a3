"""Label classes of a model's output: names, colours and the label dtype."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

#: Label value written where the scene has no data, unless a model spec says otherwise.
DEFAULT_NODATA = 255
#: Hue step of :func:`default_color`: the golden ratio's fraction, so neighbouring
#: labels get far-apart hues however many classes there are.
_HUE_STEP = 0.6180339887498949


@dataclass(frozen=True)
class LabelClass:
    """One output class: its name and RGB colour (0-255 each)."""

    name: str
    color: tuple[int, int, int]


def label_dtype(n_classes: int) -> np.dtype:
    """uint8 up to 255 classes (255 stays free for nodata), uint16 above."""
    return np.dtype(np.uint8) if n_classes <= 255 else np.dtype(np.uint16)


def default_color(label: int) -> tuple[int, int, int]:
    """The colour of class ``label`` (0-based) when its model does not give one: RGB,
    0-255 each, the same for a label in every run; hues step by the golden ratio."""
    red, green, blue = colorsys.hsv_to_rgb((label * _HUE_STEP) % 1.0, 0.65, 0.85)
    return round(red * 255), round(green * 255), round(blue * 255)
