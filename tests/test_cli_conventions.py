"""The conventions users expect of a command line: -q/-v, --json, clean help, sizes as
width x height, and the README's description of what xarray gives.

How each test was checked to have teeth is said in a ``Teeth:`` line in its docstring.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from tests.support import STEMS, TILE, Reference, cli, other_lines

COMMANDS = [[], ["run"], ["status"], ["verify"], ["inspect"], ["validate"], ["sample-scenes"],
            ["bench"], ["bench-memory"], ["demo"], ["demo", "train"], ["demo", "evaluate"],
            ["demo", "speed"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_help_has_no_escaping_artefacts(command: list[str]) -> None:
    """Guarantee 10: --help prints plain text: no doubled percent signs, backquotes or
    click's \\b markers.

    Teeth: the --memory-budget help back to "60 %%": the run help shows "%%".
    """
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    for artefact in ("%%", "`", "\\b", "\b"):
        assert artefact not in done.stdout, (artefact, done.stdout)


@pytest.mark.slow
def test_quiet_verbose_and_json_on_a_finished_folder(reference: Reference,
                                                     tmp_path: Path) -> None:
    """Guarantee 10: -q prints nothing on success, -v says what is decided for each scene,
    --json gives parseable outcomes for run, run --dry-run and status.

    Teeth: -q ignored (the summary table printed): the first assertion fails.
    """
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    quiet = cli(*reference.args(out, "-q"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""

    verbose = cli(*reference.args(out, "-v", "--json"))
    assert verbose.returncode == 0, verbose.stderr
    assert all(f"{stem}: skip: published with the same input" in verbose.stderr for stem in STEMS)
    outcome = json.loads(verbose.stdout)
    assert [s["status"] for s in outcome["scenes"]] == ["done", "done"]
    assert outcome["manifest"] == str(out / "run.json")
    plan = json.loads(cli(*reference.args(out, "--dry-run", "--json")).stdout)
    assert plan["tile_size"] == TILE and [s["action"] for s in plan["scenes"]] == ["skip"] * 2
    assert plan["scenes"][0]["width"] == plan["scenes"][0]["height"] == 320

    status = json.loads(cli("status", str(out), "--json").stdout)
    assert {s["stem"]: s["status"] for s in status["scenes"]} == dict.fromkeys(STEMS, "done")
    both = cli(*reference.args(out, "-q", "-v"))
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_inspect_json() -> None:
    """Guarantee 10: inspect --json carries the table's figures.

    Teeth: --json ignored: json.loads fails on the table.
    """
    done = cli("inspect", "fcn8s-vgg16", "--json", "--tile-sizes", "1024")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["model"] == "fcn8s-vgg16" and row["coarse"]["receptive_field"] == [404, 404]
    assert row["halo"] == {"before": [224, 224], "after": [224, 224]}
    assert row["overhead"]["1024"] == pytest.approx(2.066, abs=1e-3)


@pytest.mark.slow
def test_sizes_are_width_x_height(tmp_path: Path) -> None:
    """Guarantee 10: a scene 100 px wide and 60 px high is "100x60 px (width x height)" in
    the plan and "100x60" in the summary, as GDAL gives width first.

    Teeth: describe() printing rows x cols: "60x100" and this fails.
    """
    scene = tmp_path / "wide.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=100, height=60, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4600000)) as dst:
        dst.write(np.full((3, 60, 100), 90, np.uint8))
    dry = cli("run", str(scene), "--out", str(tmp_path / "out"), "--tile-size", "64",
              "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "wide: 100x60 px (width x height)" in dry.stdout
    done = cli("run", str(scene), "--out", str(tmp_path / "out"), "--tile-size", "64",
               "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "width x height" in done.stdout.splitlines()[0]
    row = next(line for line in done.stdout.splitlines() if line.startswith("wide"))
    assert " 100x60 " in row
    assert not other_lines(done.stderr)


@pytest.mark.slow
def test_xarray_gives_floats_with_nan_where_nodata_as_the_readme_says(
        reference: Reference) -> None:
    """Guarantee 11: the README says xr.open_zarr returns float labels with NaN at nodata
    unless mask_and_scale=False; both halves hold.

    Teeth: the store's labels without _FillValue: the default open keeps uint8 and no NaN.
    """
    xr = pytest.importorskip("xarray")
    store = reference.out / f"{STEMS[0]}.zarr"
    masked = xr.open_zarr(store)["labels"]
    raw = xr.open_zarr(store, mask_and_scale=False)["labels"]
    assert masked.dtype.kind == "f" and raw.dtype == np.uint8
    nodata = raw.values == 255
    assert nodata.any() and np.isnan(masked.values[nodata]).all()
    assert np.array_equal(masked.values[~nodata], raw.values[~nodata])
    assert "mask_and_scale=False" in (Path(__file__).parents[1] / "README.md").read_text()
