"""What is known about a scene before any pixel is read: pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

Affine6 = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class SceneInfo:
    """One input raster's georeference and layout.

    ``transform`` is the affine ``(a, b, c, d, e, f)`` as rasterio orders it;
    ``crs`` is WKT (``None`` when the file has none); ``shape`` is
    ``(rows, cols)``; ``dtype`` a numpy dtype name; ``nodata`` may be NaN.
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

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]
