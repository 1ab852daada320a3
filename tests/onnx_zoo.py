"""Small networks exported to ONNX in the test run, for probing their receptive fields.

Each entry of :data:`ONNX_ZOO` builds a torch module (3 input channels, ``K``
class scores at the input's resolution, fixed-seed weights, eval mode) and
says what probing must find: the exact receptive field, or that the network
has global context (and which ONNX operation shows it). :func:`exported`
gives the ONNX bytes, cached per name for the test session.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from pipeline.receptive import ReceptiveField
from tests.onnx_export import onnx_bytes

K = 4
"""Classes every zoo network scores."""


def _crop(y: Tensor, like: Tensor) -> Tensor:
    """``y`` cut to the spatial size of ``like`` (from its start)."""
    return y[:, :, : like.shape[2], : like.shape[3]]


class PlainFCN(nn.Module):
    """conv, max-pool by 2, conv, bilinear up by 2, plus a 1x1 skip at full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.deep = nn.Conv2d(6, 6, 3, padding=1)
        self.skip = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        h = F.relu(self.stem(x))
        deep = F.relu(self.deep(self.pool(h)))
        up = F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(_crop(up, h) + self.skip(h))


class KerasSame(nn.Module):
    """A stride-2 3x3 conv with TensorFlow "same" padding (1 before an odd length, 0 before
    an even one, 1 after), computed from ``x.shape``, then nearest up by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 6, 3, stride=2)
        self.head = nn.Conv2d(6, K, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        h = F.relu(self.stem(x))
        h = F.pad(h, (h.shape[3] % 2, 1, h.shape[2] % 2, 1))
        up = F.interpolate(F.relu(self.down(h)), scale_factor=2, mode="nearest")
        return self.head(_crop(up, x))


class UNetLike(nn.Module):
    """Two stride-2 convs, undone by transposed convs with concatenated skips."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(3, 4, 3, padding=1)
        self.e2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.e3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.u2 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.d2 = nn.Conv2d(12, 6, 3, padding=1)
        self.u1 = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        e1 = F.relu(self.e1(x))
        e2 = F.relu(self.e2(e1))
        e3 = F.relu(self.e3(e2))
        d2 = F.relu(self.d2(torch.cat([_crop(self.u2(e3), e2), e2], 1)))
        return self.head(torch.cat([_crop(self.u1(d2), e1), e1], 1))


class SqueezeExcite(nn.Module):
    """A conv whose channels are scaled by a gate computed from the global average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 2, 1)
        self.excite = nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(h * gate)


class Normalised(nn.Module):
    """A conv followed by a normalisation over the spatial dims."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        return self.head(F.relu(self.norm(self.conv(x))))


class PixelAttention(nn.Module):
    """Self-attention over the pixels of a 4x pooled map, added back at full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Conv2d(8, 24, 1)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``(N, K, H, W)``."""
        h = F.relu(self.conv(x))
        small = F.avg_pool2d(h, 4, ceil_mode=True)
        n, _, rows, cols = small.shape
        q, k, v = self.qkv(small).flatten(2).chunk(3, dim=1)
        attn = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)
        mixed = (v @ attn.transpose(1, 2)).reshape(n, 8, rows, cols)
        up = F.interpolate(mixed, scale_factor=4, mode="nearest")
        return self.head(h + _crop(up, h))


@dataclass(frozen=True)
class Entry:
    """A zoo network and what probing must find.

    ``field`` is the exact receptive field (None for a global one);
    ``global_op`` an ONNX operation the refusal must name; ``window`` a fixed
    input size the export uses; ``size_dependent`` whether it pads by length.
    """

    build: Callable[[], nn.Module]
    field: ReceptiveField | None
    global_op: str | None = None
    window: tuple[int, int] | None = None
    size_dependent: bool = False


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory().eval()
    return build


def _dilated() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=4, dilation=4), nn.ReLU(),
        nn.Conv2d(6, K, 1),
    )


def _fixed() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
        nn.Conv2d(6, K, 1),
    )


def _field(size: int, offset: int, align: int,
           reach: tuple[tuple[int, int], ...]) -> ReceptiveField:
    return ReceptiveField(size=(size, size), stride=(1, 1), offset=(offset, offset),
                          align=(align, align), reach=(reach, reach))


ONNX_ZOO: dict[str, Entry] = {
    # stem 3x3, pool 2, deep 3x3 at stride 2, bilinear up: an even cell reads pooled cells
    # (m-1, m), an odd one (m, m+1): rows j-5..j+4 and j-4..j+5
    "plain_fcn": Entry(_seeded(PlainFCN, 1), _field(11, -5, 2, ((5, 4), (4, 5)))),
    # stem 3x3, stride-2 3x3 "same", nearest up, head 3x3: j-4..j+2 / j-3..j+3 after an odd
    # length, j-3..j+3 / j-2..j+4 after an even one; the reach is the largest of these
    "keras_same": Entry(_seeded(KerasSame, 2), _field(9, -4, 2, ((4, 4),)),
                        size_dependent=True),
    # 3x3 with dilations 1, 2, 4: 1 + 2 + 4 + 8 = 15 pixels
    "dilated": Entry(_seeded(_dilated, 3), _field(15, -7, 1, ((7, 7),))),
    # two stride-2 levels, 2x2 transposed convs: the reach depends on the phase mod 4
    "unet_like": Entry(_seeded(UNetLike, 4),
                       _field(16, -9, 4, ((8, 4), (9, 3), (6, 6), (7, 5)))),
    # conv, pool 2, conv, nearest up: even cells j-3..j+4, odd ones j-4..j+3
    "fixed_64": Entry(_seeded(_fixed, 5), _field(9, -4, 2, ((3, 4), (4, 3))), window=(64, 64)),
    "squeeze_excite": Entry(_seeded(SqueezeExcite, 6), None, "GlobalAveragePool"),
    "group_norm": Entry(_seeded(lambda: Normalised(nn.GroupNorm(2, 8)), 7), None,
                        "InstanceNormalization"),
    "instance_norm": Entry(_seeded(lambda: Normalised(nn.InstanceNorm2d(8, affine=True)), 8),
                           None, "InstanceNormalization"),
    "attention": Entry(_seeded(PixelAttention, 9), None, "Softmax"),
}


@functools.cache
def exported(name: str) -> bytes:
    """The ONNX bytes of zoo entry ``name`` (input ``x``, output ``y``)."""
    entry = ONNX_ZOO[name]
    return onnx_bytes(entry.build(), 3, window=entry.window)


def write_spec(folder: Path, name: str, graph: bytes | None = None, **extra: Any) -> Path:
    """``folder/NAME.yaml``, an ONNX spec of 3 bands and :data:`K` classes for the graph
    ``graph`` (by default the zoo network ``name``, :func:`exported`), written beside it
    as ``NAME.onnx`` with its sha256; ``extra`` keys are added to the spec."""
    model = folder / f"{name}.onnx"
    model.write_bytes(exported(name) if graph is None else graph)
    data = {
        "schema": 1, "name": name, "weights": model.name,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "bands": [1, 2, 3],
        "normalization": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
        "classes": [{"name": f"c{k}", "color": [60 * k, 90, 160]} for k in range(K)],
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
