"""Scenes from disk: validated headers and windowed reads, through rasterio.

The only module (with the writers) that opens rasters, and the only one that
turns a ``(row, col)`` :class:`~pipeline.grid.Box` into rasterio's
``Window(col_off, row_off, width, height)``. Every open of a scene goes through
:func:`_dataset`, inside one ``rasterio.Env`` holding all GDAL options; nothing
here touches ``os.environ``.

Scenes read only what they are: :func:`pipeline.formats.scene_file` decides from the
file's bytes whether it is a GeoTIFF (or, with ``allow_vrt``, a plain VRT of local
GeoTIFFs), GDAL's own list of the files of each such VRT is checked against it, and
GDAL is then told to use that one driver. The GDAL options close the network file
systems to anything that would get past those checks.

:func:`open_scene` reads a header once and refuses what the pipeline cannot
georeference faithfully (no CRS unless allowed, rotated or sheared transforms,
GCP-only or RPC-only georeferencing), pixels that are not real numbers (complex
dtypes) and nodata values the dtype cannot hold. :func:`read_window` opens the
file per call and reads only the blocks under one window, so a task carries a
path, never a handle; it also says which pixels are invalid (nodata, masks,
alpha, NaN and infinity), by the rule its docstring states. Read errors
surface as :class:`~pipeline.errors.SceneReadError`: ``GTIFF_IGNORE_READ_ERRORS``
is never set, so an unreadable block is never returned as zeros.
"""

from __future__ import annotations

import logging
import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.windows import Window

from pipeline.errors import SceneError, SceneFormatError, SceneReadError
from pipeline.formats import VRT, SceneFile, scene_file
from pipeline.grid import Box
from pipeline.limits import HeaderLimits, check_header
from pipeline.samples import marks_sample
from pipeline.scene import NUMERIC_KINDS, Affine6, SceneInfo, nodata_problem

# GDAL's messages reach rasterio's logger, and, with no logging configured, Python's
# last-resort handler prints them raw ("_tiffSeekProc: No space left on device."). Every
# one of them that matters becomes an exception here, reported once in one line; an
# application that configures logging still receives them.
logging.getLogger("rasterio").addHandler(logging.NullHandler())

#: GDAL configuration for every open in this module. READDIR off: a scene in a
#: folder of thousands is opened without listing the folder (sidecars such as
#: ``.msk`` are still probed by name). A modest block cache: each read touches
#: one window's blocks once; workers keep their memory for arrays and models.
#: No VRT pixel function runs Python, and /vsicurl/ with every network file system
#: built on it (/vsis3/, /vsigs/, /vsiaz/, /vsizip/ over them...) opens only one name,
#: which no URL has: no request leaves the process. (GDAL 3.10 has no run-time switch
#: for raw VRT bands, GDAL_VRT_ENABLE_RAWRASTERBAND being a build option: those are
#: refused by the format check and by :func:`_check_vrt_files`.)
GDAL_OPTIONS: dict[str, str | int] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE",
    "GDAL_CACHEMAX": 128 * 2**20,
    "GDAL_VRT_ENABLE_PYTHON": "NO",
    "CPL_VSIL_CURL_ALLOWED_FILENAME": "fcn-pipeline reads local files only",
}

#: Rotation or shear terms are accepted as round-off while they move the scene's
#: far edge by less than this many pixels.
SHEAR_TOLERANCE_PX = 1e-3


@contextmanager
def _dataset(path: str | Path, allow_vrt: bool) -> Iterator[tuple[DatasetReader, SceneFile]]:
    """Open the scene at ``path`` read-only, with the one GDAL driver of its format,
    inside this module's GDAL environment.

    rasterio warns ``NotGeoreferencedWarning`` on opening a file without a
    geotransform; :func:`open_scene` makes its own, clearer decision about
    such files, so the warning is silenced here and only here. Likewise
    numpy's overflow warning from rasterio's range check of a nodata value
    such as -1e40 on float32: :func:`open_scene` refuses that value itself.

    Raises:
        SceneFormatError, SceneError, SceneReadError: from
            :func:`pipeline.formats.scene_file`, or GDAL cannot open the file.
    """
    file = Path(path).absolute()
    scene = scene_file(file, allow_vrt=allow_vrt)
    with rasterio.Env(**GDAL_OPTIONS):
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            try:
                _check_vrt_files(file.name, scene)
                # One driver name: rasterio passes it to GDAL as the only driver to try
                # (rasterio.open refuses a list of names in 1.4).
                dataset = rasterio.open(file, driver=scene.driver)
            except RasterioError as exc:
                raise _open_error(file, exc) from exc
        with dataset:
            yield dataset, scene


def _check_vrt_files(name: str, scene: SceneFile) -> None:
    """Refuse a VRT from which GDAL's own parser would read a file that
    :func:`~pipeline.formats.scene_file` did not check (GDAL lists the files of a VRT
    without opening them)."""
    for vrt in scene.vrts:
        with rasterio.open(vrt, driver=VRT) as ds:
            files = list(ds.files)
        unchecked = [f for f in files if os.path.realpath(f) not in scene.files]
        if unchecked:
            raise SceneFormatError(
                f"{name}: GDAL would read {unchecked[0]} for {Path(vrt).name}, which is not a "
                "source that VRT names as a plain local file; fcn-pipeline reads VRT sources "
                "only from local GeoTIFF or VRT files")


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


def open_scene(path: str | Path, *, allow_no_crs: bool = False,
               allow_vrt: bool = False, limits: HeaderLimits | None = None) -> SceneInfo:
    """Open a scene's header and validate it.

    Args:
        path: A local GeoTIFF/COG file (or VRT, with ``allow_vrt``).
        allow_no_crs: Accept a scene without a CRS (``--allow-no-crs``); its
            outputs are then in pixel coordinates of the same transform.
        allow_vrt: Accept a plain VRT of local GeoTIFFs (``--allow-vrt``).
        limits: The most bands and pixels the header may declare, checked before
            anything whose cost grows with them (:func:`pipeline.limits.check_header`).

    Returns:
        The scene's :class:`SceneInfo`, its path made absolute.

    Raises:
        SceneFormatError: The file, or a file it would make GDAL read, is of a
            format the run does not read (see :func:`pipeline.formats.scene_file`).
        SceneReadError: The file is missing or cannot be read.
        SceneLimitError: The header declares more bands or pixels than ``limits``.
        SceneError: The file is not a raster, or its georeferencing is
            refused (no CRS, rotated or sheared, GCP-only or RPC-only), its
            pixels are not numbers a model can be fed (complex, or another
            non-numeric dtype), or its nodata value is one its dtype cannot
            hold (300 or 0.5 on uint8, -1e40 on float32).
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
    with _dataset(file, allow_vrt) as (ds, scene):
        if limits is not None:
            check_header(file.name, ds.count, (ds.height, ds.width), limits)
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
            colorinterp=tuple(c.name for c in ds.colorinterp),
            driver=scene.driver,
            sources=scene.sources,
            interleave=ds.interleaving.name if ds.interleaving else None,
            descriptions=_descriptions(ds),
            sample=marks_sample(ds.tags()),
        )


def _descriptions(ds: DatasetReader) -> tuple[str | None, ...]:
    """Each band's description, ``None`` where it has none; empty when no band has one."""
    found = tuple(d.strip() or None if isinstance(d, str) else None for d in ds.descriptions)
    return found if any(found) else ()


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
    _check_pixels(name, ds)
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


def _check_pixels(name: str, ds: DatasetReader) -> None:
    """Refuse pixels a model cannot be fed, and nodata values the dtype cannot hold."""
    dtype = ds.dtypes[0]
    try:
        kind: str | None = np.dtype(dtype).kind
    except TypeError:  # rasterio names GDAL's complex integers complex_int16, unknown to numpy
        kind = None
    if dtype.startswith("complex") or kind == "c":
        raise SceneError(
            f"{name} has complex pixels ({dtype}), which a model cannot be fed; convert them "
            f'to amplitude first, e.g. gdal_calc.py -A {name} --calc "numpy.absolute(A)" '
            "--type Float32 --outfile amplitude.tif"
        )
    if kind is None or kind not in NUMERIC_KINDS:
        raise SceneError(
            f"{name} has {dtype} pixels, not the booleans, integers or floats a model can be "
            f"fed; convert it first, e.g. gdal_translate -ot Float32 {name} converted.tif"
        )
    values = _declared_nodata(ds)
    for band, value in enumerate(values, start=1):
        problem = None if value is None else nodata_problem(value, dtype)
        if problem:
            which = f" of band {band}" if len({repr(v) for v in values}) > 1 else ""
            raise SceneError(
                f"{name}: nodata value{which} {problem}; set one its pixels can hold "
                f"(gdal_edit.py -a_nodata VALUE {name}) or remove it "
                f"(gdal_edit.py -unsetnodata {name})"
            )


def _declared_nodata(ds: DatasetReader) -> tuple[float | None, ...]:
    """Each band's nodata value as the file declares it, ``None`` where it has none.

    rasterio's ``nodatavals`` reports a value outside the dtype's range as
    ``None`` (and GDAL then masks nothing): a uint8 scene declaring 300 would
    pass silently. The declared values are read from a VRT copy of the header
    (XML, no pixels) where rasterio reports no value for a band.
    """
    reported = tuple(ds.nodatavals)
    if all(v is not None for v in reported):
        return reported
    try:
        with MemoryFile(ext=".vrt") as memory:
            rasterio.shutil.copy(ds, memory.name, driver="VRT")
            root = ElementTree.fromstring(memory.read())
    except (RasterioError, ElementTree.ParseError):
        return reported
    declared: list[float | None] = []
    for band in root.iter("VRTRasterBand"):
        text = band.findtext("NoDataValue")
        try:
            declared.append(None if text is None else float(text))
        except ValueError:
            declared.append(None)
    return tuple(declared) if len(declared) == len(reported) else reported


def _bands_problem(name: str, count: int, bands: Sequence[int],
                   palette: Sequence[int] = (), alpha: Sequence[int] = ()) -> str | None:
    """What is wrong with asking ``name`` (``count`` bands) for ``bands``, if anything.

    ``palette`` lists the scene's bands of palette indices: reading one, or
    asking a palette scene for bands it lacks, gets the advice to expand the
    palette to RGB (indices are not intensities: never repeat or scale them).
    ``alpha`` lists its alpha bands: each is the scene's mask (0 where a pixel
    is not valid, which :func:`read_window` applies), not data; reading one is
    refused with the scene's other bands to choose from.
    """
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
    if palette and (max(wanted) > count or set(wanted) & set(palette)):
        return _palette_advice(name, count, wanted, palette)
    if max(wanted) > count:
        noun = "band" if count == 1 else "bands"
        if count == 1:
            fix = f"set bands: {[1] * len(wanted)} in the model spec to repeat band 1"
        else:
            fix = f"choose bands from 1 to {count} in the model spec"
        return f"{name} has {count} {noun}; the model needs bands {wanted} ({fix})"
    if set(wanted) & set(alpha):
        return _alpha_advice(name, count, wanted, alpha)
    return None


def _alpha_advice(name: str, count: int, wanted: list[int], alpha: Sequence[int]) -> str:
    """The refusal for a model reading an alpha band: the scene's mask, not data."""
    read = sorted(set(wanted) & set(alpha))
    if len(read) == 1:
        which = f"band {read[0]} is an alpha band"
    else:
        which = f"bands {read} are alpha bands"
    data = [b for b in range(1, count + 1) if b not in set(alpha)]
    fix = (f"choose other bands in the model spec, from the data bands {data}" if data else
           "it has no other band, so no data for the model; choose another scene")
    return (
        f"{name} {which} (the scene's mask of valid pixels, not data), but the model "
        f"reads bands {wanted}; {fix}"
    )


def _palette_advice(name: str, count: int, wanted: list[int], palette: Sequence[int]) -> str:
    """The refusal for a model reading palette indices: expand the palette to RGB first."""
    stem = Path(name).stem
    fix = f"gdal_translate -expand rgb {name} {stem}-rgb.tif"
    if count == 1:
        return (
            f"{name} has 1 band of palette indices, which are not intensities; the model needs "
            f"bands {wanted}: expand the palette first ({fix}) and run the model on "
            f"{stem}-rgb.tif"
        )
    return (
        f"{name} band {palette[0]} holds palette indices, which are not intensities; "
        f"the model needs bands {wanted}: expand the palette first ({fix})"
    )


def check_bands(info: SceneInfo, bands: Sequence[int], dtypes: Sequence[str] | None = None) -> None:
    """Check that a scene has the 1-based ``bands`` and one of ``dtypes``.

    A band whose colour interpretation is palette holds indices into a colour
    table, not intensities: a model that reads one is refused, whatever its
    band count, with the advice to expand the palette to RGB first
    (``gdal_translate -expand rgb IN OUT``); a one-band palette scene is never
    told to repeat band 1. A band whose colour interpretation is alpha is the
    scene's mask of valid pixels, which :func:`read_window` applies, not data:
    a model that reads one (bands ``[1, 2, 3]`` of an ARGB scene) is refused,
    with the scene's other bands to choose from.

    Args:
        info: The scene, from :func:`open_scene`.
        bands: 1-based band numbers the model reads (repeats allowed).
        dtypes: The dtypes the model accepts; ``None`` accepts any.

    Raises:
        SceneError: A band is missing, a band read holds palette indices or is
            an alpha band, or the dtype is not accepted; the message names the
            file, the band and the fix.
    """
    name = Path(info.path).name
    alpha = tuple(i + 1 for i, interp in enumerate(info.colorinterp) if interp == "alpha")
    problem = _bands_problem(name, info.count, bands, info.palette_bands, alpha)
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


def read_window(path: str | Path, box: Box, bands: Sequence[int], *,
                allow_vrt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one window of a scene, and which of its pixels are valid.

    Only the blocks under ``box`` are read, of the ``bands`` asked for and of
    what the mask needs: each alpha band, and, for GDAL's nodata rule, other
    bands' masks one band at a time and only until every pixel is known valid.
    Memory never grows with the scene's band count, except that a block of a
    pixel-interleaved scene holds every band (:func:`pipeline.limits.read_bytes`).
    A pixel is invalid where:

    - GDAL's dataset mask says so: its nodata value (an integer pixel is
      nodata only where every band of the scene is: 0 in one band of an 8-bit
      image is a real value), an internal or sidecar mask, or the alpha band
      GDAL recognises (band 2 of 2, band 4 of 4);
    - any band whose colour interpretation is alpha, in any position, is 0
      (GDAL ignores, for example, band 5 of a 5-band scene marked alpha);
    - any band read is NaN, +inf or -inf;
    - for a floating-point scene with a nodata value, any band read equals
      its band's nodata value exactly (a float sentinel such as -9999 or
      -1e20 is never a measurement; compared in the scene's dtype).

    The value rules alone are :func:`pixel_validity`.

    Args:
        path: The scene file.
        box: The window in ``(rows, cols)`` pixels, inside the scene.
        bands: 1-based band numbers, in the order wanted; repeats allowed.
        allow_vrt: Accept a plain VRT of local GeoTIFFs, checked again at every
            read (a scene planned as a GeoTIFF is read only as one).

    Returns:
        ``(data, valid)``: ``data`` of shape ``(len(bands), h, w)`` in the
        file's dtype, raw (invalid pixels hold whatever the file holds);
        ``valid`` of shape ``(h, w)``, bool, for the whole window.

    Raises:
        SceneFormatError: The file is no longer of a format the run reads (as
            :func:`open_scene`).
        SceneError: The box is empty or leaves the scene, or a band is missing.
        SceneReadError: A block under the window cannot be read (truncated or
            corrupt file); the message names the file and the window.
    """
    file = Path(path)
    with _dataset(file, allow_vrt) as (ds, _):
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
        wanted = [int(b) for b in bands]
        try:
            data = ds.read(wanted, window=window)
            valid = _mask_validity(ds, window)
            for band, interp in enumerate(ds.colorinterp, start=1):
                if interp == ColorInterp.alpha:
                    valid &= ds.read(band, window=window) != 0
        except RasterioError as exc:
            cause = exc.__cause__ or exc
            raise SceneReadError(
                f"{file.name}: cannot read window {_describe(box)} ({cause}); the file may be "
                f"truncated or corrupt: copy or download it again ({file.absolute()})"
            ) from exc
        nodata = [ds.nodatavals[b - 1] for b in wanted] if data.dtype.kind == "f" else None
    valid &= pixel_validity(data, nodata)
    return data, valid


def _mask_validity(ds: DatasetReader, window: Window) -> np.ndarray:
    """Where GDAL's dataset mask says a window's pixels are valid, bool ``(rows, cols)``,
    reading one band's mask at a time.

    The rule is rasterio's ``dataset_mask``: a per-dataset mask (internal, sidecar, or
    an alpha band GDAL recognises) is the mask; a 4-band scene whose band 1 is red takes
    band 4's; otherwise a pixel is valid where any band's mask says so. rasterio reads
    the masks of every band at once for that last case: one 256 px window of a scene
    with 65,535 bands took 4 GiB. Here the masks are read band by band, and no more once
    every pixel is valid: at once for a scene without nodata, every band only where a
    window holds pixels that are nodata in all of them.
    """
    flags = ds.mask_flag_enums
    if MaskFlags.per_dataset in flags[0]:
        return ds.read_masks(1, window=window) > 0
    if ds.count == 4 and ds.colorinterp[0] == ColorInterp.red:
        return ds.read_masks(4, window=window) > 0
    shape = (int(window.height), int(window.width))
    if any(MaskFlags.all_valid in band for band in flags):
        return np.ones(shape, dtype=bool)
    valid = np.zeros(shape, dtype=bool)
    for band in range(1, ds.count + 1):
        valid |= ds.read_masks(band, window=window) > 0
        if valid.all():
            break
    return valid


def pixel_validity(data: np.ndarray, nodata: float | Sequence[float | None] | None = None,
                   ) -> np.ndarray:
    """Where a window's values are measurements, judged by the values alone.

    A pixel is invalid where any band is NaN or +-inf; with ``nodata``, for
    floating-point data where any band equals its nodata value, and for
    integer data where every band equals it (GDAL's rule). Masks and alpha
    bands are :func:`read_window`'s business.

    Args:
        data: ``(bands, rows, cols)``, any numeric dtype.
        nodata: One value for every band, one per band (``None`` for a band
            without one), or ``None``. Compared in ``data``'s dtype, so it
            must be a value that dtype holds (see
            :func:`pipeline.scene.nodata_problem`).

    Returns:
        ``valid`` of shape ``(rows, cols)``, bool.

    Raises:
        ValueError: ``data`` is not 3-D, or ``nodata`` has not one value per band.
    """
    if data.ndim != 3:
        raise ValueError(f"pixel_validity needs (bands, rows, cols) data, got shape {data.shape}")
    valid = np.ones(data.shape[1:], dtype=bool)
    if data.dtype.kind in "fc":
        valid &= np.isfinite(data).all(axis=0)
    if nodata is None:
        return valid
    values = [nodata] * len(data) if isinstance(nodata, (int, float, np.number)) else list(nodata)
    if len(values) != len(data):
        raise ValueError(f"pixel_validity needs {len(data)} nodata values, got {len(values)}")
    hits = [data[i] == np.asarray(v).astype(data.dtype) for i, v in enumerate(values)
            if v is not None and not np.isnan(v)]
    if not hits:
        return valid
    if data.dtype.kind == "f":
        valid &= ~np.logical_or.reduce(hits)
    elif len(hits) == len(data):
        valid &= ~np.logical_and.reduce(hits)
    return valid
