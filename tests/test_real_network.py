"""A real pretrained network end to end through the CLI: the cloud and cloud-shadow U-Net
of ukis-csmask (ONNX, Apache-2.0) on a real Sentinel-2 scene shipped by xarray-spatial,
both put in place by examples/cloud-mask/prepare.py (see the README, "A real network").

Skips when either package is not installed (pip install --no-deps ukis-csmask==1.0.0
xarray-spatial==0.5.3): the network is 40 MB and not in this repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.conftest import ROOT
from tests.support import cli

EXAMPLE = ROOT / "examples" / "cloud-mask"
SCENE = "sentinel2-bgrn.tif"
#: The scene is cloud-free arid land: almost every valid pixel is clear (class 0).
MIN_CLEAR = 0.9
#: The rectangle (rows, cols) set to nodata in a copy of the scene.
HOLE = (slice(40, 90), slice(100, 180))


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """The example's spec, network and scene in one folder, as prepare.py makes them."""
    for distribution in ("ukis-csmask", "xarray-spatial"):
        try:
            metadata.distribution(distribution)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed (pip install --no-deps "
                        "ukis-csmask==1.0.0 xarray-spatial==0.5.3)")
    folder = tmp_path / "example"
    folder.mkdir()
    shutil.copy(EXAMPLE / "model.yaml", folder)
    done = subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.slow
def test_cloud_mask_network_labels_a_real_sentinel2_scene(prepared: Path,
                                                          tmp_path: Path) -> None:
    """The run keeps each scene's CRS and transform, labels the cloud-free scene clear,
    and writes nodata exactly where a copy of it has a nodata hole.

    Teeth (once ONNX specs run): the spec's scale left out (raw reflectance x 10000) or
    bands reordered: the labels change; the nodata mask dropped: the hole is labelled.
    """
    scene = prepared / SCENE
    holed = prepared / "holed.tif"
    with rasterio.open(scene) as src:
        profile, values = src.profile, src.read()
    values[:, HOLE[0], HOLE[1]] = 0  # the scene's nodata value
    with rasterio.open(holed, "w", **profile) as dst:
        dst.write(values)

    out = tmp_path / "out"
    done = cli("run", str(scene), str(holed), "--model", str(prepared / "model.yaml"),
               "--out", str(out), "--workers", "1")
    assert done.returncode == 0, done.stderr
    for source in (scene, holed):
        with rasterio.open(source) as src, rasterio.open(out / source.name) as cog:
            assert (cog.crs, cog.transform, cog.shape) == (src.crs, src.transform, src.shape)
            labels, invalid = cog.read(1), src.dataset_mask() == 0
        assert cog.nodata == 255
        assert set(np.unique(labels)) <= {0, 1, 2, 255}
        assert ((labels == 255) == invalid).all(), source.name
        clear = float((labels[~invalid] == 0).mean())
        assert clear >= MIN_CLEAR, (source.name, clear)
    assert invalid[HOLE].all() and invalid.sum() == values[0, HOLE[0], HOLE[1]].size
