"""Label map outputs: a Zarr v3 store written tile by tile, and a COG made from it.

The store is one Zarr v3 group laid out the way xarray and rioxarray read
georeferenced rasters::

    labels          (y, x)         label_dtype(n_classes), fill_value = nodata
    probabilities   (class, y, x)  float16, optional, fill_value = NaN
    x, y            (x,), (y,)     float64 pixel-centre coordinates
    spatial_ref     ()             CF grid mapping: crs_wkt, spatial_ref, GeoTransform

Its metadata is written once, by :func:`create_label_store`, and consolidated;
after that :func:`write_labels` only writes chunks, one per tile, so tiles can
be written concurrently from any number of processes without locks. The COG
(:func:`write_cog`) is made block by block from the store, never holding the
label map in memory.

All shapes and indices are ``(row, col)``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from xml.etree import ElementTree

import numpy as np
import rasterio
import rasterio.shutil
import zarr
import zarr.codecs
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Compression
from rasterio.errors import CRSError, RasterioError

from pipeline.config import usable_cores
from pipeline.errors import OutputError
from pipeline.grid import Box
from pipeline.labels import LabelClass, label_dtype
from pipeline.overviews import COG_BLOCKSIZE, level_shape, majority_2x2, overview_factors

# GDAL's messages reach rasterio's logger, and, with no logging configured, Python's
# last-resort handler prints them raw ("_tiffSeekProc: No space left on device."). Every
# one of them that matters becomes an exception here, reported once in one line; an
# application that configures logging still receives them.
logging.getLogger("rasterio").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.core.common import JSON

#: Names of the arrays in a label store.
LABELS = "labels"
PROBABILITIES = "probabilities"
GRID_MAPPING = "spatial_ref"

#: GDAL block cache while making a COG: bounds its memory whatever the scene size.
COG_CACHE_BYTES = 256 * 2**20

#: Chunks are written even when they hold only the fill value: a tile writes its chunk
#: once, and comparing every chunk with the fill value first costs more than writing it.
#: (The ignore: zarr imports ``NotRequired`` from ``typing``, which mypy does not see for
#: python_version 3.10, so it takes both keys of ``ArrayConfigParams`` as required.)
_WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}  # type: ignore[typeddict-item]

_CONSOLIDATED_V3_WARNING = "Consolidated metadata is currently not part in the Zarr format 3"


@dataclass(frozen=True)
class LabelStoreSpec:
    """What a label store holds: grid, chunking, georeference, classes.

    ``shape`` is the output ``(rows, cols)`` on the scene's grid; ``chunks``
    the core tile shape (each tile writes exactly one chunk); ``crs`` WKT or
    ``None``; ``transform`` the affine ``(a, b, c, d, e, f)`` in rasterio
    order; ``nodata`` the label written where the scene has no data (it must
    not be a class value); ``attrs`` extra JSON metadata (run settings, model
    checksum) stored in the group attributes and copied into the COG tags.
    """

    shape: tuple[int, int]
    chunks: tuple[int, int]
    crs: str | None
    transform: tuple[float, ...]
    classes: tuple[LabelClass, ...]
    nodata: int
    probabilities: bool = False
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise OutputError(f"label map shape must be two positive ints, got {self.shape}")
        if len(self.chunks) != 2 or min(self.chunks) < 1:
            raise OutputError(f"label map chunks must be two positive ints, got {self.chunks}")
        if len(self.transform) != 6:
            raise OutputError(
                f"transform must be the 6 affine coefficients (a, b, c, d, e, f), "
                f"got {len(self.transform)} values"
            )
        if not self.classes:
            raise OutputError("a label map needs at least one class")
        n = len(self.classes)
        info = np.iinfo(self.dtype)
        if not (n <= self.nodata <= info.max):
            raise OutputError(
                f"nodata label {self.nodata} must lie in [{n}, {info.max}] for {n} classes "
                f"stored as {self.dtype} (class values are 0..{n - 1}); use e.g. {info.max}"
            )
        if self.crs is not None:
            try:
                CRS.from_wkt(self.crs)
            except CRSError as exc:
                raise OutputError(f"label map CRS is not valid WKT: {exc}") from exc
        try:
            json.dumps(dict(self.attrs), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise OutputError(f"label store attrs must be plain JSON values: {exc}") from exc

    @property
    def dtype(self) -> np.dtype:
        return label_dtype(len(self.classes))


# --------------------------------------------------------------------------- Zarr store


def create_label_store(path: str | Path, spec: LabelStoreSpec) -> None:
    """Create (overwrite) the Zarr v3 label store at ``path`` for ``spec``.

    Every chunk starts out missing, which reads as ``nodata`` (labels) and NaN
    (probabilities). The metadata is consolidated so that
    ``xarray.open_zarr(path)`` opens it with one read and no warning; it never
    changes afterwards.
    """
    names = [c.name for c in spec.classes]
    n = len(names)
    transform = Affine(*spec.transform)
    label_attrs: dict[str, Any] = {
        "long_name": "class label",
        "grid_mapping": GRID_MAPPING,
        "coordinates": GRID_MAPPING,
        "_FillValue": int(spec.nodata),
        "nodata": int(spec.nodata),
        "flag_values": list(range(n)),
        "flag_meanings": " ".join("_".join(name.split()) for name in names),
        "class_names": names,
        "class_colors": [list(c.color) for c in spec.classes],
    }
    try:
        group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=dict(spec.attrs))
        group.create_array(
            LABELS,
            shape=spec.shape,
            chunks=spec.chunks,
            dtype=spec.dtype,
            fill_value=int(spec.nodata),
            compressors=zarr.codecs.ZstdCodec(),
            dimension_names=["y", "x"],
            attributes=label_attrs,
        )
        if spec.probabilities:
            group.create_array(
                PROBABILITIES,
                shape=(n, *spec.shape),
                chunks=(n, *spec.chunks),
                dtype=np.float16,
                fill_value=float("nan"),
                compressors=zarr.codecs.ZstdCodec(),
                dimension_names=["class", "y", "x"],
                attributes={
                    "long_name": "class score",
                    "grid_mapping": GRID_MAPPING,
                    "coordinates": GRID_MAPPING,
                    "class_names": names,
                },
            )
        _create_coordinates(group, spec.shape, transform, spec.crs)
        _create_grid_mapping(group, transform, spec.crs)
        with warnings.catch_warnings():
            # Written once by us and read by zarr-python and xarray; the warning
            # only says other Zarr v3 readers may not use it (they still read
            # the per-array metadata).
            warnings.filterwarnings("ignore", message=_CONSOLIDATED_V3_WARNING)
            zarr.consolidate_metadata(str(path), zarr_format=3)
    except OSError as exc:
        raise OutputError(f"cannot create the label store {path}: {_os_cause(exc)}") from exc


def _create_coordinates(
    group: zarr.Group, shape: tuple[int, int], transform: Affine, crs: str | None
) -> None:
    """1-D pixel-centre coordinates ``y`` and ``x``.

    Exact for north-up grids; for a rotated transform they follow the
    unrotated axes and the ``GeoTransform`` of ``spatial_ref`` is what holds.
    """
    rows, cols = shape
    a, _, c, _, e, f = transform[:6]
    x = c + a * (np.arange(cols, dtype=np.float64) + 0.5)
    y = f + e * (np.arange(rows, dtype=np.float64) + 0.5)
    geographic = crs is not None and CRS.from_wkt(crs).is_geographic
    names = {
        "x": ("longitude", "degrees_east") if geographic else ("projection_x_coordinate", None),
        "y": ("latitude", "degrees_north") if geographic else ("projection_y_coordinate", None),
    }
    for dim, values in (("x", x), ("y", y)):
        standard_name, units = names[dim]
        attrs: dict[str, JSON] = {
            "axis": dim.upper(),
            "standard_name": standard_name,
            "long_name": f"{dim} of pixel centre",
        }
        if units:
            attrs["units"] = units
        array = group.create_array(
            dim,
            shape=values.shape,
            chunks=values.shape,
            dtype=np.float64,
            fill_value=float("nan"),
            dimension_names=[dim],
            attributes=attrs,
        )
        array[:] = values


def _create_grid_mapping(group: zarr.Group, transform: Affine, crs: str | None) -> None:
    """The CF grid-mapping scalar that rioxarray and GDAL read the georeference from."""
    attrs: dict[str, Any] = {"GeoTransform": " ".join(repr(float(v)) for v in transform.to_gdal())}
    if crs is not None:
        attrs["crs_wkt"] = crs
        attrs["spatial_ref"] = crs
    array = group.create_array(
        GRID_MAPPING, shape=(), dtype=np.int64, fill_value=0, attributes=attrs
    )
    array[()] = 0


def write_labels(
    path: str | Path,
    core: Box,
    labels: np.ndarray,
    probabilities: np.ndarray | None = None,
) -> list[str]:
    """Write one tile's labels (and scores) to the chunk at ``core``.

    ``core`` must be exactly one chunk of the store (clipped at the scene's
    far edges); ``labels`` has ``core.shape`` and holds class values or
    nodata; ``probabilities`` has ``(n_classes, *core.shape)``.

    Returns:
        The chunk files written, relative to the store (``labels/c/I/J``, ...).

    Raises:
        OutputError: the tile is not one chunk, the values do not fit the store, or
            the chunk cannot be written (one line: the path and the cause).
    """
    group = _open_store(path, mode="r+")
    array = _member(group, LABELS, path).with_config(_WRITE_CONFIG)
    _check_chunk(path, core, array.shape, array.chunks)
    attrs = array.attrs.asdict()
    names, nodata = attrs["class_names"], attrs["nodata"]
    if not isinstance(names, list) or not isinstance(nodata, int):
        raise OutputError(f"{path} is not a label store: its {LABELS!r} array has no class "
                          f"names or no nodata label")
    block = _checked_labels(path, core, labels, len(names), nodata)
    scores = None
    if probabilities is not None:
        if PROBABILITIES not in group:
            raise OutputError(
                f"{path} has no probabilities array; create it with probabilities=True "
                f"to store class scores"
            )
        scores = np.asarray(probabilities)
        want = (len(names), *core.shape)
        if scores.shape != want:
            raise OutputError(
                f"probabilities for tile {_box_text(core)} have shape {scores.shape}; "
                f"{path} needs {want}"
            )
    index = (core.rows.start // array.chunks[0], core.cols.start // array.chunks[1])
    written = [f"{LABELS}/{array.metadata.encode_chunk_key(index)}"]
    try:
        array[core.slices()] = block.astype(array.dtype, copy=False)
        if scores is not None:
            scored = _member(group, PROBABILITIES, path).with_config(_WRITE_CONFIG)
            region = (slice(None), *core.slices())
            scored[region] = scores.astype(np.float16, copy=False)
            written.append(f"{PROBABILITIES}/{scored.metadata.encode_chunk_key((0, *index))}")
    except OSError as exc:
        raise OutputError(f"cannot write tile {_box_text(core)} to {path}: "
                          f"{_os_cause(exc)}") from exc
    return written


def create_overview_store(path: str | Path, shape: tuple[int, int], chunks: tuple[int, int],
                          levels: int, dtype: np.dtype, nodata: int) -> None:
    """Create (overwrite) the Zarr v3 store of the first ``levels`` overview levels of a
    ``shape`` label map whose tiles are ``chunks``: one array per level, named by its
    factor (``"2"``, ``"4"``, ...), chunked so that each tile writes one chunk of each.
    """
    try:
        group = zarr.open_group(str(path), mode="w", zarr_format=3,
                                attributes={"shape": list(shape), "levels": levels})
        for level in range(1, levels + 1):
            f = 2**level
            group.create_array(
                str(f),
                shape=level_shape(shape, level),
                chunks=(max(1, chunks[0] // f), max(1, chunks[1] // f)),
                dtype=dtype,
                fill_value=int(nodata),
                compressors=zarr.codecs.ZstdCodec(),
            )
    except OSError as exc:
        raise OutputError(f"cannot create the overview store {path}: {_os_cause(exc)}") from exc


def write_overviews(path: str | Path, core: Box, levels: list[np.ndarray]) -> list[str]:
    """Write one tile's overview levels (``levels[k]`` is level ``k + 1`` of its labels,
    from :func:`pipeline.overviews.pyramid`) into the overview store at ``path``.

    Returns:
        The chunk files written, relative to the store (``2/c/I/J``, ``4/c/I/J``, ...).
    """
    for level in range(1, len(levels) + 1):
        f = 2**level
        if core.rows.start % f or core.cols.start % f:
            raise OutputError(
                f"tile {_box_text(core)} does not start on the {f}x{f} grid of overview "
                f"level {level} in {path}"
            )
    group = _open_store(path, mode="r+")
    arrays = [_member(group, str(2**level), path).with_config(_WRITE_CONFIG)
              for level in range(1, len(levels) + 1)]
    written = []
    try:
        for level, (array, block) in enumerate(zip(arrays, levels), start=1):
            r0, c0 = core.rows.start // 2**level, core.cols.start // 2**level
            array[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
            index = (r0 // array.chunks[0], c0 // array.chunks[1])
            written.append(f"{2**level}/{array.metadata.encode_chunk_key(index)}")
    except OSError as exc:
        raise OutputError(f"cannot write the overviews of tile {_box_text(core)} to {path}: "
                          f"{_os_cause(exc)}") from exc
    return written


def _stored_overviews(path: str | Path, geo: _StoreGeo, levels: int) -> list[zarr.Array]:
    """The overview levels a store at ``path`` holds for ``geo``'s labels, first ones first."""
    group = _open_store(path, mode="r")
    shape, stored = group.attrs.get("shape"), group.attrs.get("levels")
    if not isinstance(shape, list) or tuple(shape) != tuple(geo.labels.shape):
        raise OutputError(f"{path} holds overviews of a {shape} map, not "
                          f"of the {geo.labels.shape} labels")
    if not isinstance(stored, int):
        raise OutputError(f"{path} is not an overview store: it records no number of levels")
    return [_member(group, str(2**level), path)
            for level in range(1, min(levels, stored) + 1)]


def _open_store(path: str | Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except OSError as exc:
        raise OutputError(
            f"cannot open the label store {path}: {exc} (create it with create_label_store)"
        ) from exc


def _member(group: zarr.Group, name: str, path: str | Path) -> zarr.Array:
    try:
        array = group[name]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise OutputError(f"{path} is not a label store: it has no {name!r} array")
    return array


def _check_chunk(
    path: str | Path, core: Box, shape: tuple[int, ...], chunks: tuple[int, ...]
) -> None:
    for axis, span, n, c in zip(("rows", "cols"), (core.rows, core.cols), shape, chunks):
        stop = min(span.start + c, n)
        if span.start < 0 or span.start >= n or span.start % c or span.stop != stop:
            raise OutputError(
                f"tile {_box_text(core)} is not one chunk of {path}: its {axis} "
                f"[{span.start}, {span.stop}) must start at a multiple of the chunk size {c} "
                f"below {n} and end at min(start + {c}, {n}) (build the tile grid with the "
                f"store's chunks)"
            )


def _checked_labels(
    path: str | Path, core: Box, labels: np.ndarray, n_classes: int, nodata: int
) -> np.ndarray:
    block = np.asarray(labels)
    if block.shape != core.shape:
        raise OutputError(
            f"labels for tile {_box_text(core)} have shape {block.shape}; it needs {core.shape}"
        )
    if block.dtype.kind not in "biu":
        raise OutputError(
            f"labels for tile {_box_text(core)} are {block.dtype}; write integer class values"
        )
    if block.size and (block.min() < 0 or block.max() >= n_classes):
        bad = (block < 0) | ((block >= n_classes) & (block != nodata))
        if bad.any():
            value = block[bad].flat[0]
            raise OutputError(
                f"labels for tile {_box_text(core)} hold {value}, which is neither a class "
                f"(0..{n_classes - 1}) nor nodata ({nodata}) of {path}"
            )
    return block


_NO_SPACE = "No space left on device"
#: Below this many free bytes a failed write is put down to a full file system: libtiff
#: prints ENOSPC to stderr and GDAL then fails later, with an unrelated message.
_FULL_BYTES = 256 * 2**10


def _full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BYTES


def _os_cause(exc: BaseException) -> str:
    """The cause of an OS error in a few words ("No space left on device"), one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _box_text(box: Box) -> str:
    return f"rows [{box.rows.start}, {box.rows.stop}) cols [{box.cols.start}, {box.cols.stop})"


# --------------------------------------------------------------------------- COG


@dataclass(frozen=True)
class _StoreGeo:
    """What the COG needs from a label store, read once from its metadata."""

    labels: zarr.Array
    crs: str | None
    transform: Affine
    nodata: int
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    attrs: Mapping[str, Any]


def write_cog(store: str | Path, tif: str | Path, *, blocksize: int = COG_BLOCKSIZE,
              overviews: str | Path | None = None) -> None:
    """Make a Cloud Optimized GeoTIFF of the store's labels at ``tif``.

    Tiled ``blocksize`` (a multiple of 16), ZSTD (DEFLATE where GDAL lacks
    it), with the store's CRS, transform, nodata, colour map and class names
    (tag ``CLASS_NAMES``, JSON), and overviews down to one block, each level
    the 2x2 majority of the one above (:mod:`pipeline.overviews`: no invented
    class). Levels found in the ``overviews`` store (written by the tiles,
    :func:`write_overviews`) are copied; the rest are computed here.

    Every level goes to a hidden ``.tmp`` GeoTIFF next to ``tif``, block by
    block, so no level is ever held in memory; a VRT ties them together and
    GDAL's COG driver (compressing on all usable cores) writes the COG under
    a temporary name, renamed into place. Temporary files are removed, also
    on failure.
    """
    if blocksize < 16 or blocksize % 16:
        raise OutputError(f"COG blocksize must be a positive multiple of 16, got {blocksize}")
    tif = Path(tif)
    geo = _read_store_geo(store)
    factors = overview_factors((geo.labels.shape[0], geo.labels.shape[1]), blocksize)
    stored = _stored_overviews(overviews, geo, len(factors)) if overviews is not None else []
    staged: list[Path] = []
    threads = str(usable_cores())
    try:
        with rasterio.Env(GDAL_CACHEMAX=COG_CACHE_BYTES, GDAL_NUM_THREADS=threads):
            compress = _best_compression()
            levels = [_temp_path(tif, staged)]
            _write_level(geo, levels[0], 1, geo.labels, blocksize, first=True)
            for k, factor in enumerate(factors):
                levels.append(_temp_path(tif, staged))
                if k < len(stored):
                    _write_level(geo, levels[-1], factor, stored[k], blocksize)
                else:
                    _reduce_level(geo, levels[-2], levels[-1], factor, blocksize)
            vrt = _temp_path(tif, staged)
            _overview_vrt(levels, vrt)
            cog = _temp_path(tif, staged)
            rasterio.shutil.copy(
                str(vrt),
                str(cog),
                driver="COG",
                BLOCKSIZE=blocksize,
                COMPRESS=compress,
                OVERVIEW_COMPRESS=compress,
                OVERVIEWS="FORCE_USE_EXISTING",
                BIGTIFF="IF_SAFER",
                STATISTICS="NO",
                NUM_THREADS=threads,
            )
        os.replace(cog, tif)
    except OutputError:
        raise
    except Exception as exc:  # GDAL reports through several exception classes
        cause = _NO_SPACE if _full(tif.parent) else _os_cause(exc)
        raise OutputError(f"cannot write the COG {tif} from {store}: {cause}") from exc
    finally:
        for path in staged:
            for leftover in (path, path.with_name(path.name + ".aux.xml")):
                leftover.unlink(missing_ok=True)


def _read_store_geo(store: str | Path) -> _StoreGeo:
    group = _open_store(store, mode="r")
    labels = _member(group, LABELS, store)
    grid = _member(group, GRID_MAPPING, store).attrs.asdict()
    attrs = labels.attrs.asdict()
    crs, nodata = grid.get("crs_wkt"), attrs["nodata"]
    names, colors = attrs["class_names"], attrs["class_colors"]
    if not isinstance(nodata, int) or not isinstance(names, list) or not isinstance(colors, list):
        raise OutputError(f"{store} is not a label store: its {LABELS!r} array has no nodata "
                          f"label, class names or class colours")
    # class_colors is as create_label_store wrote it: one [r, g, b] per class.
    rgb = cast("list[list[int]]", colors)
    return _StoreGeo(
        labels=labels,
        crs=None if crs is None else str(crs),
        transform=Affine.from_gdal(*(float(v) for v in str(grid["GeoTransform"]).split())),
        nodata=nodata,
        names=tuple(str(name) for name in names),
        colors=tuple((c[0], c[1], c[2]) for c in rgb),
        attrs=group.attrs.asdict(),
    )


def _temp_path(tif: Path, staged: list[Path]) -> Path:
    """A fresh hidden ``.tmp`` name next to ``tif`` (same file system: atomic rename).

    Not pre-created (as ``mkstemp`` would, with mode 0600): GDAL creates it
    with the usual permissions, which the renamed COG keeps.
    """
    path = tif.with_name(f".{tif.name}.{uuid.uuid4().hex[:12]}.tmp")
    staged.append(path)
    return path


def _level_profile(geo: _StoreGeo, shape: tuple[int, int], factor: int,
                   blocksize: int) -> dict[str, Any]:
    """A temporary tiled GeoTIFF of one level, quickly compressed (it is read once)."""
    compress = _best_compression()
    return {
        "driver": "GTiff",
        "height": shape[0],
        "width": shape[1],
        "count": 1,
        "dtype": geo.labels.dtype.name,
        "crs": CRS.from_wkt(geo.crs) if geo.crs else None,
        "transform": geo.transform @ Affine.scale(factor),
        "nodata": geo.nodata,
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "compress": compress,
        **({"zstd_level": 1} if compress == "ZSTD" else {"zlevel": 1}),
        "bigtiff": "IF_SAFER",
    }


def _write_level(geo: _StoreGeo, path: Path, factor: int, array: zarr.Array, blocksize: int,
                 *, first: bool = False) -> None:
    """One level from a Zarr array, whole blocks at a time; the first level also gets the
    colour map, band description and tags that the COG keeps."""
    shape = (array.shape[0], array.shape[1])
    with rasterio.open(path, "w", **_level_profile(geo, shape, factor, blocksize)) as dst:
        for rows, cols in _block_windows(array.shape, array.chunks, blocksize):
            dst.write(_read_block(array, rows, cols), 1, window=(rows, cols))
        if first:
            colormap = {i: (*color, 255) for i, color in enumerate(geo.colors)}
            colormap[geo.nodata] = (0, 0, 0, 0)
            dst.write_colormap(1, colormap)
            dst.set_band_description(1, "labels")
            dst.update_tags(**_cog_tags(geo))


def _read_block(array: zarr.Array, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """``array[rows, cols]``; a chunk that cannot be read or decoded is named in the error."""
    try:
        return np.asarray(array[slice(*rows), slice(*cols)])
    except Exception as exc:  # zarr and its codecs raise many kinds for a damaged chunk
        chunk = (rows[0] // array.chunks[0], cols[0] // array.chunks[1])
        where = f"{array.store_path}/{array.metadata.encode_chunk_key(chunk)}"
        raise OutputError(f"cannot read the chunk {where}: {_os_cause(exc)}; rerun with "
                          "--overwrite to compute the scene again") from exc


def _reduce_level(geo: _StoreGeo, source: Path, path: Path, factor: int, blocksize: int) -> None:
    """The next level from the previous level's file: 2x2 majority, one output block at a time."""
    step = 2 * blocksize
    with rasterio.open(source) as src:
        shape = level_shape((src.height, src.width), 1)
        with rasterio.open(path, "w", **_level_profile(geo, shape, factor, blocksize)) as dst:
            for r0 in range(0, src.height, step):
                for c0 in range(0, src.width, step):
                    rows, cols = (r0, min(r0 + step, src.height)), (c0, min(c0 + step, src.width))
                    block = majority_2x2(src.read(1, window=(rows, cols)), geo.nodata)
                    dst.write(block, 1, window=((r0 // 2, r0 // 2 + block.shape[0]),
                                                (c0 // 2, c0 // 2 + block.shape[1])))


def _overview_vrt(levels: list[Path], vrt: Path) -> None:
    """A VRT of the first level whose band lists the other levels as its overviews."""
    rasterio.shutil.copy(str(levels[0]), str(vrt), driver="VRT")
    tree = ElementTree.parse(vrt)
    band = tree.getroot().find("VRTRasterBand")
    if band is None:
        raise OutputError(f"GDAL wrote a VRT without a band for {levels[0]}")
    for level in levels[1:]:
        overview = ElementTree.SubElement(band, "Overview")
        ElementTree.SubElement(overview, "SourceFilename", relativeToVRT="0").text = str(
            level.absolute())
        ElementTree.SubElement(overview, "SourceBand").text = "1"
    tree.write(vrt)


def _block_windows(
    shape: tuple[int, ...], chunks: tuple[int, ...], blocksize: int
) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Row-major ``((row0, row1), (col0, col1))`` windows of whole COG blocks.

    About one chunk each, so every block is written once and complete and
    every chunk is read about once.
    """
    steps = [blocksize * max(1, c // blocksize) for c in chunks]
    for r0 in range(0, shape[0], steps[0]):
        for c0 in range(0, shape[1], steps[1]):
            yield (r0, min(r0 + steps[0], shape[0])), (c0, min(c0 + steps[1], shape[1]))


def _cog_tags(geo: _StoreGeo) -> dict[str, str]:
    tags = {"CLASS_NAMES": json.dumps(list(geo.names))}
    if geo.attrs:
        tags["FCN_PIPELINE_ATTRS"] = json.dumps(dict(geo.attrs), sort_keys=True)
    return tags


@functools.cache
def _best_compression() -> str:
    """ZSTD where this GDAL build has it, else DEFLATE (probed once, in memory)."""
    probe = "/vsimem/fcn-pipeline-zstd-probe.tif"
    try:
        with rasterio.open(
            probe,
            "w",
            driver="GTiff",
            width=16,
            height=16,
            count=1,
            dtype="uint8",
            transform=Affine.translation(0, 16) @ Affine.scale(1, -1),
            compress="zstd",
        ) as dst:
            dst.write(np.zeros((1, 16, 16), np.uint8))
        with rasterio.open(probe) as src:
            ok = src.compression == Compression.zstd
    except RasterioError:
        ok = False
    finally:
        try:
            rasterio.shutil.delete(probe)
        except RasterioError:
            pass
    return "ZSTD" if ok else "DEFLATE"
