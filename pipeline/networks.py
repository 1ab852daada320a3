"""Networks as the prediction core runs them: one interface over each runtime (back end).

A :class:`Network` takes a batch of normalised windows, ``(N, C, H, W)`` float32 numpy,
and returns a torch tensor: class scores ``(N, K, H', W')`` or, for a network whose
graph already picks the class, labels ``(N, H', W')``. What it takes and gives is its
:class:`NetworkSignature`, known before any pixel runs. Back ends:

- ``torch``: a :class:`torch.nn.Module` (:class:`TorchNetwork`), with autocast and
  channels_last on the device it lives on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

#: Output layouts: class scores ``(N, K, H, W)`` or labels already picked ``(N, H, W)``.
SCORES = "scores"
LABELS = "labels"
OUTPUTS = (SCORES, LABELS)


@dataclass(frozen=True)
class NetworkSignature:
    """What a network takes and gives, read from it before any pixel runs.

    ``channels``: input channels (None when the network does not say);
    ``window``: the one input ``(rows, cols)`` in px it accepts, None when any size runs;
    ``output``: :data:`SCORES` or :data:`LABELS`; ``classes``: K of the scores when the
    network says it statically (None otherwise); ``input_name``/``output_name``: the
    graph's tensor names where the runtime has names; ``input_dtype``: numpy dtype name
    of what the network takes.
    """

    backend: str
    channels: int | None
    window: tuple[int, int] | None
    output: str
    classes: int | None
    input_name: str | None = None
    output_name: str | None = None
    input_dtype: str = "float32"
    #: The one batch size the network takes (an export with batch fixed to 1), None: any.
    batch: int | None = None


class Network(Protocol):
    """A loaded network on one device; see the module docstring."""

    @property
    def signature(self) -> NetworkSignature: ...

    @property
    def device(self) -> str: ...

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """``(N, C, H, W)`` float32 -> scores ``(N, K, H', W')`` (a float dtype) or labels
        ``(N, H', W')`` (an integer dtype), on :attr:`device`."""
        ...


class TorchNetwork:
    """A torch module in eval mode as a :class:`Network`.

    ``autocast``: the dtype of torch's automatic mixed precision (None: off);
    ``channels_last``: batches are laid out NHWC in memory (faster convolutions on GPUs).
    A batch is copied to the module's device through pinned memory on CUDA.
    """

    def __init__(self, module: nn.Module, *, autocast: torch.dtype | None = None,
                 channels_last: bool = False, channels: int | None = None) -> None:
        self.module = module
        self.autocast = autocast
        self.channels_last = channels_last
        self._device = _device_of(module)
        self._signature = NetworkSignature("torch", channels, None, SCORES, None)

    @property
    def signature(self) -> NetworkSignature:
        return self._signature

    @property
    def device(self) -> str:
        return str(self._device)

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        cuda = self._device.type == "cuda"
        if cuda:
            tensor = tensor.pin_memory()
        tensor = tensor.to(self._device, non_blocking=cuda)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self._device.type, dtype=self.autocast,
                                  enabled=self.autocast is not None)
        with torch.inference_mode(), autocast:
            return self.module(tensor)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
