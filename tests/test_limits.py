"""Resource limits from a scene's header: band count, pixel count, memory of one window.

Hostile headers are written for real (:func:`pipeline.samples.write_header_scene`:
GeoTIFFs whose blocks are never written, a few hundred KiB on disk) and given to the
real CLI. How each test was checked to have teeth is said in a ``Teeth:`` line: the
guard was broken that way, the test run and seen to fail.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from itertools import islice
from pathlib import Path

import pytest

from pipeline.actions import fingerprint_values
from pipeline.benchmark import POINTWISE
from pipeline.config import RunConfig, values_from_env, values_from_tree
from pipeline.errors import SceneLimitError
from pipeline.grid import TileGrid
from pipeline.limits import read_bytes
from pipeline.modelspec import load_spec
from pipeline.plan import ScenePlan, outputs_for
from pipeline.preflight import preflight
from pipeline.readers import open_scene
from pipeline.samples import write_header_scene
from pipeline.scene import SceneInfo
from tests.conftest import ROOT, run_cli

#: Seconds a refusal from the header may take in preflight (the house rule: well under 2).
FAST = 2.0


def _header(count: int, dtype: str, interleave: str | None,
            shape: tuple[int, int] = (256, 256)) -> SceneInfo:
    return SceneInfo("x.tif", shape, count, dtype, None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), None,
                     (256, 256), 0, 0, interleave=interleave)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _preflight_refusal(config: RunConfig) -> tuple[str, float]:
    """The one-line refusal preflight gives ``config``, and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(SceneLimitError) as caught:
        preflight(config)
    return str(caught.value), time.monotonic() - started


@pytest.fixture(scope="module")
def many_bands(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 x 1 px and 65,535 bands without nodata: the header whose nodata check alone (a
    VRT copy of every band) takes seconds and hundreds of MiB, were it reached."""
    return write_header_scene(tmp_path_factory.mktemp("bands") / "bands.tif", (1, 1),
                              count=65535)


def test_a_header_of_65535_bands_is_refused_in_one_line_at_once(many_bands: Path,
                                                                 tmp_path: Path) -> None:
    """Teeth: the check_header call removed from open_scene: the run goes on past
    preflight (torch, the model) and no line names the band limit; moved after
    _check_header, preflight takes ~7 s on this header."""
    done = run_cli("run", str(many_bands), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    for words in ("bands.tif", "65535 bands", "input.max_bands (1024)", "--max-bands",
                  "FCN_PIPELINE_INPUT_MAX_BANDS"):
        assert words in line, line
    message, seconds = _preflight_refusal(RunConfig(scenes=(str(many_bands),),
                                                    output=str(tmp_path / "out")))
    assert "65535 bands" in message and seconds < FAST, (message, seconds)
    assert not (tmp_path / "out").exists()


def test_raising_max_bands_lets_the_header_through(tmp_path: Path) -> None:
    """The setting, from the environment or a workflow, admits the scene in preflight.

    Teeth: preflight building HeaderLimits() instead of HeaderLimits.of(config): the
    raised setting is ignored and the scene refused.
    """
    scene = write_header_scene(tmp_path / "cube.tif", (1, 1), count=65535, nodata=0)
    raised = values_from_env({"FCN_PIPELINE_INPUT_MAX_BANDS": "65535"})
    assert values_from_tree({"schema": 1, "input": {"max_bands": 65535}}) == raised
    config = RunConfig(scenes=(str(scene),), output=str(tmp_path / "out"), **raised)
    checked = preflight(config, digests=False)
    assert [c.error for c in checked.scenes] == [None]
    assert checked.scenes[0].info is not None and checked.scenes[0].info.count == 65535
    with pytest.raises(SceneLimitError, match="65535 bands"):
        preflight(RunConfig(scenes=(str(scene),), output=str(tmp_path / "out"), max_bands=65534))


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A header claiming 1,000,000 x 1,000,000 px of 3 bands (8192 px tiles: 180 KiB)."""
    return write_header_scene(tmp_path_factory.mktemp("huge") / "huge.tif",
                              (1_000_000, 1_000_000), count=3, interleave="pixel", block=8192)


def test_a_header_of_a_million_pixels_a_side_is_refused_before_planning(
        huge: Path, tmp_path: Path) -> None:
    """Refused by preflight, which plans no tile, in well under 2 s; 1e12 pixels.

    Teeth: the pixel check removed from check_header: preflight accepts the scene and
    the CLI goes on to plan 954,529 tiles (the test's CLI run then fails on its timeout
    or exit code).
    """
    assert huge.stat().st_size < 2**20
    message, seconds = _preflight_refusal(RunConfig(scenes=(str(huge),),
                                                    output=str(tmp_path / "out")))
    assert seconds < FAST, seconds
    for words in ("huge.tif", "1000000x1000000 px", "1e+12 pixels", "input.max_pixels (1e+11)",
                  "--max-pixels", "FCN_PIPELINE_INPUT_MAX_PIXELS"):
        assert words in message, message
    done = run_cli("run", str(huge), "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"error: {message}"


def test_raising_max_pixels_lets_the_header_through(huge: Path, tmp_path: Path) -> None:
    """``--max-pixels 1e12`` (or ``input.max_pixels: 1e12``) admits the scene in preflight:
    with a 1 MiB budget the next guard, the memory of its windows, is the one to refuse.

    Teeth: the CLI not passing --max-pixels to the configuration: the pixel limit's line
    comes instead.
    """
    assert values_from_tree({"schema": 1, "input": {"max_pixels": "1e12"}}) == {
        "max_pixels": 10**12}
    checked = preflight(RunConfig(scenes=(str(huge),), output=str(tmp_path / "out"),
                                  max_pixels=10**12), digests=False)
    assert [c.error for c in checked.scenes] == [None]
    done = run_cli("run", str(huge), "--out", str(tmp_path / "out"), "--max-pixels", "1e12",
                   "--memory-budget", "1MiB")
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "huge.tif" in line and "tiling.memory_budget (1 MiB)" in line, line


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 x 256 px, 1024 float64 bands stored pixel-interleaved: each 256 px block GDAL
    decodes holds every band, 512 MiB, whichever band is read."""
    return write_header_scene(tmp_path_factory.mktemp("cube") / "cube.tif", (256, 256),
                              count=1024, dtype="float64", interleave="pixel")


def test_windows_over_the_memory_budget_are_refused_in_preflight(cube: Path,
                                                                 tmp_path: Path) -> None:
    """With the budget known without torch (given, or the CPU default), preflight refuses.

    Teeth: the check_window call removed from preflight: preflight returns (the run would
    be refused later, after torch loads), so pytest.raises fails.
    """
    out = str(tmp_path / "out")
    message, seconds = _preflight_refusal(RunConfig(scenes=(str(cube),), output=out,
                                                    memory_budget=256 * 2**20))
    assert seconds < FAST, seconds
    for words in ("cube.tif", "3 of its 1024 float64 bands", "pixel-interleaved",
                  "tiling.memory_budget (256 MiB)", "--memory-budget", "--tile-size"):
        assert words in message, message
    done = run_cli("run", str(cube), "--out", out, "--memory-budget", "256MiB")
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"error: {message}"
    message, _ = _preflight_refusal(RunConfig(scenes=(str(cube),), output=out, device="cpu"))
    assert "cube.tif" in message and "tiling.memory_budget (" in message, message
    checked = preflight(RunConfig(scenes=(str(cube),), output=out, memory_budget=2**30),
                        digests=False)
    assert [c.error for c in checked.scenes] == [None]


@pytest.mark.slow
@pytest.mark.parametrize("tile", [[], ["--tile-size", "256"]], ids=["auto", "given"])
def test_windows_over_the_budget_are_refused_once_the_device_is_known(
        cube: Path, tile: list[str], tmp_path: Path) -> None:
    """With device auto the budget depends on the GPU: the check runs once the model is
    analysed, before anything is written (here on the CPU's default budget), for an
    automatic tile size (in choose_tiles) and a given one (check_task_memory).

    Teeth: fitting_task no longer raising: "auto" gets choose_tile_size's line, which
    names no scene, and "given" exits 0.
    """
    done = run_cli("run", str(cube), "--out", str(tmp_path / "out"), "--dry-run", *tile)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "cube.tif" in line and "tiling.memory_budget (" in line, line
    assert not (tmp_path / "out").exists()


def test_a_pixel_interleaved_block_counts_every_band() -> None:
    """Teeth: read_bytes counting one band per block whatever the interleave: fails."""
    band = read_bytes(_header(200, "uint16", "band"), 3, (256, 256))
    pixel = read_bytes(_header(200, "uint16", "pixel"), 3, (256, 256))
    assert pixel - band == 199 * 256 * 256 * 2
    assert band == (3 + 1) * 256 * 256 * 2 + 3 * 256 * 256 + 256 * 256 * 2


_READ_ONE_WINDOW = """
import resource, sys
from pipeline.grid import Box, Span
from pipeline.readers import read_window
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data, valid = read_window(sys.argv[1], Box(Span(0, 256), Span(0, 256)), [1, 2, 3])
assert data.shape == (3, 256, 256) and valid.all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_window_read_holds_the_bands_it_needs_not_all_the_scene_has(tmp_path: Path) -> None:
    """One 256 px window of bands [1, 2, 3] of a 4096-band scene: the reader's peak grows
    by far less than the 256 MiB that every band of the window would take (rasterio's
    dataset_mask reads every band's mask at once: 400 MiB, 65,535 bands 4.3 GiB).

    Teeth: _mask_validity replaced by ``ds.dataset_mask(window=window) > 0``: the peak
    grows by ~400 MiB and this fails.
    """
    scene = write_header_scene(tmp_path / "bands.tif", (256, 256), count=4096)
    done = subprocess.run([sys.executable, "-c", _READ_ONE_WINDOW, str(scene)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 128 * 2**20, f"{int(done.stdout) / 2**20:.0f} MiB"


def test_batches_are_made_one_at_a_time() -> None:
    """The first batches of a 40,000-tile scene cost kilobytes, not one object per tile.

    Teeth: ScenePlan.batches building the list of every batch first: ~40 MiB, fails.
    """
    scene = _header(1, "uint8", None, shape=(3200, 3200))
    plan = ScenePlan(scene, TileGrid.build(scene.shape, scene.shape, POINTWISE, 16),
                     outputs_for("x.tif", Path("out")))
    assert len(plan.grid) == 40_000
    tracemalloc.start()
    try:
        first = list(islice(plan.batches(4), 3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [len(b) for b in first] == [4, 4, 4]
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB"


def test_the_limits_do_not_enter_the_fingerprint(tmp_path: Path) -> None:
    """A rerun with other limits or another budget skips finished scenes: they decide no
    output. Teeth: max_bands added to fingerprint_values: fails."""
    scene = write_header_scene(tmp_path / "s.tif", (64, 64))
    info = open_scene(scene)
    plan = ScenePlan(info, TileGrid.build(info.shape, info.shape, POINTWISE, 32),
                     outputs_for(scene, tmp_path))
    spec = load_spec("demo")
    assert spec.sha256 is not None
    values = [fingerprint_values(plan, "0" * 64, spec, spec.sha256, config, "cpu")
              for config in (RunConfig(), RunConfig(max_bands=5, max_pixels=10**6,
                                                    memory_budget=2**20))]
    assert values[0] == values[1]


def test_limits_are_settings_with_defaults_that_admit_real_data() -> None:
    """Hyperspectral cubes (~450 bands) and 100,000 x 100,000 px mosaics pass by default."""
    config = RunConfig()
    assert config.max_bands >= 450 and config.max_pixels >= 100_000 * 100_000
    assert config.max_bands < 65535 and config.max_pixels < 10**12
    tree = config.to_tree()
    assert tree["input"]["max_bands"] == config.max_bands
    assert tree["input"]["max_pixels"] == config.max_pixels
