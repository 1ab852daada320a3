"""fcn-pipeline: exact tiled inference of fully convolutional networks.

The public names are imported lazily so that ``import pipeline`` (and the
CLI's ``--help``) stays fast and does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline._version import __version__

_EXPORTS = {
    "ReceptiveField": "pipeline.receptive",
    "Halo": "pipeline.receptive",
    "TileGrid": "pipeline.grid",
    "Tile": "pipeline.grid",
    "receptive_field": "pipeline.analysis",
    "convolutionalize": "pipeline.fully_convolutional",
    "predict_tiled": "pipeline.inference",
    "PipelineError": "pipeline.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
