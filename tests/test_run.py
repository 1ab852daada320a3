"""End to end through the real CLI: GeoTIFF scenes in, Zarr stores and COGs out.

Real processes, real GeoTIFFs, a real Zarr store and a real LocalCluster.
One run is shared by the tests that only read its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from tests.conftest import run_cli, shared_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("scenes")
    done = run_cli("sample-scenes", str(directory), "--size", "333", "--count", "2", "--seed", "5")
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def tiled_run(scenes: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out") / "tiled"
    done = run_cli("run", str(scenes / "*.tif"), "--out", str(out), "--model", "demo",
                   "--tile-size", "128", "--probabilities", "--workers", "2")
    return out, done


def test_run_succeeds_and_reports(tiled_run) -> None:
    out, done = tiled_run
    assert done.returncode == 0, done.stderr
    assert "scene-000" in done.stdout and "scene-001" in done.stdout
    assert "done" in done.stdout
    assert "tiles 18/18 (100%)" in done.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in manifest["scenes"]] == ["done", "done"]
    assert len(manifest["model"]["sha256"]) == 64
    assert manifest["config"]["tiling"]["tile_size"] == 128
    assert manifest["versions"]["torch"]
    for scene in manifest["scenes"]:  # where the time went, per step
        work = scene["work_seconds"]
        assert set(work) == {"read", "model", "write", "publish"}
        assert all(v > 0 for v in work.values())
        assert work["model"] + work["write"] < 2 * scene["seconds"]  # two workers at most


def test_zarr_store_is_georeferenced_for_xarray(tiled_run, scenes: Path) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("rioxarray")
    out, _ = tiled_run
    with rasterio.open(scenes / "scene-000.tif") as src:
        crs, transform = src.crs, src.transform
    ds = xr.open_zarr(out / "scene-000.zarr", mask_and_scale=False)
    labels = ds["labels"]
    assert labels.dtype == np.uint8
    assert labels.shape == (333, 333)
    assert labels.encoding["chunks"] == (128, 128)
    assert labels.rio.crs == crs
    with pytest.warns(PendingDeprecationWarning):  # rioxarray multiplies affines with `*`
        got = labels.rio.transform()
    assert tuple(got)[:6] == pytest.approx(tuple(transform)[:6])
    probs = ds["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (4, 333, 333)


def test_cog_matches_store_and_input(tiled_run, scenes: Path) -> None:
    out, _ = tiled_run
    with rasterio.open(scenes / "scene-000.tif") as src:
        valid = src.dataset_mask() > 0
        crs, transform = src.crs, src.transform
    with rasterio.open(out / "scene-000.tif") as cog:
        assert cog.crs == crs and cog.transform == transform
        assert cog.nodata == 255
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.profile["tiled"]
        assert cog.colormap(1)[0][:3] != (0, 0, 0)
        labels = cog.read(1)
    assert np.array_equal(labels == 255, ~valid)
    assert set(np.unique(labels[valid])) <= {0, 1, 2, 3}
    stored = zarr.open_group(str(out / "scene-000.zarr"), mode="r")["labels"][:]
    assert np.array_equal(stored, labels)


def test_labels_are_accurate_against_truth(tiled_run, scenes: Path) -> None:
    out, _ = tiled_run
    with rasterio.open(scenes / "truth/scene-000.tif") as truth_file:
        truth = truth_file.read(1)
    with rasterio.open(out / "scene-000.tif") as cog:
        labels = cog.read(1)
    valid = truth != 255
    assert (labels[valid] == truth[valid]).mean() > 0.8


def test_tiled_labels_equal_whole_image_labels(tiled_run, scenes: Path, tmp_path: Path) -> None:
    out, _ = tiled_run
    done = run_cli("run", str(scenes / "scene-000.tif"), "--out", str(tmp_path),
                   "--tile-size", "4096", "--workers", "1")
    assert done.returncode == 0, done.stderr
    with rasterio.open(out / "scene-000.tif") as a, rasterio.open(tmp_path / "scene-000.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))


def test_real_landsat_scene_tiled_equals_whole(tmp_path: Path) -> None:
    scene = shared_file("RGB.byte.tif")
    tiled = run_cli("run", str(scene), "--out", str(tmp_path / "tiled"), "--tile-size", "256",
                    "--workers", "2")
    whole = run_cli("run", str(scene), "--out", str(tmp_path / "whole"), "--tile-size", "1024",
                    "--workers", "1")
    assert tiled.returncode == 0, tiled.stderr
    assert whole.returncode == 0, whole.stderr
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "tiled" / "RGB.byte.tif") as a, \
            rasterio.open(tmp_path / "whole" / "RGB.byte.tif") as b:
        assert a.crs == src.crs and a.transform == src.transform
        assert np.array_equal(a.read(1), b.read(1))
        assert np.array_equal(a.read(1) == 255, src.dataset_mask() == 0)


def test_dry_run_prints_the_plan_and_computes_nothing(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    done = run_cli("run", str(scenes / "scene-000.tif"), "--out", str(out), "--tile-size", "128",
                   "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "333x333 px (width x height), 9 tiles (3x3 of 128x128 px)" in done.stdout
    assert "scene-000: start" in done.stdout
    assert "halo before" in done.stdout and "overhead" in done.stdout and "MiB" in done.stdout
    assert not out.exists()


def test_auto_tile_size_is_measured_once_per_output_directory(scenes: Path,
                                                              tmp_path: Path) -> None:
    """On a CPU the model's speed per window size is measured by the first run into a
    directory and kept there; a rerun or resume of a scene keeps the tile size its
    outputs or work were made with, whatever the figures say (the tile size is part of
    the fingerprint: another one would be refused); new scenes follow the figures.

    Teeth: choose_tiles without earlier_tile_sizes: the rerun's dry run plans the edited
    figures' size and is refused (exit 2).
    """
    out = tmp_path / "auto"
    scene = str(scenes / "scene-000.tif")
    dry = run_cli("run", scene, "--out", str(out), "--dry-run", "--threads-per-worker", "1")
    assert dry.returncode == 0, dry.stderr
    assert "measured" in dry.stdout.splitlines()[0]
    assert not out.exists()  # a dry run measures but writes nothing

    done = run_cli("run", scene, "--out", str(out), "--workers", "1")
    assert done.returncode == 0, done.stderr
    stored = out / ".fcn-pipeline" / ".window-speeds.json"
    figures = json.loads(stored.read_text())
    (speeds,) = figures.values()
    assert speeds and all(v > 0 for v in speeds.values())

    # Figures that make only the smallest window fast ...
    smallest = min(speeds, key=lambda s: int(s.split("x")[0]))
    stored.write_text(json.dumps({key: {k: (1e9 if k == smallest else 1.0) for k in v}
                                  for key, v in figures.items()}))
    again = run_cli("run", scene, "--out", str(out), "--dry-run")
    assert again.returncode == 0, again.stderr  # ... leave the published scene's tiles
    assert "the size the earlier work" in again.stdout.splitlines()[0]
    assert "scene-000: skip" in again.stdout
    other = tmp_path / "other.tif"  # ... and decide the plan of a scene new to the folder
    other.write_bytes(Path(scene).read_bytes())
    new = run_cli("run", str(other), "--out", str(out), "--dry-run")
    assert new.returncode == 0, new.stderr
    assert "windows at 1000.00 Mpx/s measured" in new.stdout.splitlines()[0]


def test_a_bad_scene_fails_alone(scenes: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tif"
    bogus.write_text("not a raster")
    done = run_cli("run", str(bogus), str(scenes / "scene-001.tif"), "--out", str(tmp_path / "o"),
                   "--tile-size", "256", "--workers", "1")
    assert done.returncode == 1
    assert "bogus.tif" in done.stderr and "not a raster" in done.stderr
    assert (tmp_path / "o" / "scene-001.tif").is_file()
    assert not (tmp_path / "o" / "bogus.tif").exists()
    manifest = json.loads((tmp_path / "o" / "run.json").read_text())
    assert [s["status"] for s in manifest["scenes"]] == ["failed", "done"]


@pytest.mark.parametrize("args, message", [
    (["run", "x.tif"], "no output directory"),
    (["run", "x.tif", "--out", "o", "--model", "missing.yaml"], "missing.yaml"),
    (["run", "x.tif", "--out", "o", "--tile-size", "4"], "tile_size"),
    (["run", "x.tif", "--out", "o", "--device", "tpu"], "tpu"),
])
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
