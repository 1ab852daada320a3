"""The demo model says, once per run, that its labels for scenes that are not generated
samples are illustrative: it was trained on generated sample scenes only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from safetensors.torch import save_file

from pipeline.readers import open_scene
from pipeline.samples import write_sample_scenes
from tests.conftest import shared_file
from tests.modelspec_factories import tiny, write_spec
from tests.support import DEMO_CAVEAT, cli


def _caveats(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: the demo model")]


def test_open_scene_tells_a_generated_sample_from_another_scene(tmp_path: Path) -> None:
    """A generated scene's header reads as a sample (its FCN_PIPELINE_SAMPLE tag), a real
    Landsat subset's does not.

    Teeth: readers.open_scene without sample=marks_sample(...): the first assertion fails;
    marks_sample answering True for any tags: the second fails.
    """
    (sample,) = write_sample_scenes(tmp_path, size=64, count=1)
    assert open_scene(sample.scene).sample
    assert not open_scene(shared_file("RGB.byte.tif")).sample


@pytest.mark.slow
def test_demo_warns_once_per_run_for_scenes_that_are_not_samples(tmp_path: Path) -> None:
    """A real scene, one written here and a sample in one run: one warning line, counting
    the two and naming the first; a run over a sample alone, or of a model other than the demo, has
    none; -q silences it.

    Teeth: the caveat left out of cli._show_report: the first assertion fails; printed
    once per scene: the count fails; marks_sample answering False: the sample-only run
    warns and fails; demo_caveat without its architecture check: the run of another model
    warns and fails.
    """
    landsat = shared_file("RGB.byte.tif")
    (sample,) = write_sample_scenes(tmp_path / "samples", size=96, count=1)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(landsat, scenes / "a-landsat.tif")
    own = scenes / "b-own.tif"
    with rasterio.open(own, "w", driver="GTiff", width=48, height=40, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4600000)) as dst:
        dst.write(np.full((3, 40, 48), 90, np.uint8))
    shutil.copy(sample.scene, scenes / "c-sample.tif")

    mixed = cli("run", str(scenes / "*.tif"), "--out", str(tmp_path / "mixed"),
                "--workers", "1")
    assert mixed.returncode == 0, mixed.stderr
    assert _caveats(mixed.stderr) == [
        f"{DEMO_CAVEAT}: its labels for 2 scene(s) that are not samples (a-landsat.tif and 1 "
        "more) are illustrative, not a land-cover map; use a model trained for such imagery "
        "(--model SPEC)"], mixed.stderr

    alone = cli("run", str(sample.scene), "--out", str(tmp_path / "alone"), "--workers", "1")
    assert alone.returncode == 0, alone.stderr
    assert _caveats(alone.stderr) == [], alone.stderr

    other = tmp_path / "other"
    other.mkdir()
    save_file(tiny().state_dict(), other / "tiny.safetensors")
    mine = cli("run", str(own), "--out", str(tmp_path / "mine"),
               "--model", str(write_spec(other)), "--trust-spec-code", "--workers", "1")
    assert mine.returncode == 0, mine.stderr
    assert _caveats(mine.stderr) == [], mine.stderr

    quiet = cli("run", str(own), "--out", str(tmp_path / "quiet"),
                "--workers", "1", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
