"""Scenes from disk: validated headers and windowed reads, through rasterio.

The only module (with the writers) that opens rasters, and the only one that
turns a ``(row, col)`` :class:`~pipeline.grid.Box` into rasterio's
``Window(col_off, row_off, width, height)``. Every open goes through
:func:`_dataset`, inside one ``rasterio.Env`` holding all GDAL options; nothing
here touches ``os.environ``.

:func:`open_scene` reads a header once and refuses what the pipeline cannot
georeference faithfully (no CRS unless allowed, rotated or sheared transforms,
GCP-only or RPC-only georeferencing). :func:`read_window` opens the file per
call and reads only the blocks under one window, so a task carries a path, never
a handle. Read errors surface as :class:`~pipeline.errors.SceneReadError`:
``GTIFF_IGNORE_READ_ERRORS`` is never set, so an unreadable block is never
returned as zeros.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from pipeline.errors import SceneError, SceneReadError
from pipeline.grid import Box
from pipeline.scene import Affine6, SceneInfo

#: GDAL configuration for every open in this module. READDIR off: a scene in a
#: folder of thousands is opened without listing the folder (sidecars such as
#: ``.msk`` are still probed by name). A modest block cache: each read touches
#: one window's blocks once; workers keep their memory for arrays and models.
GDAL_OPTIONS: dict[str, str | int] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE",
    "GDAL_CACHEMAX": 128 * 2**20,
}

#: Rotation or shear terms are accepted as round-off while they move the scene's
#: far edge by less than this many pixels.
SHEAR_TOLERANCE_PX = 1e-3


@contextmanager
def _dataset(path: str | Path) -> Iterator[DatasetReader]:
    """Open ``path`` read-only inside this module's GDAL environment.

    rasterio warns ``NotGeoreferencedWarning`` on opening a file without a
    geotransform; :func:`open_scene` makes its own, clearer decision about
    such files, so the warning is silenced here and only here.
    """
    with rasterio.Env(**GDAL_OPTIONS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            try:
                dataset = rasterio.open(path)
            except RasterioError as exc:
                raise _open_error(Path(path), exc) from exc
        with dataset:
            yield dataset


def _open_error(path: Path, exc: RasterioError) -> SceneError:
    """The error for a file rasterio cannot open, by cause."""
    name = path.name
    if not path.exists():
        return SceneReadError(f"{name}: no such file ({path.absolute()}); check the scene path")
    if path.is_dir():
        return SceneError(f"{name} is not a raster but a directory ({path.absolute()})")
    if "not recognized as being in a supported file format" in str(exc):
        return SceneError(
            f"{name} is not a raster: GDAL does not recognise its format ({path.absolute()})"
        )
    return SceneReadError(
        f"{name} cannot be opened ({exc}); the file may be truncated or corrupt ({path.absolute()})"
    )


def open_scene(path: str | Path, *, allow_no_crs: bool = False) -> SceneInfo:
    """Open a scene's header and validate it.

    Args:
        path: A local raster file (GeoTIFF or any GDAL raster).
        allow_no_crs: Accept a scene without a CRS (``--allow-no-crs``); its
            outputs are then in pixel coordinates of the same transform.

    Returns:
        The scene's :class:`SceneInfo`, its path made absolute.

    Raises:
        SceneReadError: The file is missing or cannot be read.
        SceneError: The file is not a raster, or its georeferencing is
            refused (no CRS, rotated or sheared, GCP-only or RPC-only).
    """
    file = Path(path)
    try:
        stat = file.stat()
    except FileNotFoundError:
        raise SceneReadError(
            f"{file.name}: no such file ({file.absolute()}); check the scene path"
        ) from None
    except OSError as exc:
        raise SceneReadError(f"{file.name} cannot be accessed: {exc}") from exc
    with _dataset(file) as ds:
        _check_header(file.name, ds, allow_no_crs)
        return SceneInfo(
            path=str(file.absolute()),
            shape=(ds.height, ds.width),
            count=ds.count,
            dtype=ds.dtypes[0],
            crs=ds.crs.to_wkt() if ds.crs else None,
            transform=_affine6(ds),
            nodata=ds.nodata,
            block_shape=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
            size_bytes=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
        )


def _affine6(ds: DatasetReader) -> Affine6:
    t = ds.transform
    return (float(t.a), float(t.b), float(t.c), float(t.d), float(t.e), float(t.f))


def _check_header(name: str, ds: DatasetReader, allow_no_crs: bool) -> None:
    """Refuse a header the pipeline cannot process or georeference faithfully."""
    if ds.count == 0:
        hint = f"; open one of its subdatasets, e.g. {ds.subdatasets[0]}" if ds.subdatasets else ""
        raise SceneError(f"{name} is not a raster: it has no bands{hint}")
    if len(set(ds.dtypes)) > 1:
        raise SceneError(
            f"{name} has bands of different dtypes {list(ds.dtypes)}; "
            "convert it to one dtype first, e.g. gdal_translate -ot"
        )
    a, b, _, d, e, _ = _affine6(ds)
    if a == 0 or e == 0:
        raise SceneError(
            f"{name} has a degenerate transform {_affine6(ds)} (a pixel size of zero)"
        )
    rows, cols = ds.height, ds.width
    if abs(b) * rows > SHEAR_TOLERANCE_PX * abs(a) or abs(d) * cols > SHEAR_TOLERANCE_PX * abs(e):
        raise SceneError(
            f"{name} has the rotated or sheared transform {_affine6(ds)}: rotated "
            "georeferencing is not supported; warp it to a north-up grid first, "
            f"e.g. gdalwarp {name} north-up.tif"
        )
    gcps, _ = ds.gcps
    if ds.transform.is_identity and gcps:
        raise SceneError(
            f"{name} is georeferenced only by {len(gcps)} ground control points (GCPs), "
            "not by a transform: GCP georeferencing is not supported; warp it to a "
            f"north-up grid first, e.g. gdalwarp {name} north-up.tif"
        )
    if ds.transform.is_identity and ds.rpcs is not None:
        raise SceneError(
            f"{name} is georeferenced only by rational polynomial coefficients (RPCs), "
            "not by a transform: RPC georeferencing is not supported; orthorectify it "
            f"first, e.g. gdalwarp -rpc -to RPC_DEM=dem.tif {name} ortho.tif"
        )
    if ds.crs is None and not allow_no_crs:
        raise SceneError(
            f"{name} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:4326 {name}) "
            "or pass --allow-no-crs to process it with outputs in its pixel grid, without a CRS"
        )


def _bands_problem(name: str, count: int, bands: Sequence[int]) -> str | None:
    """What is wrong with asking ``name`` (``count`` bands) for ``bands``, if anything."""
    wanted = list(bands)
    if not wanted:
        return f"the model asks {name} for no bands; list at least one band in the model spec"
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) for b in wanted):
        return f"band numbers must be integers, got {wanted} for {name}"
    wanted = [int(b) for b in wanted]
    if min(wanted) < 1:
        return (
            f"the model asks {name} for bands {wanted}; band numbers are 1-based "
            f"(1 to {count})"
        )
    if max(wanted) <= count:
        return None
    noun = "band" if count == 1 else "bands"
    if count == 1:
        fix = f"set bands: {[1] * len(wanted)} in the model spec to repeat band 1"
    else:
        fix = f"choose bands from 1 to {count} in the model spec"
    return f"{name} has {count} {noun}; the model needs bands {wanted} ({fix})"


def check_bands(info: SceneInfo, bands: Sequence[int], dtypes: Sequence[str] | None = None) -> None:
    """Check that a scene has the 1-based ``bands`` and one of ``dtypes``.

    Args:
        info: The scene, from :func:`open_scene`.
        bands: 1-based band numbers the model reads (repeats allowed).
        dtypes: The dtypes the model accepts; ``None`` accepts any.

    Raises:
        SceneError: A band is missing or the dtype is not accepted; the
            message names the file and the fix.
    """
    name = Path(info.path).name
    problem = _bands_problem(name, info.count, bands)
    if problem:
        raise SceneError(problem)
    if dtypes is not None and info.dtype not in dtypes:
        accepted = list(dtypes)
        raise SceneError(
            f"{name} has dtype {info.dtype}; the model accepts {accepted} "
            f"(convert the scene first, e.g. gdal_translate -ot {accepted[0] if accepted else '?'})"
        )


def _window(box: Box) -> Window:
    """The rasterio window of a ``(rows, cols)`` box: the one conversion point."""
    return Window(box.cols.start, box.rows.start, box.cols.size, box.rows.size)


def _describe(box: Box) -> str:
    return (
        f"rows {box.rows.start}:{box.rows.stop}, cols {box.cols.start}:{box.cols.stop}"
    )


def read_window(path: str | Path, box: Box, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Read one window of a scene, and where it has data.

    Only the blocks under ``box`` are read. ``valid`` is GDAL's dataset mask
    (from nodata values, an alpha band or an internal mask; with nodata values
    a pixel is valid where any band of the scene is not nodata), and for
    floating-point data also False wherever one of the requested bands is NaN.

    Args:
        path: The scene file.
        box: The window in ``(rows, cols)`` pixels, inside the scene.
        bands: 1-based band numbers, in the order wanted; repeats allowed.

    Returns:
        ``(data, valid)``: ``data`` of shape ``(len(bands), h, w)`` in the
        file's dtype; ``valid`` of shape ``(h, w)``, bool.

    Raises:
        SceneError: The box is empty or leaves the scene, or a band is missing.
        SceneReadError: A block under the window cannot be read (truncated or
            corrupt file); the message names the file and the window.
    """
    file = Path(path)
    with _dataset(file) as ds:
        if not (
            0 <= box.rows.start < box.rows.stop <= ds.height
            and 0 <= box.cols.start < box.cols.stop <= ds.width
        ):
            raise SceneError(
                f"{file.name}: window {_describe(box)} is empty or outside the scene "
                f"({ds.height} rows x {ds.width} cols)"
            )
        problem = _bands_problem(file.name, ds.count, bands)
        if problem:
            raise SceneError(problem)
        window = _window(box)
        try:
            data = ds.read([int(b) for b in bands], window=window)
            valid = ds.dataset_mask(window=window) > 0
        except RasterioError as exc:
            cause = exc.__cause__ or exc
            raise SceneReadError(
                f"{file.name}: cannot read window {_describe(box)} ({cause}); the file may be "
                f"truncated or corrupt: copy or download it again ({file.absolute()})"
            ) from exc
    if np.issubdtype(data.dtype, np.inexact):
        valid &= ~np.isnan(data).any(axis=0)
    return data, valid

