"""Label classes of a model's output: names, colours and the label dtype."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Label value written where the scene has no data, unless a model spec says otherwise.
DEFAULT_NODATA = 255


@dataclass(frozen=True)
class LabelClass:
    """One output class: its name and RGB colour (0-255 each)."""

    name: str
    color: tuple[int, int, int]


def label_dtype(n_classes: int) -> np.dtype:
    """uint8 up to 255 classes (255 stays free for nodata), uint16 above."""
    return np.dtype(np.uint8) if n_classes <= 255 else np.dtype(np.uint16)
