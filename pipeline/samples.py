"""Procedural sample scenes: demo input and training data for the demo model.

A sample scene is a landscape of four classes (:data:`CLASSES`) inside a
slightly rotated rectangular footprint, like a satellite scene in its raster.
Every pixel is a pure function of its absolute ``(row, col)``, the seed and
the scene shape, so :func:`render` computes any block on its own and blocks
agree exactly at their borders; :func:`write_sample_scenes` writes scenes of
up to 30000 x 30000 pixels block by block, never holding a whole scene.

How a pixel is made:

- Smooth fields (elevation, moisture) are multi-octave value noise: hash
  values on the lattice of each octave's cell, interpolated with smoothstep
  and summed over octaves, evaluated on a node grid every 8 pixels and
  resampled bilinearly to pixels; a texture field likewise, from 4 and 12
  pixel cells on a 4 pixel node grid.
- Classes: water where elevation is low; built-up where the urban density at
  the centre of a street block is high (towns end at streets); bare ground
  where it is dry; vegetation elsewhere.
- Built-up street blocks are 32 pixels, with a 4 pixel street along two
  sides and 8 pixel lots, each a grey roof, a red roof or a yard of grass
  (so yards look like vegetation; only the neighbourhood tells them apart).
- Colour: a table gives the colour of each (material, texture level, shade
  level), where shade is depth for water, wetness on land and the lot's
  brightness in towns; the table's ramps move all bands together. On top
  comes independent per-pixel noise per band. Classes overlap a little in
  colour, so a classifier needs a neighbourhood to be accurate.

Pixel values come from element-wise ``+ - * /``, comparisons and integer
hashing only (no reductions, no transcendental functions, no BLAS), so a
pixel does not depend on the shape of the array it is computed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from pipeline.errors import ConfigError, GeometryError
from pipeline.labels import DEFAULT_NODATA, LabelClass

WATER, VEGETATION, BARE_GROUND, BUILT_UP = 0, 1, 2, 3

#: The label classes of sample scenes; the index of a class is its label value.
CLASSES: tuple[LabelClass, ...] = (
    LabelClass("water", (40, 75, 140)),
    LabelClass("vegetation", (65, 120, 55)),
    LabelClass("bare ground", (170, 140, 100)),
    LabelClass("built-up", (175, 90, 75)),
)
#: Label value outside the footprint.
LABEL_NODATA = DEFAULT_NODATA
#: Value of every band outside the footprint (never taken by all bands inside it).
SCENE_NODATA = 0
#: Largest scene side :func:`write_sample_scenes` accepts.
MAX_SIZE = 30000
#: GDAL metadata tag that marks every GeoTIFF written here; its value is the generation
#: parameters (JSON). A file is replaced only if it has this tag (an earlier sample).
SAMPLE_TAG = "FCN_PIPELINE_SAMPLE"
#: CRS and pixel size of written scenes: UTM zone 33N, 10 m pixels.
SAMPLE_CRS = "EPSG:32633"
PIXEL_SIZE = 10.0

Pair = tuple[int, int]
Octaves = tuple[tuple[int, float], ...]

# Geometry of the landscape, in pixels.
_FIELD_NODE = 8  # node grid of elevation and moisture
_TEXTURE_NODE = 4  # node grid of the texture
_STREET = 32  # street period: one street block
_STREET_WIDTH = 4
_LOT = 8  # lot period inside a street block
_HOUSE = 6  # house side inside a lot; the rest of the lot is yard
_ELEVATION: Octaves = ((256, 1.0), (128, 0.5), (64, 0.25), (32, 0.125), (16, 0.0625))
_MOISTURE: Octaves = ((192, 1.0), (96, 0.5), (48, 0.25), (24, 0.125))
_URBAN: Octaves = ((320, 1.0), (160, 0.5), (80, 0.25))
_GRAIN: Octaves = ((12, 1.0),)
# Class thresholds on the fields (each field lies in [0, 1], mean 0.5).
_WATER_LEVEL = 0.39
_DRY_LEVEL = 0.43
_URBAN_LEVEL = 0.6
# Shade ranges: wetness from moisture, depth below the water level.
_WET_RANGE = (0.2, 0.8)
_DEPTH_RANGE = (_WATER_LEVEL, _WATER_LEVEL - 0.25)
# Internal chunk (absolute multiples): bounds temporaries to a few MB.
_CHUNK = (128, 512)

# Materials: label classes 0..2 are their own material; built-up has four.
_STREET_M, _GREY_ROOF, _RED_ROOF, _YARD = 3, 4, 5, 6
# Per material, RGB: base colour, gain of the texture (-1..1) and gain of the
# shade (0..1): depth for water, wetness for vegetation, bare ground and
# yards, the lot's brightness for streets and roofs.
_MATERIALS = np.array(
    [
        [[60, 95, 90], [6, 6, 8], [-40, -50, 5]],  # water: shallow to deep
        [[166, 155, 89], [30, 36, 18], [-121, -70, -49]],  # vegetation: dry grass to forest
        [[200, 178, 138], [24, 22, 20], [-130, -112, -112]],  # bare ground: dry to damp
        [[105, 105, 110], [10, 10, 10], [10, 10, 10]],  # street
        [[110, 110, 115], [8, 8, 8], [80, 80, 80]],  # grey roof
        [[140, 70, 55], [10, 8, 8], [60, 40, 30]],  # red roof
        [[130, 140, 80], [26, 32, 18], [-80, -50, -40]],  # yard
    ],
    np.float32,
)
_TEXTURE_LEVELS, _SHADE_LEVELS = 16, 32
# Per-pixel noise: the sum of two 4-bit hash values, 0..30, centred on the colour.
_NOISE_MAX = 30


def _colour_table() -> np.ndarray:
    """Colour of each key ``(material * T + texture) * S + shade``: ``(3, keys)`` uint8.

    Shifted down by half the noise range, and kept within ``[1, 255 - 30]``,
    so that adding the per-pixel noise (0..30) never wraps and never gives 0.
    """
    texture = (np.arange(_TEXTURE_LEVELS) + 0.5) / _TEXTURE_LEVELS * 2 - 1
    shade = (np.arange(_SHADE_LEVELS) + 0.5) / _SHADE_LEVELS
    base, gain_t, gain_s = (_MATERIALS[:, k, None, None, :] for k in range(3))
    table = base + gain_t * texture[:, None, None] + gain_s * shade[:, None]
    table = np.clip(np.rint(table) - _NOISE_MAX // 2, 1, 255 - _NOISE_MAX)
    return np.ascontiguousarray(table.reshape(-1, 3).T, dtype=np.uint8)


_COLOURS = _colour_table()


@dataclass(frozen=True)
class SampleScene:
    """Paths of one written sample scene and its label raster."""

    scene: Path
    labels: Path


# --- hashing -----------------------------------------------------------------


@lru_cache(maxsize=4096)
def _key(seed: int, name: str) -> int:
    """A 32-bit key for one named quantity of a scene, stable across processes."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _unit_key(seed: int, name: str) -> float:
    """A number in [0, 1) for one named scalar of a scene."""
    return _key(seed, name) / 2**32


def _mix(x: np.ndarray) -> np.ndarray:
    """Avalanche a uint32 array in place (the lowbias32 finaliser)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


_ROW_MUL, _COL_MUL = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _hash2(key: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """uint32 hash of every pair ``(iy[i], ix[j])``: shape ``(len(iy), len(ix))``."""
    rows = _mix((iy.astype(np.uint32) * _ROW_MUL) ^ np.uint32(key))
    cols = ix.astype(np.uint32) * _COL_MUL
    return _mix(rows[:, None] ^ cols[None, :])


def _unit(h: np.ndarray) -> np.ndarray:
    """uint32 hashes to float32 in [0, 1), exactly (24 bits)."""
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


# --- value noise on lattices -------------------------------------------------


def _weights(coords: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and smoothstep weight of each coordinate for one octave."""
    index, rest = np.divmod(coords, cell)
    t = rest / cell
    return index, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _value_noise(key: int, ys: np.ndarray, xs: np.ndarray, cell: int) -> np.ndarray:
    """Value noise of lattice cell ``cell`` at points ``ys x xs`` (sorted, absolute)."""
    iy, wy = _weights(ys, cell)
    ix, wx = _weights(xs, cell)
    iy0, ix0 = int(iy[0]), int(ix[0])
    lattice = _unit(
        _hash2(key, np.arange(iy0, int(iy[-1]) + 2), np.arange(ix0, int(ix[-1]) + 2))
    )
    top = lattice[iy - iy0]
    rows = top + (lattice[iy - iy0 + 1] - top) * wy[:, None]
    left = rows[:, ix - ix0]
    return left + (rows[:, ix - ix0 + 1] - left) * wx


def _fbm(seed: int, name: str, ys: np.ndarray, xs: np.ndarray, octaves: Octaves) -> np.ndarray:
    """Multi-octave value noise in [0, 1) at points ``ys x xs``."""
    total = sum(gain for _, gain in octaves)
    out = np.zeros((len(ys), len(xs)), np.float32)
    for k, (cell, gain) in enumerate(octaves):
        out += np.float32(gain / total) * _value_noise(_key(seed, f"{name}{k}"), ys, xs, cell)
    return out


def _steps(cell: int) -> np.ndarray:
    """Interpolation weights ``0, 1/cell, ..., (cell-1)/cell`` of the pixels of a cell."""
    return np.arange(cell, dtype=np.float32) / np.float32(cell)


# --- lattices of a region ----------------------------------------------------


def _cell_span(span: Pair, cell: int, extra: int = 0) -> Pair:
    """Lattice indices ``[first, stop)`` of the cells that pixels ``span`` touch, plus ``extra``."""
    return span[0] // cell, (span[1] - 1) // cell + 1 + extra


LatticeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Strip:
    """Lattice values, already resampled along a region's pixel columns.

    ``values`` is ``(k, ni, w)``: lattice rows from index ``row0``, pixel
    columns from ``col0``. ``smooth`` values sit at nodes every ``cell``
    pixels and are linear between them (bilinear once rows are resampled);
    otherwise a value covers its whole cell. Each chunk resamples its rows.
    """

    values: np.ndarray
    row0: int
    col0: int
    cell: int
    smooth: bool

    @classmethod
    def build(cls, make: LatticeFn, cell: int, rows: Pair, cols: Pair, smooth: bool) -> _Strip:
        """``make(iy, ix)`` gives ``(k, len(iy), len(ix))`` values at lattice indices."""
        extra = 1 if smooth else 0
        (i0, i1), (j0, j1) = _cell_span(rows, cell, extra), _cell_span(cols, cell, extra)
        lattice = make(np.arange(i0, i1), np.arange(j0, j1))
        if smooth:
            left = lattice[..., :-1]
            diff = lattice[..., 1:] - left
            across = np.empty((*left.shape, cell), np.float32)
            for s, t in enumerate(_steps(cell)):  # inner loops along columns, not steps
                np.multiply(diff, t, out=across[..., s])
                np.add(across[..., s], left, out=across[..., s])
        else:
            across = np.repeat(lattice[..., None], cell, axis=-1)
        dc = cols[0] - j0 * cell
        across = across.reshape(*lattice.shape[:2], -1)[..., dc : dc + cols[1] - cols[0]]
        return cls(across, i0, cols[0], cell, smooth)

    def pixels(self, rows: Pair, cols: Pair) -> np.ndarray:
        """Values at pixels ``rows x cols`` (within the strip's region): ``(k, h, w)``."""
        i0, i1 = _cell_span(rows, self.cell, 1 if self.smooth else 0)
        c0, c1 = cols[0] - self.col0, cols[1] - self.col0
        part = self.values[:, i0 - self.row0 : i1 - self.row0, c0:c1]
        if self.smooth:
            top = part[:, :-1, None, :]
            out = np.multiply(part[:, 1:, None, :] - top, _steps(self.cell)[:, None])
            out += top
            out = out.reshape(part.shape[0], -1, part.shape[2])
        else:
            out = part.repeat(self.cell, axis=1)
        dr = rows[0] - i0 * self.cell
        return out[:, dr : dr + rows[1] - rows[0]]


def _field_nodes(seed: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Elevation and moisture at nodes: ``(2, ni, nj)`` float32 in [0, 1)."""
    ys, xs = iy * _FIELD_NODE, ix * _FIELD_NODE
    return np.stack(
        [_fbm(seed, "elevation", ys, xs, _ELEVATION), _fbm(seed, "moisture", ys, xs, _MOISTURE)]
    )


def _texture_nodes(seed: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Texture at nodes, fine hash noise plus a grain: ``(1, ni, nj)`` float32 in [0, 1)."""
    fine = _unit(_hash2(_key(seed, "texture"), iy, ix))
    grain = _fbm(seed, "grain", iy * _TEXTURE_NODE, ix * _TEXTURE_NODE, _GRAIN)
    return (fine * np.float32(0.6) + grain * np.float32(0.4))[None]


def _urban_blocks(seed: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Whether each street block is built-up (from its centre): ``(1, ni, nj)`` uint8."""
    centre = _STREET // 2
    density = _fbm(seed, "urban", iy * _STREET + centre, ix * _STREET + centre, _URBAN)
    return (density > _URBAN_LEVEL).astype(np.uint8)[None]


def _lots(seed: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Material (yard, red or grey roof) and brightness level of each lot: ``(2, ni, nj)`` uint8."""
    h = _hash2(_key(seed, "lots"), iy, ix)
    kind = (h & np.uint32(255)).astype(np.uint8)
    material = _GREY_ROOF + (kind < 140) * np.uint8(_RED_ROOF - _GREY_ROOF)
    material += (kind < 60) * np.uint8(_YARD - _RED_ROOF)
    brightness = ((h >> np.uint32(8)) % np.uint32(_SHADE_LEVELS)).astype(np.uint8)
    return np.stack([material, brightness])


@dataclass(frozen=True)
class _Axis:
    """Per-pixel terms along one axis of a region, from absolute pixel ``start``."""

    start: int
    yard: np.ndarray  # bool: in the yard strip of its lot
    street: np.ndarray  # bool: on a street
    noise: np.ndarray  # uint32: this axis's term of the per-pixel noise hash

    @classmethod
    def build(cls, span: Pair, noise: Callable[[np.ndarray], np.ndarray]) -> _Axis:
        index = np.arange(*span)
        return cls(span[0], index % _LOT >= _HOUSE, index % _STREET < _STREET_WIDTH, noise(index))

    def part(self, span: Pair) -> slice:
        return slice(span[0] - self.start, span[1] - self.start)


# --- footprint ---------------------------------------------------------------


@dataclass(frozen=True)
class _Footprint:
    """A slightly rotated rectangle inside the raster: centre, half sides, rotation."""

    centre: tuple[float, float]
    half: tuple[float, float]
    cos: float
    sin: float

    @classmethod
    def of(cls, seed: int, shape: Pair) -> _Footprint:
        """The footprint of scene ``seed``: 0.3 to 1 % margins, rotated so that the
        border is 5 to 15 % of the raster (1.25 to 3 degrees on a square raster).
        """
        h, w = shape
        # Rotating by a small angle t loses about t * (h / w + w / h) of the area.
        aspect = h / w + w / h
        angle = math.radians(1.25 + 1.75 * _unit_key(seed, "angle")) * 2 / aspect
        if _unit_key(seed, "angle sign") < 0.5:
            angle = -angle
        ext_y = h / 2 * (1 - 2 * (0.003 + 0.007 * _unit_key(seed, "margin y")))
        ext_x = w / 2 * (1 - 2 * (0.003 + 0.007 * _unit_key(seed, "margin x")))
        c, s = math.cos(angle), abs(math.sin(angle))
        det = c * c - s * s
        half_x = (c * ext_x - s * ext_y) / det
        half_y = (c * ext_y - s * ext_x) / det
        return cls((h / 2, w / 2), (half_y, half_x), math.cos(angle), math.sin(angle))

    def bounds(self, rows: Pair, cols: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, the interval ``[lo, hi]`` of ``x`` inside; per column, its pixel centre's ``x``.

        ``x`` is relative to the centre. The interval is where the rectangle's
        two slabs overlap: 1-D arithmetic per row, exact whatever the region.
        """
        dy = np.arange(*rows) + (0.5 - self.centre[0])
        x = np.arange(*cols) + (0.5 - self.centre[1])
        c, s = self.cos, self.sin
        half_y, half_x = self.half
        a, b = (dy * c - half_y) / s, (dy * c + half_y) / s
        lo = np.maximum((-half_x - dy * s) / c, np.minimum(a, b))
        hi = np.minimum((half_x - dy * s) / c, np.maximum(a, b))
        return lo, hi, x


# --- rendering ---------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """What the chunks of one :func:`render` call share, computed once."""

    fields: _Strip  # elevation, moisture
    texture: _Strip
    blocks: _Strip  # built-up street blocks
    lots: _Strip  # lot material, lot brightness
    rows: _Axis
    cols: _Axis
    footprint: tuple[np.ndarray, np.ndarray, np.ndarray]  # per row lo, hi; per column x

    @classmethod
    def build(cls, seed: int, rows: Pair, cols: Pair, scene_shape: Pair) -> _Region:
        key = np.uint32(_key(seed, "pixel"))
        return cls(
            _Strip.build(lambda i, j: _field_nodes(seed, i, j), _FIELD_NODE, rows, cols, True),
            _Strip.build(lambda i, j: _texture_nodes(seed, i, j), _TEXTURE_NODE, rows, cols, True),
            _Strip.build(lambda i, j: _urban_blocks(seed, i, j), _STREET, rows, cols, False),
            _Strip.build(lambda i, j: _lots(seed, i, j), _LOT, rows, cols, False),
            # The two terms of _hash2(key, rows, cols), so noise = _mix(row ^ col).
            _Axis.build(rows, lambda i: _mix((i.astype(np.uint32) * _ROW_MUL) ^ key)),
            _Axis.build(cols, lambda j: j.astype(np.uint32) * _COL_MUL),
            _Footprint.of(seed, scene_shape).bounds(rows, cols),
        )


def _select(mask: np.ndarray, yes: np.ndarray | int, no: np.ndarray) -> np.ndarray:
    """uint8 ``where(mask, yes, no)`` by modular arithmetic (np.where is slow here)."""
    return no + (yes - no) * mask


def _quantize(values: np.ndarray, span: tuple[float, float], levels: int) -> np.ndarray:
    """``values`` from ``span[0]`` (level 0) to ``span[1]`` (top level), clipped: uint8."""
    scale = np.float32(levels / (span[1] - span[0]))
    q = (values - np.float32(span[0])) * scale
    return np.clip(q, 0, levels - 1, out=q).astype(np.uint8)


def _town(region: _Region, rows: Pair, cols: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Material and shade level of each pixel were it built-up: uint8 ``(h, w)`` each."""
    lot_material, brightness = region.lots.pixels(rows, cols)
    r, c = region.rows.part(rows), region.cols.part(cols)
    yard = region.rows.yard[r, None] | region.cols.yard[None, c]
    street = region.rows.street[r, None] | region.cols.street[None, c]
    material = _select(street, _STREET_M, _select(yard, _YARD, lot_material))
    return material, brightness


def _classify(region: _Region, rows: Pair, cols: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Labels (ignoring the footprint) and colour-table keys (intp) of a chunk."""
    elevation, moisture = region.fields.pixels(rows, cols)
    water = elevation < np.float32(_WATER_LEVEL)
    dry = moisture < np.float32(_DRY_LEVEL)
    built = region.blocks.pixels(rows, cols)[0] & ~water
    labels = _select(built, BUILT_UP, (np.uint8(VEGETATION) + dry) * ~water)
    town_material, brightness = _town(region, rows, cols)
    material = _select(built, town_material, labels)
    shade = _quantize(moisture, _WET_RANGE, _SHADE_LEVELS)
    shade = _select(water, _quantize(elevation, _DEPTH_RANGE, _SHADE_LEVELS), shade)
    shade = _select(built, brightness, shade)
    texture = region.texture.pixels(rows, cols)[0]
    tex = (texture * np.float32(_TEXTURE_LEVELS - 1e-3)).astype(np.int16)
    keys = (material.astype(np.int16) * _TEXTURE_LEVELS + tex) * _SHADE_LEVELS + shade
    return labels, keys.astype(np.intp)


def _inside(region: _Region, rows: Pair, cols: Pair) -> np.ndarray | None:
    """Whether each pixel lies in the footprint: ``(h, w)`` bool, or None if all do."""
    lo, hi, x = region.footprint
    r = region.rows.part(rows)
    lo, hi, x = lo[r], hi[r], x[region.cols.part(cols)]
    if lo.max() <= x[0] and hi.min() >= x[-1]:
        return None
    return (x[None, :] >= lo[:, None]) & (x[None, :] <= hi[:, None])


def _render_chunk(
    region: _Region, rows: Pair, cols: Pair, image: np.ndarray, labels: np.ndarray
) -> None:
    """Render pixels ``rows x cols`` into ``image`` ``(3, h, w)`` and ``labels`` ``(h, w)``."""
    classes, keys = _classify(region, rows, cols)
    r, c = region.rows.part(rows), region.cols.part(cols)
    noise = _mix(region.rows.noise[r, None] ^ region.cols.noise[None, c])
    nibbles = np.uint32(0x0F0F0F0F)
    noise = (noise & nibbles) + ((noise >> np.uint32(4)) & nibbles)  # per byte: 0..30
    noise_bytes = noise.astype("<u4", copy=False).view(np.uint8).reshape(*noise.shape, 4)
    inside = _inside(region, rows, cols)
    for band in range(3):
        colour = np.take(_COLOURS[band], keys, mode="clip")
        band_noise = noise_bytes[..., band]
        if inside is None:
            np.add(colour, band_noise, out=image[band])
        else:
            colour += band_noise
            np.multiply(colour, inside, out=image[band])
    if inside is None:
        labels[...] = classes
    else:
        outside = (~inside).astype(np.uint8) * np.uint8(LABEL_NODATA)
        np.bitwise_or(classes, outside, out=labels)


def _spans(start: int, stop: int, step: int) -> Iterator[Pair]:
    """``[start, stop)`` cut at absolute multiples of ``step``."""
    while start < stop:
        end = min(stop, (start // step + 1) * step)
        yield start, end
        start = end


def _check_region(rows: Pair, cols: Pair, scene_shape: Pair) -> None:
    for axis, (lo, hi), n in (("rows", rows, scene_shape[0]), ("cols", cols, scene_shape[1])):
        if n < 1 or not 0 <= lo <= hi <= n:
            raise GeometryError(
                f"{axis} [{lo}, {hi}) must lie within [0, {n}] of a scene of shape "
                f"{scene_shape}; ask for a region inside the scene"
            )


def render(seed: int, rows: Pair, cols: Pair, scene_shape: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``[rows[0], rows[1]) x [cols[0], cols[1])`` of sample scene ``seed``.

    ``scene_shape`` is the whole scene's ``(rows, cols)``: it places the
    footprint; the landscape itself depends on absolute coordinates only.
    Returns a ``(3, h, w)`` uint8 image (0 in every band outside the
    footprint, each band >= 1 inside) and ``(h, w)`` uint8 labels (indexes
    of :data:`CLASSES`, :data:`LABEL_NODATA` outside the footprint).
    Deterministic: any cut of a region into blocks gives the same pixels.
    """
    _check_region(rows, cols, scene_shape)
    image = np.empty((3, rows[1] - rows[0], cols[1] - cols[0]), np.uint8)
    labels = np.empty(image.shape[1:], np.uint8)
    if image.size == 0:
        return image, labels
    region = _Region.build(seed, rows, cols, scene_shape)
    for r0, r1 in _spans(*rows, _CHUNK[0]):
        for c0, c1 in _spans(*cols, _CHUNK[1]):
            out = np.s_[r0 - rows[0] : r1 - rows[0], c0 - cols[0] : c1 - cols[0]]
            # a named tuple, not image[(slice(None), *out)]: mypy reads a starred
            # subscript as 3.11-only syntax even when parenthesised
            bands = (slice(None), *out)
            _render_chunk(region, (r0, r1), (c0, c1), image[bands], labels[out])
    return image, labels


# --- files -------------------------------------------------------------------


def scene_transform(seed: int) -> Affine:
    """Affine transform of sample scene ``seed``: 10 m pixels, a plausible UTM 33N origin."""
    easting = 400000.0 + 10000.0 * (seed % 10)
    northing = 5500000.0 + 10000.0 * ((seed // 10) % 10)
    return Affine(PIXEL_SIZE, 0.0, easting, 0.0, -PIXEL_SIZE, northing)


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"sample scene {name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        limits = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"sample scene {name} {value} is out of range; use {limits}")


def _profiles(seed: int, size: int, block: int) -> tuple[dict, dict]:
    """Creation profiles of the scene and of its label raster."""
    tile = 512 if block % 512 == 0 else 256
    common = dict(
        driver="GTiff",
        width=size,
        height=size,
        dtype="uint8",
        crs=CRS.from_string(SAMPLE_CRS),
        transform=scene_transform(seed),
        tiled=True,
        blockxsize=tile,
        blockysize=tile,
        compress="deflate",
        predictor=2,
        zlevel=1,  # the per-pixel noise leaves little for higher levels to gain
    )
    scene = dict(common, count=3, nodata=SCENE_NODATA, photometric="RGB")
    labels = dict(common, count=1, nodata=LABEL_NODATA)
    return scene, labels


def _sample_mark(kind: str, seed: int, size: int, block: int) -> str:
    """The :data:`SAMPLE_TAG` value of a written ``kind`` (scene or labels): its parameters."""
    return json.dumps({"kind": kind, "seed": int(seed), "size": int(size), "block": int(block)},
                      sort_keys=True)


def _write_scene(seed: int, size: int, block: int, paths: SampleScene) -> None:
    """Write one scene and its labels block by block, under temporary names, then rename."""
    scene_profile, labels_profile = _profiles(seed, size, block)
    parts = [path.with_name(path.name + ".part") for path in (paths.scene, paths.labels)]
    with rasterio.open(parts[0], "w", **scene_profile) as scene, rasterio.open(
        parts[1], "w", **labels_profile
    ) as labels:
        scene.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        scene.update_tags(seed=str(seed), generator="pipeline.samples",
                          **{SAMPLE_TAG: _sample_mark("scene", seed, size, block)})
        colours = {k: (*c.color, 255) for k, c in enumerate(CLASSES)}
        labels.write_colormap(1, {**colours, LABEL_NODATA: (0, 0, 0, 0)})
        labels.update_tags(
            seed=str(seed),
            classes=",".join(c.name for c in CLASSES),
            **{f"class_{k}": c.name for k, c in enumerate(CLASSES)},
            **{SAMPLE_TAG: _sample_mark("labels", seed, size, block)},
        )
        for r0, r1 in _spans(0, size, block):
            for c0, c1 in _spans(0, size, block):
                image, label = render(seed, (r0, r1), (c0, c1), (size, size))
                window = Window(c0, r0, c1 - c0, r1 - r0)
                scene.write(image, window=window)
                labels.write(label, 1, window=window)
    parts[0].replace(paths.scene)
    parts[1].replace(paths.labels)


#: Sub-folder of a sample directory that holds the true label rasters.
TRUTH_DIR = "truth"


def _targets(directory: Path, count: int) -> list[SampleScene]:
    """The paths of the ``count`` scenes and label rasters written to ``directory``."""
    names = [f"scene-{k:03d}" for k in range(count)]
    return [SampleScene(directory / f"{n}.tif", directory / TRUTH_DIR / f"{n}.tif") for n in names]


def is_sample(path: str | Path) -> bool:
    """Whether ``path`` is a GeoTIFF written here: one with the :data:`SAMPLE_TAG` tag (or
    the tags of samples written before it).

    False for anything else: a missing path, a directory, a file GDAL cannot
    open, a raster without the tag.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        # A user's file may be one rasterio warns about (no georeferencing): the
        # question is only whether it carries the tag. Samples are GeoTIFFs: GDAL is
        # given no other driver, so no other file (a VRT's sources) is ever opened.
        with warnings.catch_warnings(), rasterio.Env():
            warnings.simplefilter("ignore")
            with rasterio.open(path, driver="GTiff") as dataset:
                return marks_sample(dataset.tags())
    except (RasterioError, OSError):
        return False


def marks_sample(tags: Mapping[str, str]) -> bool:
    """Whether a raster's dataset tags (GDAL metadata, default domain) mark it as written
    here: the :data:`SAMPLE_TAG` tag, or the tags of samples written before it (scenes
    carry ``generator=pipeline.samples``, true labels ``seed``, ``classes`` and ``class_0``).
    """
    return (SAMPLE_TAG in tags or tags.get("generator") == "pipeline.samples"
            or {"seed", "classes", "class_0"} <= set(tags))


def _check_replaceable(targets: list[SampleScene]) -> None:
    """Refuse to write over any file that is not an earlier sample, before writing any.

    Raises:
        ConfigError: A target path exists (a file, a directory, a link) and is
            not a GeoTIFF with the :data:`SAMPLE_TAG` tag; the message names it.
    """
    for path in (p for target in targets for p in (target.scene, target.labels)):
        if (path.exists() or path.is_symlink()) and not is_sample(path):
            raise ConfigError(
                f"{path} exists and is not a sample written by fcn-pipeline (it has no "
                f"{SAMPLE_TAG} tag), so it is never replaced: move it away, or write the "
                "samples to another directory"
            )


def write_sample_scenes(
    directory: str | Path, *, size: int = 2048, count: int = 2, seed: int = 0, block: int = 512
) -> list[SampleScene]:
    """Write ``count`` square sample scenes of ``size`` pixels and their label rasters.

    Files are ``directory/scene-{k:03d}.tif`` (3 bands uint8, nodata 0, RGB)
    and ``directory/truth/scene-{k:03d}.tif`` (1 band uint8, nodata 255,
    colour map of :data:`CLASSES`, class names in tags ``class_0``...), scene
    ``k`` made from seed ``seed + k``: tiled, DEFLATE, EPSG:32633 with 10 m
    pixels. Pixels are rendered and written in ``block`` x ``block``
    windows, so memory depends on ``block``, not on ``size``. Every file
    carries the :data:`SAMPLE_TAG` tag, its generation parameters; the same
    arguments write byte-identical files. An existing file of the same name
    is replaced only if it has that tag (an earlier sample): every target is
    checked before any is written. The true labels sit in their own folder so
    that ``directory/*.tif`` matches the scenes only.

    Raises:
        ConfigError: An argument is out of range, or a target file exists that
            is not an earlier sample (:func:`is_sample`); nothing is written.
    """
    _check_int("size", size, 1, MAX_SIZE)
    _check_int("count", count, 1)
    _check_int("block", block, 1)
    _check_int("seed", seed)
    directory = Path(directory)
    targets = _targets(directory, count)
    _check_replaceable(targets)
    (directory / TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    with rasterio.Env():
        for k, paths in enumerate(targets):
            _write_scene(seed + k, size, block, paths)
    return targets


def write_header_scene(path: str | Path, shape: tuple[int, int], *, count: int = 1,
                       dtype: str = "uint8", interleave: str = "band",
                       nodata: float | None = None, block: int = 256) -> Path:
    """Write a GeoTIFF that declares ``shape`` ``(rows, cols)`` px and ``count`` bands of
    ``dtype`` but holds no pixel: GDAL's ``SPARSE_OK`` leaves every block unwritten, so
    a header claiming a million pixels a side takes a few hundred KiB (with
    ``block`` x ``block`` px tiles; strips when the scene is smaller than a tile), and
    every pixel reads as 0. For benchmarks and the tests of :mod:`pipeline.limits`.

    Args:
        path: The file to write (replaced when it exists).
        shape: ``(rows, cols)`` in pixels.
        count: Bands.
        dtype: The bands' numpy dtype name.
        interleave: ``"band"`` or ``"pixel"`` (every band of a block stored together).
        nodata: The nodata value of every band, or ``None``.
        block: Tile side in pixels, a multiple of 16.

    Returns:
        ``path``.
    """
    path = Path(path)
    rows, cols = shape
    layout: dict[str, object] = (
        {"tiled": True, "blockxsize": block, "blockysize": block}
        if min(rows, cols) >= block else {})
    with rasterio.Env(), rasterio.open(
            path, "w", driver="GTiff", height=rows, width=cols, count=count, dtype=dtype,
            crs=CRS.from_string(SAMPLE_CRS), transform=Affine(10, 0, 500000, 0, -10, 4000000),
            nodata=nodata, interleave=interleave, sparse_ok=True, bigtiff="IF_SAFER",
            **layout):
        pass
    return path
