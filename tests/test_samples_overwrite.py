"""``fcn-pipeline sample-scenes DIR`` never replaces a file it did not write.

Through the real CLI (a subprocess), with 64-pixel scenes: a user's own file at a
target path (a GeoTIFF without the FCN_PIPELINE_SAMPLE tag, or not a raster at
all) is refused with exit 2 and one line, before anything is written, and left
byte for byte as it was; an earlier sample is replaced, so ``make demo`` (which
writes its samples on every run) keeps working, and gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from pipeline.samples import SAMPLE_TAG
from tests.conftest import run_cli

SIZE = "64"


def user_geotiff(path: Path) -> Path:
    """A GeoTIFF of the user's, with tags of its own but not the samples' tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0)) as ds:
        ds.write(np.full((1, 8, 8), 7, np.uint8))
        ds.update_tags(owner="me")
    return path


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(directory: Path, user_file: Path) -> None:
    """Generation into ``directory`` is refused naming ``user_file``; nothing changes."""
    before = files(directory)
    done = run_cli("sample-scenes", str(directory), "--size", SIZE, "--count", "2")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {user_file} exists and is not a sample")
    assert SAMPLE_TAG in lines[0] and "move it away" in lines[0]
    assert done.stdout == ""
    assert files(directory) == before  # the user's file untouched, nothing else written


@pytest.mark.parametrize("where", ["scene-000.tif", "truth/scene-000.tif"])
def test_a_users_geotiff_is_refused_and_untouched(tmp_path: Path, where: str) -> None:
    """Teeth: with _check_replaceable's call removed from write_sample_scenes, the
    user's file is replaced and the CLI exits 0 (seen failing, restored); with only
    the scenes checked (not the labels), the truth/ case fails (seen failing, restored).
    """
    refused(tmp_path, user_geotiff(tmp_path / where))


def test_a_file_that_is_no_raster_is_refused(tmp_path: Path) -> None:
    """Teeth: with is_sample() answering True for a file rasterio cannot open (its
    `except` returning True), the notes are replaced (seen failing, restored)."""
    notes = tmp_path / "truth" / "scene-001.tif"
    notes.parent.mkdir()
    notes.write_text("my notes, not a raster\n")
    refused(tmp_path, notes)


def test_every_target_is_checked_before_any_is_written(tmp_path: Path) -> None:
    """The user's file is the last target (truth/scene-001.tif): scene-000 and its labels,
    written first, must not be written either.

    Teeth: with the check moved into the loop (each scene checked just before it is
    written), scene-000.tif and truth/scene-000.tif appear: fails (seen failing, restored).
    """
    refused(tmp_path, user_geotiff(tmp_path / "truth" / "scene-001.tif"))


def test_generating_again_replaces_the_earlier_samples_byte_for_byte(tmp_path: Path) -> None:
    """What ``make demo`` does on its second run.

    Teeth: with the SAMPLE_TAG tags left out of _write_scene, the tag assertions fail
    (KeyError), and without them the second run is refused, exit 2 (both seen failing,
    restored).
    """
    first = run_cli("sample-scenes", str(tmp_path), "--size", SIZE, "--count", "2")
    assert first.returncode == 0, first.stderr
    written = files(tmp_path)
    assert sorted(written) == ["scene-000.tif", "scene-001.tif",
                               "truth/scene-000.tif", "truth/scene-001.tif"]
    with rasterio.open(tmp_path / "scene-001.tif") as scene:
        assert json.loads(scene.tags()[SAMPLE_TAG]) == {
            "kind": "scene", "seed": 1, "size": 64, "block": 512}
    with rasterio.open(tmp_path / "truth" / "scene-001.tif") as labels:
        assert json.loads(labels.tags()[SAMPLE_TAG])["kind"] == "labels"
    again = run_cli("sample-scenes", str(tmp_path), "--size", SIZE, "--count", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and again.stderr == ""
    assert files(tmp_path) == written
    # Other parameters over an earlier sample: replaced too (it is still ours).
    other = run_cli("sample-scenes", str(tmp_path), "--size", "32", "--count", "1", "--seed", "9")
    assert other.returncode == 0, other.stderr
    with rasterio.open(tmp_path / "scene-000.tif") as scene:
        assert (scene.width, json.loads(scene.tags()[SAMPLE_TAG])["seed"]) == (32, 9)
