"""Label store (Zarr v3) and COG writers, on real files in tmp_path."""

from __future__ import annotations

import itertools
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.crs import CRS

from pipeline.errors import OutputError
from pipeline.grid import Box, Span
from pipeline.labels import LabelClass
from pipeline.overviews import pyramid, tile_levels
from pipeline.writers import (
    LabelStoreSpec,
    create_label_store,
    create_overview_store,
    write_cog,
    write_labels,
    write_overviews,
)

SHAPE = (700, 530)
CHUNKS = (256, 256)
TRANSFORM = (10.0, 0.0, 500_000.0, 0.0, -10.0, 6_000_000.0)
WKT = CRS.from_epsg(32633).to_wkt()
CLASSES = (
    LabelClass("background", (0, 0, 0)),
    LabelClass("open water", (0, 0, 255)),
    LabelClass("forest", (0, 128, 0)),
    LabelClass("built up", (255, 0, 0)),
)
NODATA = 255


def make_spec(shape=SHAPE, chunks=CHUNKS, **kw) -> LabelStoreSpec:
    args = dict(
        shape=shape,
        chunks=chunks,
        crs=WKT,
        transform=TRANSFORM,
        classes=CLASSES,
        nodata=NODATA,
        attrs={"model_sha256": "ab12", "tile_size": 256},
    )
    args.update(kw)
    return LabelStoreSpec(**args)


def chunk_boxes(shape, chunks):
    for r in range(0, shape[0], chunks[0]):
        for c in range(0, shape[1], chunks[1]):
            yield Box(
                Span(r, min(r + chunks[0], shape[0])), Span(c, min(c + chunks[1], shape[1]))
            )


def label_map(shape, seed=0) -> np.ndarray:
    """Random classes with a nodata band across the top."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), shape).astype(np.uint8)
    labels[:37] = NODATA
    return labels


def written_store(tmp_path: Path, labels: np.ndarray, spec: LabelStoreSpec, *, scores=None):
    path = tmp_path / "labels.zarr"
    create_label_store(path, spec)
    for box in chunk_boxes(spec.shape, spec.chunks):
        probs = None if scores is None else scores[(slice(None), *box.slices())]
        write_labels(path, box, labels[box.slices()], probs)
    return path


# --------------------------------------------------------------------------- Zarr store


def test_store_reads_back_tile_by_tile(tmp_path):
    labels = label_map(SHAPE)
    path = written_store(tmp_path, labels, make_spec())

    group = zarr.open_group(path, mode="r")
    array = group["labels"]
    assert array.metadata.zarr_format == 3
    assert array.dtype == np.uint8
    assert array.chunks == CHUNKS
    assert array.fill_value == NODATA
    assert tuple(array.metadata.dimension_names) == ("y", "x")
    np.testing.assert_array_equal(array[:], labels)
    assert dict(group.attrs) == {"model_sha256": "ab12", "tile_size": 256}
    assert array.attrs["class_names"] == [c.name for c in CLASSES]
    assert array.attrs["class_colors"] == [list(c.color) for c in CLASSES]
    assert "probabilities" not in group


def test_unwritten_tiles_read_as_nodata(tmp_path):
    path = tmp_path / "labels.zarr"
    create_label_store(path, make_spec())
    write_labels(path, Box(Span(512, 700), Span(256, 512)), np.ones((188, 256), np.uint8))

    out = zarr.open_array(path / "labels", mode="r")[:]
    assert (out[512:, 256:512] == 1).all()
    out[512:, 256:512] = NODATA
    assert (out == NODATA).all()


def test_create_overwrites_an_existing_store(tmp_path):
    path = written_store(tmp_path, label_map(SHAPE), make_spec())
    create_label_store(path, make_spec(shape=(300, 200)))

    array = zarr.open_array(path / "labels", mode="r")
    assert array.shape == (300, 200)
    assert (array[:] == NODATA).all()


def test_many_classes_use_uint16(tmp_path):
    classes = tuple(LabelClass(f"c{i}", (i % 256, 0, 0)) for i in range(300))
    path = tmp_path / "labels.zarr"
    create_label_store(path, make_spec(classes=classes, nodata=65535))
    write_labels(path, Box(Span(0, 256), Span(0, 256)), np.full((256, 256), 299, np.int64))

    array = zarr.open_array(path / "labels", mode="r")
    assert array.dtype == np.uint16
    assert (array[:256, :256] == 299).all()


@pytest.mark.filterwarnings(
    # rioxarray's transform() multiplies Affines with `*`, which affine 3 deprecates.
    "ignore:Use `@` matmul instead of `\\*` mul operator:PendingDeprecationWarning"
)
def test_xarray_and_rioxarray_read_the_georeference(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("rioxarray")
    labels = label_map(SHAPE)
    path = written_store(tmp_path, labels, make_spec())

    ds = xr.open_zarr(path)  # consolidated: no fallback warning
    da = ds.labels
    assert da.dims == ("y", "x")
    assert da.rio.crs == CRS.from_epsg(32633)
    assert da.rio.crs == CRS.from_wkt(WKT)
    assert da.rio.transform().almost_equals(Affine(*TRANSFORM), precision=1e-9)
    assert da.rio.encoded_nodata == NODATA
    a, _, c, _, e, f = TRANSFORM
    np.testing.assert_allclose(ds.x.values, c + a * (np.arange(SHAPE[1]) + 0.5), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ds.y.values, f + e * (np.arange(SHAPE[0]) + 0.5), rtol=0, atol=1e-6)
    # nodata is masked, the classes come back exactly
    values = da.values
    assert np.isnan(values[:37]).all()
    np.testing.assert_array_equal(values[37:], labels[37:])
    raw = xr.open_zarr(path, mask_and_scale=False).labels
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw.values, labels)
    assert da.attrs["flag_meanings"] == "background open_water forest built_up"


def test_probabilities_are_float16(tmp_path):
    n = len(CLASSES)
    scores = np.random.default_rng(1).random((n, *SHAPE), dtype=np.float32)
    path = written_store(tmp_path, label_map(SHAPE), make_spec(probabilities=True), scores=scores)

    array = zarr.open_group(path, mode="r")["probabilities"]
    assert array.dtype == np.float16
    assert array.shape == (n, *SHAPE)
    assert array.chunks == (n, *CHUNKS)
    assert tuple(array.metadata.dimension_names) == ("class", "y", "x")
    np.testing.assert_array_equal(array[:], scores.astype(np.float16))


@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        ((0, 255), (0, 256)),  # short of the chunk
        ((0, 512), (0, 256)),  # two chunks
        ((128, 384), (0, 256)),  # across a chunk boundary
        ((512, 768), (0, 256)),  # past the edge (must stop at 700)
        ((512, 700), (256, 530)),  # cols stop past the chunk (512)
        ((768, 1024), (0, 256)),  # outside the map
    ],
)
def test_misaligned_writes_raise(tmp_path, rows, cols):
    path = tmp_path / "labels.zarr"
    create_label_store(path, make_spec())
    box = Box(Span(*rows), Span(*cols))
    with pytest.raises(OutputError, match="not one chunk"):
        write_labels(path, box, np.zeros(box.shape, np.uint8))
    assert (zarr.open_array(path / "labels", mode="r")[:] == NODATA).all()


@pytest.mark.parametrize(
    ("labels", "probabilities", "match"),
    [
        (np.zeros((256, 255), np.uint8), None, "shape"),
        (np.full((256, 256), 4), None, "neither a class"),  # not a class, not nodata
        (np.full((256, 256), -1), None, "neither a class"),
        (np.full((256, 256), 256 + 1), None, "neither a class"),  # would wrap to 1 in uint8
        (np.zeros((256, 256), np.float32), None, "integer"),
        (np.zeros((256, 256), np.uint8), np.zeros((3, 256, 256)), "probabilities"),
    ],
)
def test_bad_tiles_raise(tmp_path, labels, probabilities, match):
    path = tmp_path / "labels.zarr"
    create_label_store(path, make_spec(probabilities=True))
    with pytest.raises(OutputError, match=match):
        write_labels(path, Box(Span(0, 256), Span(0, 256)), labels, probabilities)


def test_probabilities_need_a_store_with_them(tmp_path):
    path = tmp_path / "labels.zarr"
    create_label_store(path, make_spec())
    with pytest.raises(OutputError, match="probabilities=True"):
        write_labels(
            path,
            Box(Span(0, 256), Span(0, 256)),
            np.zeros((256, 256), np.uint8),
            np.zeros((len(CLASSES), 256, 256)),
        )


def test_missing_store_raises(tmp_path):
    with pytest.raises(OutputError, match="create_label_store"):
        write_labels(tmp_path / "nope.zarr", Box(Span(0, 1), Span(0, 1)), np.zeros((1, 1), int))


@pytest.mark.parametrize(
    "kw",
    [
        {"nodata": 2},  # a class value
        {"nodata": 256},  # does not fit uint8
        {"chunks": (0, 256)},
        {"shape": (700,)},
        {"transform": (1.0, 0.0, 0.0)},
        {"classes": ()},
        {"attrs": {"bad": object()}},
        {"crs": "not a WKT"},
    ],
)
def test_invalid_spec_raises(kw):
    with pytest.raises(OutputError):
        make_spec(**kw)


# --------------------------------------------------------------------------- COG


def tiff_ifds(path: Path) -> list[tuple[int, int, list[int]]]:
    """``(ifd_offset, width, tile_offsets)`` per IFD, in file order (classic or BigTIFF)."""
    data = path.read_bytes()
    e = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(e + "H", data[2:4])[0] == 43
    head, entry, count_fmt, off_fmt = (8, 20, "Q", "Q") if big else (2, 12, "H", "I")
    sizes = {3: "H", 4: "I", 16: "Q"}
    offset = struct.unpack_from(e + off_fmt, data, 8 if big else 4)[0]
    ifds = []
    while offset:
        n = struct.unpack_from(e + count_fmt, data, offset)[0]
        tags = {}
        for i in range(n):
            pos = offset + head + i * entry
            tag, typ = struct.unpack_from(e + "HH", data, pos)
            count = struct.unpack_from(e + off_fmt, data, pos + 4)[0]
            value_at = pos + (12 if big else 8)
            fmt = sizes.get(typ)
            if fmt is None:
                continue
            if struct.calcsize(fmt) * count > (8 if big else 4):
                value_at = struct.unpack_from(e + off_fmt, data, value_at)[0]
            tags[tag] = list(struct.unpack_from(e + fmt * count, data, value_at))
        ifds.append((offset, tags[256][0], tags[324]))
        offset = struct.unpack_from(e + off_fmt, data, offset + head + n * entry)[0]
    return ifds


def assert_cloud_optimized(path: Path) -> None:
    """The layout GDAL's validate_cloud_optimized_geotiff.py checks."""
    ifds = tiff_ifds(path)
    widths = [w for _, w, _ in ifds]
    assert widths == sorted(widths, reverse=True), "full resolution first, then overviews"
    first_data = min(o for _, _, offsets in ifds for o in offsets)
    assert all(ifd < first_data for ifd, _, _ in ifds), "all IFDs before the image data"
    for (_, _, larger), (_, _, smaller) in itertools.pairwise(ifds):
        assert max(smaller) < min(larger), "smallest overview's data first"


@pytest.mark.parametrize("blocksize", [None, 256])
def test_cog_layout_and_metadata(tmp_path, caplog, blocksize):
    labels = label_map(SHAPE)
    store = written_store(tmp_path, labels, make_spec())
    tif = tmp_path / "labels.tif"
    kw = {} if blocksize is None else {"blocksize": blocksize}
    with caplog.at_level(logging.WARNING):
        write_cog(store, tif, **kw)
    assert not caplog.records, "GDAL warned while making the COG"

    block = blocksize or 512
    with rasterio.open(tif) as src:
        assert src.driver == "GTiff"
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"]
        assert src.block_shapes == [(block, block)]
        assert src.compression.value in {"ZSTD", "DEFLATE"}
        assert src.overviews(1) == ([2] if block == 512 else [2, 4])
        assert src.crs == CRS.from_epsg(32633)
        assert src.transform == Affine(*TRANSFORM)
        assert src.nodata == NODATA
        assert src.dtypes == ("uint8",)
        colormap = src.colormap(1)
        for value, cls in enumerate(CLASSES):
            assert colormap[value] == (*cls.color, 255)
        assert colormap[NODATA][3] == 0
        assert json.loads(src.tags()["CLASS_NAMES"]) == [c.name for c in CLASSES]
        assert json.loads(src.tags()["FCN_PIPELINE_ATTRS"]) == {
            "model_sha256": "ab12",
            "tile_size": 256,
        }
        np.testing.assert_array_equal(src.read(1), zarr.open_array(store / "labels")[:])
        np.testing.assert_array_equal(src.read(1), labels)
    assert_cloud_optimized(tif)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "labels.zarr"]
    plain = tmp_path / "plain"
    plain.touch()
    assert tif.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_cog_overviews_invent_no_class(tmp_path, caplog):
    shape = (600, 600)
    rows, cols = np.indices(shape)
    labels = np.where((rows + cols) % 2, 1, 3).astype(np.uint8)  # 1-pixel checkerboard
    labels[:, :100] = NODATA
    labels[300:, 300:] = 2  # a solid field stays itself
    spec = make_spec(shape=shape, chunks=(128, 128))
    store = written_store(tmp_path, labels, spec)
    tif = tmp_path / "labels.tif"
    with caplog.at_level(logging.WARNING):
        write_cog(store, tif, blocksize=128)
    assert not caplog.records, "GDAL warned while making the COG"

    with rasterio.open(tif) as src:
        factors = src.overviews(1)
    assert factors == [2, 4, 8]
    for level, factor in enumerate(factors):
        with rasterio.open(tif, overview_level=level) as ovr:
            values = ovr.read(1)
        assert values.shape == (-(-600 // factor),) * 2
        assert set(np.unique(values)) <= {1, 2, 3, NODATA}
        assert 2 not in np.unique(values[: 280 // factor, 120 // factor :])  # no averaged 1 and 3
        assert (values[-(-300 // factor) :, -(-300 // factor) :] == 2).all()
        assert (values[:, : 100 // factor] == NODATA).all()


def _cog_levels(tif: Path) -> list[np.ndarray]:
    with rasterio.open(tif) as src:
        levels = [src.read(1)]
        count = len(src.overviews(1))
    for level in range(count):
        with rasterio.open(tif, overview_level=level) as ovr:
            levels.append(ovr.read(1))
    return levels


@pytest.mark.parametrize("chunks", [(128, 128), (96, 160), (100, 128), (90, 128)])
def test_cog_overviews_from_the_tiles_equal_the_whole_maps(tmp_path, chunks):
    """Tiles that wrote their share of the first levels give the COG the same pyramid
    as the whole map's; the remaining levels are computed from the last stored one."""
    shape = (700, 530)
    labels = label_map(shape, seed=3)
    labels[200:600, 100:400] = 2  # fields big enough to survive several levels
    spec = make_spec(shape=shape, chunks=chunks)
    store = written_store(tmp_path, labels, spec)
    levels = tile_levels(shape, chunks, 3)
    assert levels == {(128, 128): 3, (96, 160): 3, (100, 128): 2, (90, 128): 1}[chunks]
    ovr = tmp_path / "overviews.zarr"
    create_overview_store(ovr, shape, chunks, levels, np.dtype(np.uint8), NODATA)
    for box in chunk_boxes(shape, chunks):
        write_overviews(ovr, box, pyramid(labels[box.slices()], NODATA, levels))
    from_tiles, computed = tmp_path / "tiles.tif", tmp_path / "computed.tif"
    write_cog(store, from_tiles, blocksize=64, overviews=ovr)
    write_cog(store, computed, blocksize=64)
    expected = [labels, *pyramid(labels, NODATA, 4)]
    for got in (_cog_levels(from_tiles), _cog_levels(computed)):
        assert len(got) == 5  # 700 px down to one 64 px block: factors 2 .. 16
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    assert_cloud_optimized(from_tiles)


def test_overviews_refuse_a_tile_off_their_grid(tmp_path):
    ovr = tmp_path / "overviews.zarr"
    create_overview_store(ovr, (64, 64), (16, 16), 2, np.dtype(np.uint8), NODATA)
    box = Box(Span(2, 18), Span(0, 16))
    with pytest.raises(OutputError, match="4x4 grid of overview level 2"):
        write_overviews(ovr, box, pyramid(np.zeros((16, 16), np.uint8), NODATA, 2))
    other = tmp_path / "other.zarr"
    create_overview_store(other, (60, 64), (16, 16), 2, np.dtype(np.uint8), NODATA)
    store = written_store(tmp_path, label_map((64, 64)), make_spec(shape=(64, 64), chunks=(16, 16)))
    with pytest.raises(OutputError, match="overviews of a"):
        write_cog(store, tmp_path / "x.tif", blocksize=16, overviews=other)


def test_cog_without_crs_keeps_the_transform(tmp_path):
    labels = label_map(SHAPE)
    store = written_store(tmp_path, labels, make_spec(crs=None))
    tif = tmp_path / "labels.tif"
    write_cog(store, tif)
    with rasterio.open(tif) as src:
        assert src.crs is None
        assert src.transform == Affine(*TRANSFORM)
        np.testing.assert_array_equal(src.read(1), labels)


def test_cog_replaces_an_existing_file(tmp_path):
    store = written_store(tmp_path, label_map(SHAPE), make_spec())
    tif = tmp_path / "labels.tif"
    tif.write_bytes(b"old")
    write_cog(store, tif)
    with rasterio.open(tif) as src:
        assert src.shape == SHAPE


def test_cog_failure_leaves_no_temporary_file(tmp_path):
    store = written_store(tmp_path, label_map(SHAPE), make_spec())
    target = tmp_path / "labels.tif"
    target.mkdir()  # the final rename cannot replace a directory
    with pytest.raises(OutputError, match=r"labels\.tif"):
        write_cog(store, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "labels.zarr"]
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("blocksize", [0, 100, -16])
def test_cog_blocksize_must_be_a_multiple_of_16(tmp_path, blocksize):
    store = written_store(tmp_path, label_map(SHAPE), make_spec())
    with pytest.raises(OutputError, match="multiple of 16"):
        write_cog(store, tmp_path / "labels.tif", blocksize=blocksize)


def test_cog_of_a_missing_store_raises(tmp_path):
    with pytest.raises(OutputError, match="label store"):
        write_cog(tmp_path / "nope.zarr", tmp_path / "labels.tif")
    assert list(tmp_path.iterdir()) == []
