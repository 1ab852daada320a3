"""What is known about a scene before any pixel is read: pure values, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Affine6 = tuple[float, float, float, float, float, float]

#: numpy dtype kinds a model can be fed: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class SceneInfo:
    """One input raster's georeference and layout.

    ``transform`` is the affine ``(a, b, c, d, e, f)`` as rasterio orders it;
    ``crs`` is WKT (``None`` when the file has none); ``shape`` is
    ``(rows, cols)``; ``dtype`` a numpy dtype name; ``nodata`` may be NaN.
    ``colorinterp`` holds each band's colour interpretation as rasterio names
    it (``"gray"``, ``"red"``, ``"alpha"``, ``"palette"``, ``"undefined"``, ...),
    band 1 first; empty when unknown (a SceneInfo not made by ``open_scene``).
    ``driver`` is the GDAL driver the scene is read with (``GTiff``, or ``VRT``
    where the run allows VRTs); ``sources`` the other files a VRT reads.
    ``interleave`` is how the file stores its bands: ``"pixel"`` (every band of a pixel
    together, so a block holds all bands), ``"band"``, ``"line"``, or ``None`` when it
    does not say (one band). ``descriptions`` holds each band's description (GDAL's, such
    as ``"red"`` or ``"B04"``; ``None`` for a band without one), band 1 first; empty when
    no band has one.
    ``sample`` is True for a scene that :mod:`pipeline.samples` generated (its
    ``FCN_PIPELINE_SAMPLE`` tag), the only scenes the demo model was trained on.
    """

    path: str
    shape: tuple[int, int]
    count: int
    dtype: str
    crs: str | None
    transform: Affine6
    nodata: float | None
    block_shape: tuple[int, int]
    size_bytes: int
    mtime_ns: int
    colorinterp: tuple[str, ...] = ()
    driver: str = "GTiff"
    sources: tuple[str, ...] = ()
    interleave: str | None = None
    descriptions: tuple[str | None, ...] = ()
    sample: bool = False

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def palette_bands(self) -> tuple[int, ...]:
        """1-based numbers of the bands that hold palette indices, not intensities."""
        return tuple(i + 1 for i, name in enumerate(self.colorinterp) if name == "palette")


def band_names_problem(info: SceneInfo, bands: Sequence[int], names: Sequence[str],
                       source: str) -> str | None:
    """Why the scene's band descriptions contradict the band names a model spec gives, or
    ``None``: they do when every band read has a description and one differs from the
    spec's name for it (case aside). A scene without descriptions is not checked.

    Args:
        info: The scene.
        bands: The 1-based scene bands the model reads, in model channel order.
        names: The spec's name of each of ``bands`` (``band_names``).
        source: The spec file, for the message.

    Returns:
        One line naming the scene, both lists and the fix.
    """
    found = [info.descriptions[b - 1] if b <= len(info.descriptions) else None for b in bands]
    if any(not d for d in found):
        return None
    if [str(d).strip().casefold() for d in found] == [n.casefold() for n in names]:
        return None
    return (f"{Path(info.path).name}: its bands {list(bands)} are described as {found}, but "
            f"the model reads {list(names)} (band names of {source}); give a scene with those "
            "bands in that order (gdal_translate -b selects and orders bands)")


def nodata_problem(value: float, dtype: str) -> str | None:
    """Why pixels of ``dtype`` cannot hold the nodata ``value``, or ``None`` if they can.

    Integer dtypes hold integers of their range only (so never NaN or
    infinity); a float dtype holds NaN, +-inf and finite values up to its
    largest finite magnitude (3.4e38 for float32). A value outside that would
    match no pixel, or a rounded one.

    Args:
        value: The nodata value as declared (a header, a model spec).
        dtype: The pixels' numpy dtype name, numeric (``uint8``, ``float32``).

    Returns:
        A phrase such as ``"300 is outside the uint8 range (0 to 255)"``.
    """
    kind = np.dtype(dtype).kind
    if kind == "f":
        top = float(np.finfo(dtype).max)
        if math.isfinite(value) and abs(value) > top:
            return f"{show_number(value)} is outside the {dtype} range (-{top:.4g} to {top:.4g})"
        return None
    low, high = (0, 1) if kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    if not math.isfinite(value) or value != math.floor(value):
        return (f"{show_number(value)} is not an integer, and {dtype} pixels hold integers only "
                f"({low} to {high})")
    if not low <= int(value) <= high:
        return f"{show_number(value)} is outside the {dtype} range ({low} to {high})"
    return None


def show_number(value: float) -> str:
    """A number as a message shows it: ``300``, ``0.5``, ``-1e+40``, ``nan``."""
    if math.isfinite(value) and value == math.floor(value) and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}" if math.isfinite(value) and abs(value) >= 1e16 else repr(float(value))
