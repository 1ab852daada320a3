"""Scene headers and windowed reads, on GeoTIFFs made here and on the reference rasters.

Files made in ``tmp_path`` cover each case on its own (odd sizes, nodata, NaN,
alpha, internal masks, missing CRS, rotation, GCPs, RPCs, truncation); the
reference rasters in ``../shared/data`` (skipped when absent) check the same
behaviour on real files, broken ones included.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.rpc import RPC
from rasterio.transform import Affine

from pipeline.errors import PipelineError, SceneError, SceneReadError
from pipeline.grid import Box, Span
from pipeline.readers import check_bands, open_scene, pixel_validity, read_window
from pipeline.scene import SceneInfo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"reference rasters absent: {DATA}")

# Affine built directly: rasterio's from_origin uses affine's deprecated `*` (a warning).
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)


def box(r0: int, r1: int, c0: int, c1: int) -> Box:
    return Box(Span(r0, r1), Span(c0, c1))


def pattern(rows: int, cols: int, count: int = 1, dtype: str = "uint8") -> np.ndarray:
    """Deterministic, position-dependent pixels that are never 0."""
    r = np.arange(rows, dtype=np.int64)[None, :, None]
    c = np.arange(cols, dtype=np.int64)[None, None, :]
    b = np.arange(count, dtype=np.int64)[:, None, None]
    return ((r * 7 + c * 3 + b * 31) % 250 + 1).astype(dtype)


def write_tif(
    path: Path,
    array: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform: Affine | None = TRANSFORM,
    mask: np.ndarray | None = None,
    **profile: Any,
) -> Path:
    """Write a GeoTIFF; ``transform=None`` writes none (rasterio then warns, on purpose)."""
    count, rows, cols = array.shape
    kwargs: dict[str, Any] = dict(
        driver="GTiff", height=rows, width=cols, count=count, dtype=array.dtype.name
    )
    if crs is not None:
        kwargs["crs"] = crs
    if transform is not None:
        kwargs["transform"] = transform
    kwargs.update(profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **kwargs) as ds:
            ds.write(array)
            if mask is not None:
                ds.write_mask(mask)
    return path


# --- open_scene on generated files -------------------------------------------------


def test_open_scene_reads_the_header(tmp_path: Path) -> None:
    path = write_tif(
        tmp_path / "odd.tif",
        pattern(37, 53, count=2, dtype="int16"),
        nodata=-9999,
        tiled=True,
        blockxsize=16,
        blockysize=16,
    )
    info = open_scene(path)
    stat = path.stat()
    assert info == SceneInfo(
        path=str(path.absolute()),
        shape=(37, 53),
        count=2,
        dtype="int16",
        crs=info.crs,
        transform=tuple(TRANSFORM)[:6],  # type: ignore[arg-type]
        nodata=-9999.0,
        block_shape=(16, 16),
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        colorinterp=("gray", "undefined"),
        interleave="pixel",  # GDAL's default for a GeoTIFF of several bands
    )
    assert info.crs is not None and CRS.from_wkt(info.crs).to_epsg() == 32633


def test_open_scene_relative_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tif(tmp_path / "rel.tif", pattern(5, 6))
    monkeypatch.chdir(tmp_path)
    assert open_scene("rel.tif").path == str(tmp_path / "rel.tif")


def test_missing_file_is_a_read_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SceneReadError, match=r"nope\.tif: no such file") as caught:
        open_scene(tmp_path / "nope.tif")
    assert isinstance(caught.value, OSError) and isinstance(caught.value, PipelineError)
    with pytest.raises(SceneReadError, match=r"nope\.tif: no such file"):
        read_window(tmp_path / "nope.tif", box(0, 1, 0, 1), [1])


@pytest.mark.parametrize("content", [b"", b"hello, not an image\n"])
def test_a_file_that_is_not_a_raster_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "text.tif"
    path.write_bytes(content)
    with pytest.raises(SceneError, match=r"text\.tif is not a raster"):
        open_scene(path)


def test_a_tiff_with_a_broken_header_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(SceneReadError, match=r"broken\.tif cannot be opened.*TIFFReadDirectory"):
        open_scene(path)


def test_a_directory_is_not_a_raster(tmp_path: Path) -> None:
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(SceneError, match=r"dir\.tif is not a raster"):
        open_scene(tmp_path / "dir.tif")


def test_no_crs_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "nocrs.tif", pattern(9, 11), crs=None)
    with pytest.raises(SceneError, match=r"nocrs\.tif has no CRS.*--allow-no-crs"):
        open_scene(path)
    info = open_scene(path, allow_no_crs=True)
    assert info.crs is None and info.transform == tuple(TRANSFORM)[:6]


def test_no_transform_at_all_opens_when_allowed_without_a_warning(tmp_path: Path) -> None:
    # rasterio warns NotGeoreferencedWarning on such files; open_scene decides
    # itself, and warnings are errors in this suite.
    path = write_tif(tmp_path / "plain.tif", pattern(9, 11), crs=None, transform=None)
    with pytest.raises(SceneError, match="no CRS"):
        open_scene(path)
    info = open_scene(path, allow_no_crs=True)
    assert info.transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    data, valid = read_window(path, box(2, 5, 3, 9), [1])
    assert np.array_equal(data[0], pattern(9, 11)[0, 2:5, 3:9]) and valid.all()


@pytest.mark.parametrize("allow_no_crs", [False, True])
@pytest.mark.parametrize("crs", ["EPSG:32633", None])
def test_rotated_transform_is_refused(tmp_path: Path, crs: str | None, allow_no_crs: bool) -> None:
    path = write_tif(
        tmp_path / "rot.tif", pattern(10, 15), crs=crs, transform=TRANSFORM @ Affine.rotation(30)
    )
    with pytest.raises(SceneError) as caught:
        open_scene(path, allow_no_crs=allow_no_crs)
    message = str(caught.value)
    assert message.startswith("rot.tif ")
    assert "rotated georeferencing is not supported; warp it to a north-up grid first" in message
    assert "gdalwarp" in message


def test_sheared_transform_is_refused(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "shear.tif", pattern(10, 15), transform=TRANSFORM @ Affine.shear(5))
    with pytest.raises(SceneError, match="rotated georeferencing is not supported"):
        open_scene(path)


def test_round_off_in_the_rotation_terms_is_accepted(tmp_path: Path) -> None:
    a, _b, c, _d, e, f = tuple(TRANSFORM)[:6]
    nearly = Affine(a, 1e-15, c, 1e-15, e, f)
    path = write_tif(tmp_path / "roundoff.tif", pattern(10, 15), transform=nearly)
    assert open_scene(path).shape == (10, 15)


def test_south_up_transform_is_not_rotation(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "southup.tif", pattern(4, 5), transform=Affine(10, 0, 0, 0, 10, 0))
    assert open_scene(path).transform == (10.0, 0.0, 0.0, 0.0, 10.0, 0.0)


def test_gcp_only_georeferencing_is_refused(tmp_path: Path) -> None:
    gcps = [
        GroundControlPoint(0, 0, 100.0, 200.0),
        GroundControlPoint(0, 30, 130.0, 200.0),
        GroundControlPoint(20, 0, 100.0, 180.0),
        GroundControlPoint(20, 30, 130.0, 182.0),
    ]
    path = write_tif(
        tmp_path / "gcps.tif", pattern(20, 30), crs="EPSG:4326", transform=None, gcps=gcps
    )
    with rasterio.open(path) as ds:  # the fixture really is GCP-only
        assert len(ds.gcps[0]) == 4 and ds.transform.is_identity and ds.crs is None
    for allow in (False, True):
        with pytest.raises(SceneError, match=r"gcps\.tif is georeferenced only by 4 ground"):
            open_scene(path, allow_no_crs=allow)


def test_rpc_only_georeferencing_is_refused(tmp_path: Path) -> None:
    rpcs = RPC(
        height_off=0, height_scale=1, lat_off=45, lat_scale=0.1, long_off=10, long_scale=0.1,
        line_off=10, line_scale=10, samp_off=15, samp_scale=15,
        line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
        samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19,
    )  # fmt: skip
    path = write_tif(tmp_path / "rpcs.tif", pattern(20, 30), crs=None, transform=None, rpcs=rpcs)
    with pytest.raises(SceneError, match=r"rpcs\.tif is georeferenced only by rational polynomial"):
        open_scene(path, allow_no_crs=True)


# --- check_bands ---------------------------------------------------------------------


def scene(count: int, dtype: str = "uint8", name: str = "scene.tif",
          colorinterp: tuple[str, ...] = ()) -> SceneInfo:
    return SceneInfo(
        path=f"/data/{name}", shape=(10, 10), count=count, dtype=dtype, crs=None,
        transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), nodata=None, block_shape=(10, 10),
        size_bytes=100, mtime_ns=0, colorinterp=colorinterp,
    )  # fmt: skip


@pytest.mark.parametrize("bands", [[1], [1, 1, 1], [3, 2, 1], [2]])
def test_check_bands_accepts_bands_the_scene_has(bands: list[int]) -> None:
    check_bands(scene(3), bands)
    check_bands(scene(3, "uint16"), bands, dtypes=["uint8", "uint16"])


def test_check_bands_one_band_scene_suggests_repeating_it() -> None:
    with pytest.raises(SceneError) as caught:
        check_bands(scene(1, name="one.tif"), [1, 2, 3])
    assert str(caught.value) == (
        "one.tif has 1 band; the model needs bands [1, 2, 3] "
        "(set bands: [1, 1, 1] in the model spec to repeat band 1)"
    )


def test_check_bands_missing_band_of_a_multiband_scene() -> None:
    with pytest.raises(SceneError) as caught:
        check_bands(scene(3), [1, 2, 5])
    assert str(caught.value) == (
        "scene.tif has 3 bands; the model needs bands [1, 2, 5] "
        "(choose bands from 1 to 3 in the model spec)"
    )


@pytest.mark.parametrize("bands", [[0, 1, 2], [-1], []])
def test_check_bands_refuses_band_zero_negative_and_none(bands: list[int]) -> None:
    with pytest.raises(SceneError, match=r"scene\.tif"):
        check_bands(scene(3), bands)


def test_check_bands_refuses_a_dtype_the_model_does_not_accept() -> None:
    with pytest.raises(SceneError) as caught:
        check_bands(scene(3, "float32"), [1, 2, 3], dtypes=["uint8", "uint16"])
    assert str(caught.value) == (
        "scene.tif has dtype float32; the model accepts ['uint8', 'uint16'] "
        "(convert the scene first, e.g. gdal_translate -ot uint8)"
    )


def test_check_bands_one_band_palette_scene_is_told_to_expand_not_repeat() -> None:
    """A palette band holds indices into a colour table: repeating it as R, G and B
    feeds the network indices as if they were intensities.

    Teeth: check_bands() without the palette bands (_bands_problem(name, count, bands))
    gives the "repeat band 1" advice for [1, 2, 3] and accepts [1]: both cases fail.
    """
    pal = scene(1, name="pal.tif", colorinterp=("palette",))
    with pytest.raises(SceneError) as caught:
        check_bands(pal, [1, 2, 3])
    message = str(caught.value)
    assert message.startswith("pal.tif has 1 band of palette indices")
    assert "gdal_translate -expand rgb pal.tif pal-rgb.tif" in message
    assert "repeat" not in message and "[1, 1, 1]" not in message
    for bands in ([1], [1, 1, 1]):  # a model of matching band count is refused too
        with pytest.raises(SceneError, match=r"pal\.tif .*gdal_translate -expand rgb"):
            check_bands(pal, bands)
    check_bands(scene(1, colorinterp=("gray",)), [1, 1, 1])  # a grey band may be repeated


def test_palette_scene_written_here_is_refused_with_the_expand_advice(tmp_path: Path) -> None:
    """Teeth: open_scene() leaving colorinterp empty makes check_bands accept it: fails."""
    path = write_tif(tmp_path / "pal.tif", pattern(6, 7) % 4)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255)})
    info = open_scene(path)
    assert info.colorinterp == ("palette",) and info.palette_bands == (1,)
    with pytest.raises(SceneError, match=r"^pal\.tif has 1 band of palette indices.*-expand rgb"):
        check_bands(info, [1, 2, 3])


# --- read_window on generated files --------------------------------------------------


def test_read_window_returns_bands_in_order_with_repeats(tmp_path: Path) -> None:
    array = pattern(23, 31, count=3)
    path = write_tif(tmp_path / "rgb.tif", array, tiled=True, blockxsize=16, blockysize=16)
    data, valid = read_window(path, box(5, 22, 7, 31), [3, 1, 1])
    assert data.dtype == np.uint8 and data.shape == (3, 17, 24)
    assert np.array_equal(data, array[[2, 0, 0], 5:22, 7:31])
    assert valid.dtype == np.bool_ and valid.shape == (17, 24) and valid.all()


def test_nodata_pixel_is_invalid_only_where_every_band_is_nodata(tmp_path: Path) -> None:
    array = pattern(6, 7, count=3, dtype="int16")
    array[:, 0, :] = -1  # a whole row of no data
    array[0, 3, 3] = -1  # one band's value equals nodata: the pixel still has data
    path = write_tif(tmp_path / "nd.tif", array, nodata=-1)
    _, valid = read_window(path, box(0, 6, 0, 7), [1])
    expected = np.ones((6, 7), bool)
    expected[0, :] = False
    assert np.array_equal(valid, expected)


def test_float_nan_is_invalid_without_a_nodata_value(tmp_path: Path) -> None:
    array = pattern(5, 6, count=2, dtype="float32")
    array[0, 1, 2] = np.nan
    array[1, 4, 4] = np.nan
    path = write_tif(tmp_path / "nan.tif", array)
    _, valid = read_window(path, box(0, 5, 0, 6), [1, 2])
    assert np.array_equal(valid, ~np.isnan(array).any(axis=0))
    # NaN in a band the model does not read does not matter
    _, valid1 = read_window(path, box(0, 5, 0, 6), [1])
    assert np.array_equal(valid1, ~np.isnan(array[0]))


def test_alpha_band_is_the_mask_even_when_not_read(tmp_path: Path) -> None:
    array = pattern(12, 13, count=4)
    array[3] = 255
    array[3, :4, :] = 0
    path = write_tif(
        tmp_path / "rgba.tif",
        array,
        photometric="RGB",
        alpha="YES",
    )
    data, valid = read_window(path, box(2, 12, 0, 13), [1, 2, 3])
    assert np.array_equal(data, array[:3, 2:12])
    assert np.array_equal(valid, array[3, 2:12] > 0)


def test_internal_mask_is_the_mask(tmp_path: Path) -> None:
    array = pattern(12, 13)
    mask = np.full((12, 13), 255, np.uint8)
    mask[5:, 6:] = 0
    path = write_tif(tmp_path / "masked.tif", array, mask=mask)
    assert not list(tmp_path.glob("*.msk"))  # the mask is inside the file
    _, valid = read_window(path, box(0, 12, 0, 13), [1])
    assert np.array_equal(valid, mask > 0)


def test_float_nodata_in_any_band_read_is_invalid(tmp_path: Path) -> None:
    """A float sentinel in ONE band makes the pixel invalid (it is never a measurement);
    only bands read count. Integer scenes keep GDAL's all-bands rule (the test above).

    Teeth: read_window() without the float nodata rule (nodata=None for float data)
    keeps (1, 2) and (3, 4) valid: fails.
    """
    array = pattern(5, 6, count=3, dtype="float32") / 10
    array[:, 0, 0] = -9999  # every band: GDAL's own mask
    array[1, 1, 2] = -9999  # band 2 only
    array[2, 3, 4] = -9999  # band 3 only
    path = write_tif(tmp_path / "fnd.tif", array, nodata=-9999)
    _, valid = read_window(path, box(0, 5, 0, 6), [1, 2, 3])
    expected = np.ones((5, 6), bool)
    expected[0, 0] = expected[1, 2] = expected[3, 4] = False
    assert np.array_equal(valid, expected)
    _, valid1 = read_window(path, box(0, 5, 0, 6), [1, 1])  # band 3 not read
    expected[3, 4] = expected[1, 2] = True
    assert np.array_equal(valid1, expected)


def test_per_band_float_nodata_values_each_apply_to_their_band(tmp_path: Path) -> None:
    """A VRT declares a different nodata value per band (-9999, -1e20, none): each band's
    value invalidates a pixel through that band only.

    Teeth: comparing every band with band 1's value (ds.nodata) misses (2, 1): fails.
    """
    array = pattern(4, 5, count=3, dtype="float32") / 10
    array[0, 1, 1] = -9999  # band 1's nodata
    array[1, 2, 1] = np.float32(-1e20)  # band 2's nodata
    array[1, 3, 3] = -9999  # band 2 holds band 1's value: a measurement there
    array[2, 0, 4] = -9999  # band 3 has no nodata value
    source = write_tif(tmp_path / "src.tif", array)
    path = write_vrt(tmp_path / "per-band.vrt", source, "Float32", [-9999, -1e20, None])
    assert open_scene(path, allow_vrt=True).nodata == -9999
    data, valid = read_window(path, box(0, 4, 0, 5), [1, 2, 3], allow_vrt=True)
    assert np.array_equal(data, array)
    expected = np.ones((4, 5), bool)
    expected[1, 1] = expected[2, 1] = False
    assert np.array_equal(valid, expected)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_in_any_band_read_are_invalid(tmp_path: Path, value: float) -> None:
    """Teeth: read_window() testing only np.isnan lets +-inf through: the inf cases fail."""
    array = pattern(5, 6, count=2, dtype="float32")
    array[1, 2, 3] = value
    path = write_tif(tmp_path / "nonfinite.tif", array, nodata=-9999)
    _, valid = read_window(path, box(0, 5, 0, 6), [1, 2])
    assert np.array_equal(valid, np.isfinite(array).all(axis=0))
    assert not valid[2, 3] and valid.sum() == 29
    _, unread = read_window(path, box(0, 5, 0, 6), [1])
    assert unread.all()


def five_bands_with_alpha(path: Path, position: int) -> tuple[Path, np.ndarray]:
    """A 5-band float32 scene whose band ``position`` has colour interpretation alpha."""
    array = pattern(8, 9, count=5, dtype="float32")
    alpha = np.full((8, 9), 255, np.float32)
    alpha[2:4, 3:7] = 0
    array[position - 1] = alpha
    write_tif(path, array)
    with rasterio.open(path, "r+") as ds:
        interp = [ColorInterp.undefined] * 5
        interp[position - 1] = ColorInterp.alpha
        ds.colorinterp = interp
    return path, alpha


@pytest.mark.parametrize("position", [1, 3, 5])
def test_alpha_band_in_any_position_is_a_mask(tmp_path: Path, position: int) -> None:
    """GDAL takes alpha from band 2 of 2 and band 4 of 4 only: here its own mask is all
    valid, and the bands' colour interpretation is what makes the alpha count.

    Teeth: read_window() without the colour-interpretation alpha loop: all valid, fails.
    """
    path, alpha = five_bands_with_alpha(tmp_path / f"alpha{position}.tif", position)
    with rasterio.open(path) as ds:
        assert ds.colorinterp[position - 1] == ColorInterp.alpha
        assert (ds.dataset_mask() > 0).all()  # GDAL ignores this alpha band
    others = [b for b in range(1, 6) if b != position]
    for bands in (others, [position], others[:1]):
        _, valid = read_window(path, box(0, 8, 0, 9), bands)
        assert np.array_equal(valid, alpha > 0), bands
    _, part = read_window(path, box(1, 5, 2, 9), others[:2])
    assert np.array_equal(part, alpha[1:5, 2:9] > 0)


def test_pixel_validity_by_value() -> None:
    """The value rules on their own (what tasks use for a nodata.input override).

    Teeth: the integer branch using any-band (like floats) marks (0, 1) invalid: fails.
    """
    ints = np.array([[[0, 0, 5]], [[0, 7, 0]]], dtype=np.uint8)  # (2 bands, 1, 3)
    assert pixel_validity(ints, 0).tolist() == [[False, True, True]]
    assert pixel_validity(ints).all()
    floats = ints.astype(np.float32)
    assert pixel_validity(floats, 0.0).tolist() == [[False, False, False]]
    floats[1, 0, 2] = np.inf
    assert pixel_validity(floats, [None, 7.0]).tolist() == [[True, False, False]]
    assert pixel_validity(floats, np.nan).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="2 nodata values, got 3"):
        pixel_validity(floats, [1.0, 2.0, 3.0])


# --- values a dtype cannot hold, dtypes a model cannot be fed ----------------------------


def write_vrt(path: Path, source: Path, data_type: str, nodata: list[float | None]) -> Path:
    """A VRT over ``source`` declaring ``data_type`` and a nodata value per band as given
    (a VRT keeps values that GeoTIFF or rasterio would round or drop)."""
    with rasterio.open(source) as src:
        rows, cols = src.shape
        geo = ",".join(str(v) for v in src.transform.to_gdal())
    bands = "".join(
        f'<VRTRasterBand dataType="{data_type}" band="{i}">'
        + ("" if value is None else f"<NoDataValue>{value!r}</NoDataValue>")
        + f'<SimpleSource><SourceFilename relativeToVRT="1">{source.name}</SourceFilename>'
        f"<SourceBand>{i}</SourceBand></SimpleSource></VRTRasterBand>"
        for i, value in enumerate(nodata, start=1)
    )
    path.write_text(
        f'<VRTDataset rasterXSize="{cols}" rasterYSize="{rows}"><SRS>EPSG:32633</SRS>'
        f"<GeoTransform>{geo}</GeoTransform>{bands}</VRTDataset>"
    )
    return path


def test_nodata_300_on_uint8_is_refused(tmp_path: Path) -> None:
    """rasterio reports such a value as no nodata at all (and GDAL masks nothing).

    Teeth: _declared_nodata() returning ds.nodatavals (rasterio's view): the scene opens
    with nodata None and this fails.
    """
    path = write_tif(tmp_path / "u300.tif", pattern(4, 5))
    with rasterio.open(path, "r+") as ds:
        ds.nodata = 300
    with rasterio.open(path) as ds:
        assert ds.nodata is None  # what rasterio says
    with pytest.raises(SceneError) as caught:
        open_scene(path)
    assert str(caught.value) == (
        "u300.tif: nodata value 300 is outside the uint8 range (0 to 255); set one its pixels "
        "can hold (gdal_edit.py -a_nodata VALUE u300.tif) or remove it "
        "(gdal_edit.py -unsetnodata u300.tif)"
    )


def test_nodata_half_on_uint8_is_refused(tmp_path: Path) -> None:
    """Teeth: nodata_problem() without the integer check lets 0.5 through: fails."""
    path = write_tif(tmp_path / "half.tif", pattern(4, 5))
    with rasterio.open(path, "r+") as ds:
        ds.nodata = 0.5
    with pytest.raises(SceneError, match=r"^half\.tif: nodata value 0\.5 is not an integer, and "
                                         r"uint8 pixels hold integers only \(0 to 255\); .*"
                                         r"gdal_edit\.py -unsetnodata half\.tif"):
        open_scene(path)


def test_nodata_beyond_float32_is_refused_and_inf_nan_accepted(tmp_path: Path) -> None:
    """Teeth: nodata_problem() without the float range check opens the -1e40 scene: fails."""
    source = write_tif(tmp_path / "f.tif", pattern(4, 5, dtype="float32"))
    with pytest.raises(SceneError, match=r"^big\.vrt: nodata value -1e\+40 is outside the "
                                         r"float32 range \(-3\.403e\+38 to 3\.403e\+38\)"):
        open_scene(write_vrt(tmp_path / "big.vrt", source, "Float32", [-1e40]), allow_vrt=True)
    for value in (float("inf"), float("-inf"), float("nan"), -1e20, -9999.0):
        info = open_scene(write_vrt(tmp_path / "ok.vrt", source, "Float32", [value]),
                          allow_vrt=True)
        assert info.nodata is not None and repr(info.nodata) == repr(value)


def test_per_band_nodata_out_of_range_names_the_band(tmp_path: Path) -> None:
    """Teeth: _check_pixels() checking only band 1's value opens the scene: fails."""
    source = write_tif(tmp_path / "i.tif", pattern(4, 5, count=2, dtype="int16"))
    path = write_vrt(tmp_path / "two.vrt", source, "Int16", [-1, 40000])
    with pytest.raises(SceneError, match=r"^two\.vrt: nodata value of band 2 40000 is outside "
                                         r"the int16 range \(-32768 to 32767\)"):
        open_scene(path, allow_vrt=True)


@pytest.mark.parametrize("dtype", ["complex64", "complex_int16", "complex128"])
def test_complex_scenes_are_refused_at_the_header(tmp_path: Path, dtype: str) -> None:
    """Teeth: _check_pixels() without the complex branch: every complex dtype gets the
    generic non-numeric message, without the amplitude advice: fails."""
    path = tmp_path / "sar.tif"
    with rasterio.open(path, "w", driver="GTiff", height=4, width=5, count=1, dtype=dtype,
                       crs="EPSG:32633", transform=TRANSFORM):
        pass
    with pytest.raises(SceneError) as caught:
        open_scene(path)
    message = str(caught.value)
    assert message.startswith(f"sar.tif has complex pixels ({dtype}), which a model cannot be fed")
    assert "convert them to amplitude first" in message and "\n" not in message


@pytest.mark.parametrize(
    "bad", [box(0, 10, 0, 8), box(0, 9, 0, 9), box(-1, 2, 0, 2), box(3, 3, 0, 2), box(0, 2, 5, 4)]
)
def test_read_window_refuses_boxes_outside_or_empty(tmp_path: Path, bad: Box) -> None:
    path = write_tif(tmp_path / "small.tif", pattern(9, 8))
    message = r"small\.tif: window rows .* outside the scene \(9 rows x 8 cols\)"
    with pytest.raises(SceneError, match=message):
        read_window(path, bad, [1])


def test_read_window_refuses_a_missing_band(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "one.tif", pattern(9, 8))
    with pytest.raises(SceneError, match=r"one\.tif has 1 band; the model needs bands \[1, 2\]"):
        read_window(path, box(0, 2, 0, 2), [1, 2])


def truncate(path: Path, fraction: float) -> None:
    with path.open("r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


def test_read_window_reads_only_its_blocks_of_a_tiled_file(tmp_path: Path) -> None:
    # Cut away the second half of a tiled file: a window in the first tiles still
    # reads, so reading it did not need the rest of the file; a late one fails.
    array = pattern(2048, 2048)
    path = write_tif(tmp_path / "big.tif", array, tiled=True, blockxsize=256, blockysize=256)
    truncate(path, 0.5)
    assert open_scene(path).shape == (2048, 2048)
    data, valid = read_window(path, box(256, 768, 512, 1024), [1])
    assert np.array_equal(data[0], array[0, 256:768, 512:1024]) and valid.all()
    with pytest.raises(SceneReadError, match=r"big\.tif: cannot read window rows 1536:2048, cols"):
        read_window(path, box(1536, 2048, 0, 512), [1])


def test_read_window_of_a_large_striped_file(tmp_path: Path) -> None:
    rows, cols = 6000, 1500
    array = pattern(rows, cols)
    path = write_tif(tmp_path / "strips.tif", array, blockysize=16, compress="deflate", zlevel=1)
    assert open_scene(path).block_shape == (16, cols)
    data, valid = read_window(path, box(3001, 3513, 733, 1245), [1, 1])
    assert np.array_equal(data, array[[0, 0], 3001:3513, 733:1245]) and valid.all()
    truncate(path, 0.5)
    data, _ = read_window(path, box(0, 512, 988, 1500), [1])
    assert np.array_equal(data[0], array[0, :512, 988:])
    with pytest.raises(SceneReadError, match=r"strips\.tif: cannot read window rows 5488:6000"):
        read_window(path, box(5488, 6000, 0, 512), [1])


# --- property: any window equals the slice of the whole array ------------------------


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, np.ndarray, str]]:
    """Four layouts: tiled uint16 with nodata, striped float32 with NaN, RGBA uint8, and
    tiled float32 with a nodata value, NaN and infinities, each in single bands."""
    root = tmp_path_factory.mktemp("readers")
    rng = np.random.default_rng(0)

    nodata = pattern(45, 71, count=3, dtype="uint16")
    nodata[:, rng.random((45, 71)) < 0.2] = 0
    nodata[1, rng.random((45, 71)) < 0.2] = 0
    tiled = write_tif(
        root / "tiled.tif", nodata, nodata=0, tiled=True, blockxsize=16, blockysize=16
    )

    floats = rng.normal(size=(2, 33, 29)).astype("float32")
    floats[rng.random(floats.shape) < 0.1] = np.nan
    striped = write_tif(root / "striped.tif", floats, blockysize=3)

    rgba = pattern(20, 50, count=4)
    rgba[3] = np.where(rng.random((20, 50)) < 0.3, 0, 255)
    alpha = write_tif(
        root / "alpha.tif",
        rgba,
        photometric="RGB",
        tiled=True,
        blockxsize=16,
        blockysize=16,
        alpha="YES",
    )
    sentinels = rng.normal(size=(3, 37, 41)).astype("float32")
    for value in (-9999, np.nan, np.inf, -np.inf):
        sentinels[rng.random(sentinels.shape) < 0.03] = value
    sentinels[:, rng.random((37, 41)) < 0.05] = -9999
    float_nodata = write_tif(
        root / "float-nodata.tif", sentinels, nodata=-9999, tiled=True, blockxsize=16,
        blockysize=16,
    )
    return [(tiled, nodata, "nodata"), (striped, floats, "nan"), (alpha, rgba, "alpha"),
            (float_nodata, sentinels, "float-nodata")]


def expected_valid(array: np.ndarray, kind: str, bands: list[int]) -> np.ndarray:
    if kind == "nodata":
        return (array != 0).any(axis=0)
    if kind == "nan":
        return ~np.isnan(array[[b - 1 for b in bands]]).any(axis=0)
    if kind == "float-nodata":
        read = array[[b - 1 for b in bands]]
        return (np.isfinite(read) & (read != -9999)).all(axis=0)
    return array[3] > 0


@st.composite
def reads(draw: st.DrawFn) -> tuple[int, Box, list[int]]:
    which = draw(st.integers(0, 3))
    rows, cols, count = [(45, 71, 3), (33, 29, 2), (20, 50, 4), (37, 41, 3)][which]
    r0 = draw(st.integers(0, rows - 1))
    c0 = draw(st.integers(0, cols - 1))
    r1 = draw(st.integers(r0 + 1, rows))
    c1 = draw(st.integers(c0 + 1, cols))
    bands = draw(st.lists(st.integers(1, count), min_size=1, max_size=4))
    return which, box(r0, r1, c0, c1), bands


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=reads())
def test_read_window_equals_slicing_the_whole_array(
    rasters: list[tuple[Path, np.ndarray, str]], case: tuple[int, Box, list[int]]
) -> None:
    """Teeth: read_window() without the float nodata rule, or with np.isnan for the
    finite check, fails on the float-nodata layout."""
    which, window, bands = case
    path, array, kind = rasters[which]
    data, valid = read_window(path, window, bands)
    rows, cols = window.slices()
    want = array[[b - 1 for b in bands]][:, rows, cols]
    assert data.dtype == array.dtype
    assert np.array_equal(data, want, equal_nan=kind in ("nan", "float-nodata"))
    assert np.array_equal(valid, expected_valid(array, kind, bands)[rows, cols])


# --- the reference rasters -------------------------------------------------------------


@needs_data
def test_rgb_byte_header_and_nodata_border() -> None:
    info = open_scene(DATA / "RGB.byte.tif")
    assert info.crs is not None and CRS.from_wkt(info.crs).to_epsg() == 32618
    assert (info.shape, info.count, info.dtype, info.nodata) == ((718, 791), 3, "uint8", 0.0)
    assert info.block_shape == (3, 791)
    data, valid = read_window(info.path, box(0, 718, 0, 791), [1, 2, 3])
    assert not valid[0, 0] and not valid[-1, -1] and valid[359, 395]
    assert np.array_equal(valid, (data != 0).any(axis=0))
    assert 0.2 < 1 - valid.mean() < 0.5


@needs_data
def test_rgba_byte_mask_comes_from_alpha_when_reading_rgb() -> None:
    path = DATA / "RGBA.byte.tif"
    assert open_scene(path).nodata is None
    _, valid = read_window(path, box(100, 400, 0, 300), [1, 2, 3])
    alpha, _ = read_window(path, box(100, 400, 0, 300), [4])
    assert np.array_equal(valid, alpha[0] > 0)
    assert valid.any() and not valid.all()


@needs_data
@pytest.mark.parametrize("allow_no_crs", [False, True])
def test_reference_rotated_is_refused(allow_no_crs: bool) -> None:
    with pytest.raises(SceneError, match=r"^rotated\.tif .*rotated georeferencing is not"):
        open_scene(DATA / "rotated.tif", allow_no_crs=allow_no_crs)


@needs_data
def test_reference_float_nan_needs_allow_no_crs_and_nan_is_invalid() -> None:
    with pytest.raises(SceneError, match=r"float_nan\.tif has no CRS.*--allow-no-crs"):
        open_scene(DATA / "float_nan.tif")
    info = open_scene(DATA / "float_nan.tif", allow_no_crs=True)
    assert info.shape == (2, 3) and info.dtype == "float32"
    assert info.nodata is not None and math.isnan(info.nodata)
    _, valid = read_window(info.path, box(0, 2, 0, 3), [1])
    assert np.array_equal(valid, [[True, True, False], [True, True, True]])


@needs_data
def test_reference_not_a_raster_and_missing_file() -> None:
    with pytest.raises(SceneError, match=r"not-a-raster\.tif is not a raster"):
        open_scene(DATA / "not-a-raster.tif")
    with pytest.raises(SceneReadError, match=r"no-such-scene\.tif: no such file"):
        open_scene(DATA / "no-such-scene.tif")


@needs_data
def test_reference_truncated_fails_mid_scene_never_with_zeros() -> None:
    # truncated.tif is RGB.byte.tif in 256x256 tiles cut at 60 %: the header and
    # the first tiles read; from tile (1, 1) on, reads fail. Every window either
    # equals the original or raises: never zeros.
    path = DATA / "truncated.tif"
    info = open_scene(path)
    assert info.shape == (718, 791) and info.block_shape == (256, 256)
    good, _ = read_window(DATA / "RGB.byte.tif", box(0, 718, 0, 791), [1, 2, 3])
    first, _ = read_window(path, box(0, 256, 0, 791), [1, 2, 3])
    assert np.array_equal(first, good[:, :256])
    with pytest.raises(SceneReadError) as caught:
        read_window(path, box(512, 718, 512, 791), [1, 2, 3])
    assert "truncated.tif: cannot read window rows 512:718, cols 512:791" in str(caught.value)
    failed = []
    for r0 in range(0, 718, 256):
        for c0 in range(0, 791, 256):
            tile = box(r0, min(r0 + 256, 718), c0, min(c0 + 256, 791))
            try:
                data, _ = read_window(path, tile, [1, 2, 3])
            except SceneReadError:
                failed.append((r0 // 256, c0 // 256))
            else:
                assert np.array_equal(data, good[(slice(None), *tile.slices())])
    assert (0, 0) not in failed and (1, 1) in failed and (2, 3) in failed


@needs_data
def test_reference_corrupt_fails_when_read() -> None:
    path = DATA / "corrupt.tif"
    assert open_scene(path).shape == (1024, 1024)
    with pytest.raises(SceneReadError, match=r"corrupt\.tif: cannot read window rows 0:1024, cols"):
        read_window(path, box(0, 1024, 0, 1024), [1, 2, 3])
    with pytest.raises(SceneReadError, match=r"corrupt\.tif: cannot read window rows 512:1024"):
        read_window(path, box(512, 1024, 512, 1024), [1])


@needs_data
def test_reference_all_nodata_is_all_invalid() -> None:
    info = open_scene(DATA / "all-nodata.tif")
    assert info.shape == (2475, 71) and info.dtype == "uint16"
    _, valid = read_window(info.path, box(0, 2475, 0, 71), [1, 2, 3])
    assert not valid.any()


@needs_data
def test_reference_one_band_scene_for_a_three_band_model() -> None:
    info = open_scene(DATA / "rgb1_fake_nir_epsg3857.tif")
    with pytest.raises(SceneError) as caught:
        check_bands(info, [1, 2, 3])
    assert str(caught.value) == (
        "rgb1_fake_nir_epsg3857.tif has 1 band; the model needs bands [1, 2, 3] "
        "(set bands: [1, 1, 1] in the model spec to repeat band 1)"
    )
    check_bands(info, [1, 1, 1], dtypes=["uint8"])


@needs_data
def test_reference_shade_nodata_255_in_tiles() -> None:
    info = open_scene(DATA / "shade.tif")
    assert (info.nodata, info.block_shape) == (255.0, (256, 256))
    data, valid = read_window(info.path, box(256, 768, 256, 768), [1])
    assert np.array_equal(valid, data[0] != 255)


@needs_data
@pytest.mark.parametrize(
    "name, epsg, dtype", [("world.rgb.tif", 4326, "uint8"), ("RGBA.uint16.tif", 32612, "uint16")]
)
def test_reference_other_scenes_open(name: str, epsg: int, dtype: str) -> None:
    info = open_scene(DATA / name)
    assert info.crs is not None and CRS.from_wkt(info.crs).to_epsg() == epsg
    assert info.dtype == dtype


def test_no_gdal_options_leak_into_the_process_environment(tmp_path: Path) -> None:
    before = dict(os.environ)
    path = write_tif(tmp_path / "env.tif", pattern(4, 4))
    open_scene(path)
    read_window(path, box(0, 4, 0, 4), [1])
    assert dict(os.environ) == before
