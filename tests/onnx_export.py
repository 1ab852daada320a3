"""Export torch modules to ONNX inside the test run (no model zoo download, no torchvision).

Uses torch's TorchScript-based exporter (``dynamo=False``): it needs nothing beyond torch
and onnx, and traces shape arithmetic (``x.shape``) into Shape/Gather nodes the way
TensorFlow/Keras exports do.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn


def onnx_bytes(module: nn.Module, channels: int, *, window: tuple[int, int] | None = None,
               opset: int = 17) -> bytes:
    """``module`` (eval mode) as an ONNX model with input ``x`` ``(N, channels, H, W)`` and
    output ``y``: batch and spatial dims dynamic, or spatial dims fixed to ``window``."""
    module = module.eval()
    shape = window or (64, 64)
    example = torch.rand(1, channels, *shape)
    axes: dict[str, dict[int, str]] = {"x": {0: "n"}, "y": {0: "n"}}
    if window is None:
        axes["x"].update({2: "h", 3: "w"})
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation and tracer notices
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return buffer.getvalue()


def write_onnx(module: nn.Module, path: Path, channels: int, *,
               window: tuple[int, int] | None = None) -> Path:
    """:func:`onnx_bytes` written to ``path``; returns ``path``."""
    path.write_bytes(onnx_bytes(module, channels, window=window))
    return path
