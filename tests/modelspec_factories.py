"""Tiny model factories and spec builders for the model spec and model tests.

Importable as ``tests.modelspec_factories`` so specs can name ``tests.modelspec_factories:tiny``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

#: How many times :func:`tiny` has run in this process (reset it in a fixture).
calls = 0

NOT_CALLABLE = 3


def tiny(in_channels: int = 3, num_classes: int = 3, width: int = 4) -> Any:
    """A two-layer FCN: 3x3 conv, ReLU, 1x1 conv to class scores."""
    global calls
    calls += 1
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )


def failing(**kwargs: Any) -> Any:
    raise RuntimeError("boom")


def not_a_module(**kwargs: Any) -> Any:
    return 42


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """A valid spec (3 bands, 3 classes, ``tiny`` weights in ``tiny.safetensors``)."""
    data: dict[str, Any] = {
        "schema": 1,
        "name": "tiny",
        "architecture": "tests.modelspec_factories:tiny",
        "arguments": {"num_classes": 3},
        "weights": "tiny.safetensors",
        "bands": [1, 2, 3],
        "dtypes": ["uint8", "uint16"],
        "normalization": {
            "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "nodata": {"input": "scene", "output": 255},
        "classes": [
            {"name": "water", "color": [30, 90, 200]},
            {"name": "forest", "color": [20, 120, 40]},
            {"name": "urban", "color": [200, 60, 60]},
        ],
    }
    data.update(copy.deepcopy(overrides))
    return data


def write_spec(folder: Path, data: dict[str, Any] | None = None, name: str = "spec.yaml") -> Path:
    """Write ``data`` (default: :func:`spec_dict`) as YAML in ``folder``; return its path."""
    path = folder / name
    path.write_text(yaml.safe_dump(spec_dict() if data is None else data, sort_keys=False))
    return path
