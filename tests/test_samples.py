"""Sample scenes: deterministic, block-consistent landscapes and the GeoTIFFs made of them."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from pipeline.errors import ConfigError, GeometryError
from pipeline.labels import DEFAULT_NODATA
from pipeline.samples import (
    CLASSES,
    LABEL_NODATA,
    SCENE_NODATA,
    SampleScene,
    render,
    scene_transform,
    write_sample_scenes,
)


def whole(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return render(seed, (0, shape[0]), (0, shape[1]), shape)


def test_constants() -> None:
    assert [c.name for c in CLASSES] == ["water", "vegetation", "bare ground", "built-up"]
    assert LABEL_NODATA == DEFAULT_NODATA == 255
    assert SCENE_NODATA == 0
    water, vegetation, bare, built = (np.array(c.color) for c in CLASSES)
    assert water[2] > max(water[:2])  # blue-ish
    assert vegetation[1] > max(vegetation[0], vegetation[2])  # green
    assert bare[0] > bare[1] > bare[2]  # tan
    assert built[0] > built[1]  # roof red


def test_render_shapes_and_dtypes() -> None:
    image, labels = render(0, (10, 50), (20, 27), (100, 80))
    assert image.shape == (3, 40, 7) and image.dtype == np.uint8
    assert labels.shape == (40, 7) and labels.dtype == np.uint8
    image, labels = render(0, (5, 5), (0, 80), (100, 80))
    assert image.shape == (3, 0, 80) and labels.shape == (0, 80)


def test_same_seed_same_bytes_other_seed_other_pixels() -> None:
    first = whole(7, (300, 257))
    again = whole(7, (300, 257))
    other = whole(8, (300, 257))
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1].tobytes() == again[1].tobytes()
    assert np.mean(first[0] != other[0]) > 0.5
    assert np.mean(first[1] != other[1]) > 0.05


@st.composite
def regions_and_cuts(draw: st.DrawFn) -> tuple[tuple[int, int], list[int], list[int]]:
    """A scene shape (up to 30000 a side), a region of it and cuts of the region."""
    shape = (draw(st.integers(1, 30000)), draw(st.integers(1, 30000)))
    cuts = []
    for n in shape:
        size = draw(st.integers(1, min(n, 200)))
        # Often near an edge, so that the footprint's border is crossed.
        start = draw(
            st.one_of(
                st.integers(0, n - size),
                st.integers(0, min(n - size, 40)),
                st.integers(max(0, n - size - 40), n - size),
            )
        )
        inner = []
        if size > 1:
            inner = draw(st.lists(st.integers(start + 1, start + size - 1), max_size=5))
        cuts.append(sorted({start, start + size, *inner}))
    return shape, cuts[0], cuts[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regions_and_cuts(), st.integers(-(2**40), 2**40))
def test_blocks_agree_with_the_whole_region(
    case: tuple[tuple[int, int], list[int], list[int]], seed: int
) -> None:
    """Stitching any cut of a region gives exactly the region rendered at once."""
    shape, row_cuts, col_cuts = case
    rows, cols = (row_cuts[0], row_cuts[-1]), (col_cuts[0], col_cuts[-1])
    image, labels = render(seed, rows, cols, shape)
    stitched = np.zeros_like(image)
    stitched_labels = np.zeros_like(labels)
    for r0, r1 in itertools.pairwise(row_cuts):
        for c0, c1 in itertools.pairwise(col_cuts):
            part, part_labels = render(seed, (r0, r1), (c0, c1), shape)
            out = np.s_[r0 - rows[0] : r1 - rows[0], c0 - cols[0] : c1 - cols[0]]
            stitched[(slice(None), *out)] = part
            stitched_labels[out] = part_labels
    np.testing.assert_array_equal(stitched, image)
    np.testing.assert_array_equal(stitched_labels, labels)


def test_blocks_agree_across_internal_chunks() -> None:
    """A region much larger than the internal chunk equals its odd-sized blocks."""
    shape = (3000, 2500)
    image, labels = render(3, (100, 1400), (50, 1250), shape)
    for r0, r1 in ((100, 229), (229, 612), (612, 1400)):
        for c0, c1 in ((50, 563), (563, 564), (564, 1250)):
            part, part_labels = render(3, (r0, r1), (c0, c1), shape)
            out = np.s_[r0 - 100 : r1 - 100, c0 - 50 : c1 - 50]
            np.testing.assert_array_equal(part, image[(slice(None), *out)])
            np.testing.assert_array_equal(part_labels, labels[out])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_class_covers_at_least_3_percent(seed: int) -> None:
    """On a 2048 scene's footprint, from 16-row strips every 128 rows (1/8 of the pixels)."""
    size = 2048
    strips = [render(seed, (r, r + 16), (0, size), (size, size))[1] for r in range(0, size, 128)]
    labels = np.concatenate(strips)
    inside = labels[labels != LABEL_NODATA]
    fractions = np.bincount(inside, minlength=len(CLASSES)) / inside.size
    assert len(fractions) == len(CLASSES)
    assert fractions.min() >= 0.03, fractions


@pytest.mark.parametrize(
    ("seed", "shape"), [(0, (512, 512)), (1, (400, 700)), (5, (700, 300)), (6, (40, 900))]
)
def test_footprint_border(seed: int, shape: tuple[int, int]) -> None:
    image, labels = whole(seed, shape)
    outside = labels == LABEL_NODATA
    assert 0.05 <= outside.mean() <= 0.15
    # Outside: 0 in every band; inside: every band >= 1, so never (0, 0, 0).
    assert (image[:, outside] == SCENE_NODATA).all()
    assert (image[:, ~outside] >= 1).all()
    assert set(np.unique(labels[~outside])) <= set(range(len(CLASSES)))
    # A rotated rectangle: corners out, centre in, one interval per row.
    assert outside[[0, 0, -1, -1], [0, -1, 0, -1]].all()
    assert not outside[shape[0] // 2, shape[1] // 2]
    for row in ~outside:
        inside = np.flatnonzero(row)
        assert inside.size == 0 or inside[-1] - inside[0] + 1 == inside.size


def test_colour_varies_within_each_class() -> None:
    """Texture and noise: no class is a flat colour, so pixels are not trivially classified."""
    image, labels = whole(2, (512, 512))
    for k in range(len(CLASSES)):
        pixels = image[:, labels == k]
        assert pixels.shape[1] > 0
        assert pixels.std(axis=1).min() > 3


@pytest.mark.parametrize("region", [((0, 10), (5, 600)), ((-1, 5), (0, 5)), ((0, 5), (3, 2))])
def test_render_rejects_regions_outside_the_scene(
    region: tuple[tuple[int, int], tuple[int, int]],
) -> None:
    with pytest.raises(GeometryError, match="must lie within") as caught:
        render(0, region[0], region[1], (100, 500))
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size 0 is out of range"),
        ({"size": 30001}, "size 30001 is out of range"),
        ({"size": 64.0}, "size must be an integer"),
        ({"count": 0}, "count 0 is out of range"),
        ({"block": 0}, "block 0 is out of range"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        write_sample_scenes(tmp_path, **kwargs)
    assert isinstance(caught.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_written_scenes_are_complete_and_georeferenced(tmp_path) -> None:
    """1000 x 1000 with 256 blocks: partial blocks at the edges are written too."""
    written = write_sample_scenes(tmp_path / "out", size=1000, count=2, seed=4, block=256)
    out = tmp_path / "out"
    assert written == [
        SampleScene(out / f"scene-{k:03d}.tif", out / "truth" / f"scene-{k:03d}.tif")
        for k in range(2)
    ]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.tif")) == [
        "scene-000.tif",
        "scene-001.tif",
        "truth/scene-000.tif",
        "truth/scene-001.tif",
    ]
    for k, paths in enumerate(written):
        image, labels = whole(4 + k, (1000, 1000))
        with rasterio.open(paths.scene) as scene:
            assert (scene.count, scene.width, scene.height) == (3, 1000, 1000)
            assert scene.dtypes == ("uint8",) * 3
            assert scene.nodata == SCENE_NODATA
            assert scene.crs == CRS.from_epsg(32633)
            assert scene.transform == scene_transform(4 + k)
            assert scene.res == (10.0, 10.0)
            assert scene.block_shapes == [(256, 256)] * 3
            assert scene.compression.name == "deflate"
            assert scene.colorinterp[0].name == "red"
            np.testing.assert_array_equal(scene.read(), image)
        with rasterio.open(paths.labels) as label_raster:
            assert (label_raster.count, label_raster.dtypes) == (1, ("uint8",))
            assert label_raster.nodata == LABEL_NODATA
            assert label_raster.crs == CRS.from_epsg(32633)
            assert label_raster.transform == scene_transform(4 + k)
            colormap = label_raster.colormap(1)
            for value, cls in enumerate(CLASSES):
                assert colormap[value] == (*cls.color, 255)
                assert label_raster.tags()[f"class_{value}"] == cls.name
            np.testing.assert_array_equal(label_raster.read(1), labels)
    # Origins are plausible UTM 33N eastings/northings and differ between seeds.
    origins = {scene_transform(s)[2:6:3] for s in range(4, 6)}
    assert len(origins) == 2
    assert all(166_000 <= x <= 834_000 - 300_000 and 0 < y <= 9_300_000 for x, y in origins)


def test_written_files_are_deterministic(tmp_path) -> None:
    first = write_sample_scenes(tmp_path / "a", size=200, count=1, seed=9, block=64)[0]
    second = write_sample_scenes(tmp_path / "b", size=200, count=1, seed=9, block=64)[0]
    assert first.scene.read_bytes() == second.scene.read_bytes()
    assert first.labels.read_bytes() == second.labels.read_bytes()


def test_large_scene_is_written_block_by_block(tmp_path) -> None:
    """4096 x 4096 with 512 blocks: peak Python memory stays under 30 bytes per block pixel.

    The whole scene would be 4 bytes a pixel times 16.7 million pixels (64 MiB):
    never allocated. numpy reports its buffers to tracemalloc.
    """
    block = 512
    tracemalloc.start()
    try:
        (paths,) = write_sample_scenes(tmp_path, size=4096, count=1, seed=1, block=block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30 * block**2
    with rasterio.open(paths.scene) as scene, rasterio.open(paths.labels) as labels:
        assert (scene.width, scene.height, labels.width, labels.height) == (4096,) * 4
        assert scene.block_shapes == [(512, 512)] * 3
        window = rasterio.windows.Window(3500, 3800, 296, 296)  # bottom-right corner, partly border
        image, label = render(1, (3800, 4096), (3500, 3796), (4096, 4096))
        np.testing.assert_array_equal(scene.read(window=window), image)
        np.testing.assert_array_equal(labels.read(1, window=window), label)
