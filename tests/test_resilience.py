"""Resilience with real processes: SIGKILL and resume, skip and refuse, leftovers, the lock,
lost and poisoned Dask workers, bad scenes next to good ones, odd scene names.

Every run is the real CLI in a subprocess; kills are ``os.killpg(pgid, SIGKILL)`` on a
CLI started in its own session, so its embedded cluster's worker processes die with it.
One clean, uninterrupted run of two generated scenes (320 px, 64 px tiles: 25 tiles
each) is the reference every other run is compared with, byte for byte: COG hashes
and every file of the Zarr stores (COG tags and store attributes hold the scene path,
so runs compared with it use the same scene files).

How each test was checked to have teeth is said in a ``Teeth:`` line in its docstring:
the code was broken that way in a scratch copy of the tree, the test run and seen to fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
import zarr

from tests.conftest import ROOT, shared_file
from tests.support import (
    NODATA,
    RUN_TIMEOUT,
    SIZE,
    STEMS,
    TILE,
    TILES,
    WORK,
    Processes,
    Reference,
    cli,
    error_lines,
    manifest,
    markers,
    mtimes,
    start_cluster,
    unet_spec,
    wait_for,
)

pytestmark = pytest.mark.slow

# ----------------------------------------------------------------- 1. SIGKILL


def _work_chunk_mtimes(out: Path, stem: str, tiles: set[tuple[int, int]]) -> dict[str, int]:
    """mtimes of the recorded tiles' chunk files in the work store (all-nodata tiles have none)."""
    chunks = out / WORK / stem / "labels.zarr" / "labels" / "c"
    found = {}
    for i, j in tiles:
        path = chunks / str(i) / str(j)
        if path.is_file():
            found[f"labels/c/{i}/{j}"] = path.stat().st_mtime_ns
    return found


@pytest.mark.parametrize("point", ["early", "some-tiles", "publishing", "between-scenes"])
def test_sigkill_leaves_nothing_half_published_and_rerun_resumes(
        point: str, reference: Reference, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 1: atomic publication, and resume after SIGKILL of the CLI and its workers.

    Points: "early" (1.5 s, still starting), "some-tiles" (3+ tile records of
    scene-000), "publishing" (write_cog's temporary files of scene-000 exist),
    "between-scenes" (scene-000.tif published, scene-001 not).

    Teeth: publication._make building the COG in place (at STEM.tif, not in the work
    folder): "publishing" fails with "partial scene-000.tif"; run._prepare ignoring tile
    records (RESUME returning frozenset()): "some-tiles",
    "publishing" and "between-scenes" fail with "recorded tiles were computed again".
    """
    out = tmp_path / "out"
    args = reference.args(out, "--workers", "1")
    run = procs.cli(args, tmp_path / "killed")
    if point == "early":
        time.sleep(1.5)
        assert run.running(), run.stderr()
    elif point == "some-tiles":
        wait_for(lambda: len(markers(out, STEMS[0])) >= 3, "3 tile records", watch=run)
    elif point == "publishing":  # while write_cog works on its temporary files
        work = out / WORK / STEMS[0]
        wait_for(lambda: any(work.glob(".labels.tif.*.tmp")) or (work / "labels.tif").exists()
                 or (out / f"{STEMS[0]}.tif").exists(), "scene-000's publication", watch=run)
    else:
        wait_for(lambda: (out / f"{STEMS[0]}.tif").exists(), "scene-000.tif", watch=run)
    run.kill()

    # The kill landed where it was meant to.
    recorded = {stem: markers(out, stem) for stem in STEMS}
    if point == "some-tiles":
        assert 3 <= len(recorded[STEMS[0]]) < TILES
        assert not (out / f"{STEMS[0]}.tif").exists()
    if point == "between-scenes":
        assert len(recorded[STEMS[1]]) < TILES and not (out / f"{STEMS[1]}.tif").exists()
    reference.assert_nothing_incomplete(out)

    if point == "some-tiles":
        status = cli("status", str(out))
        assert status.returncode == 0, status.stderr
        line = next(s for s in status.stdout.splitlines() if s.startswith(STEMS[0]))
        # No run holds the folder any more: the killed run's scene reads "stopped".
        assert "stopped" in line and f"{len(recorded[STEMS[0]])}/{TILES}" in line.replace(" ", "")

    published_before = {stem: mtimes(out / f"{stem}.zarr") for stem in STEMS
                        if (out / f"{stem}.zarr" / "zarr.json").is_file()}
    chunk_mtimes = {stem: _work_chunk_mtimes(out, stem, recorded[stem]) for stem in STEMS}
    work_before = {stem: sorted(os.listdir(out / WORK / stem)) for stem in STEMS
                   if (out / WORK / stem).exists()}

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    for stem in STEMS:
        reference.assert_same(out, stem)
        if stem in published_before:  # published before the kill: skipped, untouched
            # Skipped, or (killed after the moves, before the published record) its
            # publication finished without computing or moving anything.
            action = scenes[stem]["action"]
            assert action == "skip" or (action == "publish" and scenes[stem]["inferred"] == 0), (
                f"{stem} was published before the kill, yet the rerun computed it again "
                f"(action {action}); work folder left by the kill: {work_before.get(stem)}")
            assert mtimes(out / f"{stem}.zarr") == published_before[stem]
        assert not (out / WORK / stem).exists(), f"{stem}: work folder left after publication"
        if stem in published_before:
            continue
        # Only tiles without a record were computed: recorded chunks were not rewritten
        # (the store is renamed into place, so a kept chunk keeps its mtime) ...
        kept = {k: v for k, v in mtimes(out / f"{stem}.zarr", "*").items()
                if k in chunk_mtimes[stem]}
        assert kept == chunk_mtimes[stem], f"{stem}: recorded tiles were computed again"
        # ... and the rerun inferred exactly the unrecorded tiles that have data.
        expected = len(reference.tiles_with_data(stem) - recorded[stem])
        assert scenes[stem]["inferred"] == expected, (stem, len(recorded[stem]))
    assert not list(out.glob(".*.tmp")), "temporary files left next to the outputs"


# ----------------------------------------------------------------- 2, 3. skip, refuse, leftovers


LEFTOVERS = (".scene-000.tif.abc123.tmp", ".scene-001.tif.0123456789ab.tmp",
             ".scene-000.tif.abc123.tmp.aux.xml")


@dataclass(frozen=True)
class Rerun:
    out: Path
    done: subprocess.CompletedProcess[str]
    before: dict[str, int]


def _published_mtimes(out: Path, stems: tuple[str, ...] = STEMS) -> dict[str, int]:
    found: dict[str, int] = {}
    for stem in stems:
        found[f"{stem}.tif"] = (out / f"{stem}.tif").stat().st_mtime_ns
        found.update({f"{stem}.zarr/{k}": v for k, v in mtimes(out / f"{stem}.zarr").items()})
    return found


@pytest.fixture(scope="module")
def finished_rerun(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Rerun:
    """A copy of the finished reference directory with a killed run's leftovers, rerun."""
    out = tmp_path_factory.mktemp("finished") / "out"
    shutil.copytree(reference.out, out)  # copy2: the copies keep their mtimes
    for name in LEFTOVERS:
        (out / name).write_bytes(b"II*\x00 half a COG")
    before = _published_mtimes(out)
    done = cli(*reference.args(out, "--workers", "2"))
    return Rerun(out, done, before)


def test_rerun_of_a_finished_directory_skips_every_scene(finished_rerun: Rerun,
                                                        reference: Reference) -> None:
    """Guarantee 2a: same command again: every scene skipped, no cluster, outputs untouched.

    Teeth: actions.decide's SKIP branch disabled (every scene restarted) fails here.
    """
    out, done = finished_rerun.out, finished_rerun.done
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("scene-")}
    assert all("skipped" in rows[stem] for stem in STEMS), done.stdout
    assert "Dask dashboard" not in done.stderr and "tiles " not in done.stderr  # no cluster
    scenes, made = manifest(out), manifest(reference.out)
    assert all(scenes[s]["skipped"] and scenes[s]["action"] == "skip" for s in STEMS)
    for stem in STEMS:  # the figures of the run that made the outputs, not zeros
        for key in ("inferred", "seconds", "work_seconds", "tiles", "attempts"):
            assert scenes[stem][key] == made[stem][key], (stem, key)
        assert scenes[stem]["inferred"] > 0
    runs = json.loads((out / "run.json").read_text())["history"]
    assert [r["scenes"] for r in runs[-2:]] == [{"done": 2}, {"skipped": 2}]  # appended
    assert _published_mtimes(out) == finished_rerun.before
    for stem in STEMS:
        reference.assert_same(out, stem)


def test_leftovers_of_a_killed_run_are_removed(finished_rerun: Rerun) -> None:
    """Guarantee 3: hidden temporary files a killed run left in DIR are removed by the next run.

    Teeth: clean_leftovers() call removed from run(): the files stay and this fails.
    """
    assert finished_rerun.done.returncode == 0, finished_rerun.done.stderr
    assert not [name for name in LEFTOVERS if (finished_rerun.out / name).exists()]


def test_changed_setting_is_refused_then_overwrite_recomputes(finished_rerun: Rerun,
                                                              reference: Reference) -> None:
    """Guarantee 2b: another --tile-size is refused (exit 2, names scenes and --overwrite);
    with --overwrite the scenes are computed again with the new tiling.

    Teeth: the conflict check in actions.decide disabled: the first run exits 0.
    """
    out = finished_rerun.out
    args = ["run", *map(str, reference.scenes), "--out", str(out), "--tile-size", "128",
            "--workers", "2"]
    refused = cli(*args)
    assert refused.returncode == 2, refused.stderr
    assert all(stem in refused.stderr for stem in STEMS), refused.stderr
    assert "--overwrite" in refused.stderr
    assert _published_mtimes(out) == finished_rerun.before, "refused run touched the outputs"

    done = cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    for stem in STEMS:
        assert not scenes[stem]["skipped"] and scenes[stem]["inferred"] > 0
        meta = json.loads((out / f"{stem}.zarr" / "labels" / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 128]
        with rasterio.open(out / f"{stem}.tif") as cog:  # tiling never changes labels
            assert np.array_equal(cog.read(1), reference.labels[stem])


# ----------------------------------------------------------- 1. kill windows inside journal steps


@pytest.fixture(scope="module")
def journal_windows(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Rerun:
    """Two kill windows too narrow to hit by polling, rebuilt on disk as a kill leaves them.

    scene-000: killed in publish_scene after the store was moved into place, while
    ``shutil.rmtree(work_dir)`` was removing the work folder (fingerprint.json and tile
    records not yet removed). scene-001: killed in run._prepare between
    ``record.start`` (fingerprint.json written) and the end of ``create_label_store``
    (only the group's zarr.json written, as ``zarr.open_group(mode="w")`` leaves it).
    """
    out = tmp_path_factory.mktemp("windows") / "out"
    shutil.copytree(reference.out, out)
    attrs = {stem: json.loads((out / f"{stem}.zarr" / "zarr.json").read_text())["attributes"]
             for stem in STEMS}
    for stem in STEMS:
        work = out / WORK / stem
        (work / "tiles").mkdir(parents=True)
        (work / "fingerprint.json").write_text(
            json.dumps({"fingerprint": attrs[stem]["fcn_pipeline_fingerprint"], "values": {}}))
    for i in range(SIZE // TILE):
        for j in range(SIZE // TILE):
            (out / WORK / STEMS[0] / "tiles" / f"{i}-{j}").touch()
    shutil.rmtree(out / f"{STEMS[1]}.zarr")
    (out / f"{STEMS[1]}.tif").unlink()
    zarr.open_group(str(out / WORK / STEMS[1] / "labels.zarr"), mode="w", zarr_format=3,
                    attributes=attrs[STEMS[1]])
    before = _published_mtimes(out, STEMS[:1])
    done = cli(*reference.args(out, "--workers", "2"))
    return Rerun(out, done, before)


def test_kill_while_removing_the_work_folder_of_a_published_scene(journal_windows: Rerun,
                                                                  reference: Reference) -> None:
    """Guarantee 1, publication window: a scene whose store is published is not computed again
    because its work folder was only partly removed; the leftover folder goes.

    Teeth: failed before commit 44096f9 (published scene computed again); fails
    with actions.decide's SKIP branch disabled.
    """
    out, done = journal_windows.out, journal_windows.done
    scene = manifest(out)[STEMS[0]]
    assert scene["status"] == "done", done.stderr
    assert scene["skipped"] and scene["action"] == "skip", "published scene computed again"
    assert _published_mtimes(out, STEMS[:1]) == journal_windows.before
    assert not (out / WORK / STEMS[0]).exists()
    reference.assert_same(out, STEMS[0])


def test_kill_while_creating_the_label_store(journal_windows: Rerun, reference: Reference) -> None:
    """Guarantee 1, start window: a work folder whose label store was cut short by a kill
    is started again, not resumed into a scene that fails on every rerun.

    Teeth: failed before commit 44096f9 (OutputError "no 'labels' array" on every rerun);
    fails with SceneRecord.store_complete() returning True.
    """
    out, done = journal_windows.out, journal_windows.done
    assert manifest(out)[STEMS[1]]["status"] == "done", done.stderr
    assert done.returncode == 0, done.stderr
    reference.assert_same(out, STEMS[1])


# ----------------------------------------------------------------- 4. lock


def test_second_run_on_a_locked_directory_exits_at_once_and_sigkill_frees_the_lock(
        reference: Reference, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 4: one run per directory; the refusal names the holder; SIGKILL frees it.

    Teeth: fcntl.flock made a no-op in pipeline.journal: the second run exits 1 (its tasks
    find the first run's id gone), not 2.
    """
    # A scene of 100 tiles, so that the first run is still busy when it is killed.
    made = cli("sample-scenes", str(tmp_path), "--size", "640", "--count", "1", "--seed", "3")
    assert made.returncode == 0, made.stderr
    big = (tmp_path / "scene-000.tif").rename(tmp_path / "big.tif")
    out = tmp_path / "out"
    first = procs.cli(["run", str(big), "--out", str(out), "--tile-size", str(TILE),
                       "--workers", "1"], tmp_path / "first")
    lock = out / WORK / ".lock"
    wait_for(lambda: lock.is_file() and lock.read_text().split()[:1] == [str(first.pid)],
             "the first run to hold the lock", watch=first)
    wait_for(lambda: (out / "run.json").is_file(), "the first run's manifest", watch=first)

    start = time.monotonic()
    second = cli("run", str(reference.scenes[0]), "--out", str(out), "--tile-size", str(TILE),
                  "--workers", "1")
    elapsed = time.monotonic() - start
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "another fcn-pipeline run" in second.stderr
    assert first.running(), "the first run ended before it could be killed"
    assert elapsed < 10, f"the refused run took {elapsed:.1f} s to say so"

    first.kill()
    assert first.popen.returncode == -signal.SIGKILL
    third = cli("run", str(reference.scenes[0]), "--out", str(out), "--tile-size", str(TILE),
                 "--workers", "1")
    assert third.returncode == 0, third.stderr
    reference.assert_same(out, STEMS[0])


# ----------------------------------------------------------------- 5. Dask workers


def test_run_survives_losing_a_worker(reference: Reference, procs: Processes,
                                      tmp_path: Path) -> None:
    """Guarantee 5a: SIGKILL one of two workers mid-run; the run ends well, same labels.

    Teeth: the scheduler started with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0
    (no task may be retried after a worker death): the run fails and so does this.
    """
    cluster = start_cluster(procs, tmp_path / "cluster", nanny=False)
    out = tmp_path / "out"
    run = procs.cli(reference.args(out, "--scheduler", cluster.address), tmp_path / "run")
    wait_for(lambda: sum(len(markers(out, s)) for s in STEMS) >= 2, "2 tile records", watch=run)
    victim = cluster.workers[0]
    assert run.running() and not (out / f"{STEMS[1]}.tif").exists(), "the run was already done"
    victim.kill()
    assert victim.popen.returncode == -signal.SIGKILL
    run.popen.wait(timeout=RUN_TIMEOUT)
    assert run.popen.returncode == 0, run.stderr()
    for stem in STEMS:
        reference.assert_same(out, stem)


ALLOWED_FAILURES = 1  # distributed's default is 3; 1 keeps the worker restarts few
MARKER = 60000  # a uint16 value the poison spec normalises to ~958, far above THRESHOLD


@pytest.fixture(scope="module")
def poison_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unet_spec(tmp_path_factory.mktemp("poison-spec"), "tests.crash_models:poisoned",
                     "poisoned-unet")


def _poisoned_scene(source: Path, target: Path) -> None:
    """``source`` as uint16 with a 4x4 marker patch in the middle of tile (2, 2) only.

    The U-Net's halo is 24 px, so no other tile's window reaches the patch.
    """
    with rasterio.open(source) as src:
        profile, data = src.profile, src.read().astype(np.uint16)
    data[:, 158:162, 158:162] = MARKER
    profile.update(dtype="uint16")
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)


def test_poisoned_tile_fails_its_scene_after_bounded_attempts(
        reference: Reference, poison_spec: Path, procs: Processes, tmp_path: Path) -> None:
    """Guarantee 5b: a tile that kills every worker trying it (nannies restart them) fails
    its scene with KilledWorker after allowed-failures + 1 attempts; the clean scene is
    published, the poisoned one not at all, the manifest records the failure.

    Teeth: _track() not marking a scene failed when a future errs: exit 0, this fails.
    The attempt count is the poisoned forward's own log, one line per crash.
    """
    poisoned = tmp_path / "poisoned.tif"
    _poisoned_scene(reference.scenes[1], poisoned)
    log = tmp_path / "poison.log"
    cluster = start_cluster(
        procs, tmp_path / "cluster", nanny=True,
        scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(ALLOWED_FAILURES)},
        worker_env={"FCN_TEST_POISON_LOG": str(log)})
    out = tmp_path / "out"
    done = cli("run", str(reference.scenes[0]), str(poisoned), "--out", str(out),
                "--model", str(poison_spec), "--trust-spec-code", "--tile-size", str(TILE),
                "--scheduler", cluster.address)
    assert done.returncode == 1, done.stderr
    attempts = log.read_text().split() if log.is_file() else []
    assert len(attempts) == ALLOWED_FAILURES + 1, attempts
    assert "KilledWorker" in done.stderr
    scenes = manifest(out)
    assert scenes[STEMS[0]]["status"] == "done"
    assert scenes["poisoned"]["status"] == "failed"
    assert "KilledWorker" in scenes["poisoned"]["error"]
    assert (out / f"{STEMS[0]}.tif").is_file() and (out / f"{STEMS[0]}.zarr").is_dir()
    assert not (out / "poisoned.tif").exists() and not (out / "poisoned.zarr").exists()
    assert all(w.running() for w in cluster.workers), "a nanny did not survive"


# ----------------------------------------------------------------- 6. bad scenes


def _no_crs_copy(source: Path, target: Path) -> None:
    with rasterio.open(source) as src:
        profile, data = src.profile, src.read()
    profile.update(crs=None)
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)


BAD = {  # file name -> words its error line must hold
    "missing.tif": ("no such file",),
    "not-a-raster.tif": ("not a raster",),
    "truncated.tif": ("cannot read window", "truncated or corrupt"),
    "corrupt.tif": ("cannot read window", "truncated or corrupt"),
    "rgb1_fake_nir_epsg3857.tif": ("1 band", "bands [1, 2, 3]"),
    "no-crs.tif": ("no CRS", "--allow-no-crs"),
    "rotated.tif": ("rotated",),
}


def test_bad_scenes_fail_alone_with_one_clear_line_each(reference: Reference,
                                                        tmp_path: Path) -> None:
    """Guarantee 6a: bad scenes next to good ones: exit 1, one stderr line per bad scene
    naming file and cause, nothing published for them, good scenes byte-identical.

    Teeth: GTIFF_IGNORE_READ_ERRORS=TRUE in readers.GDAL_OPTIONS: truncated.tif is
    "done" (with zeros) and this fails; so does _track() not marking failed scenes.
    """
    bad = {name: shared_file(name) for name in BAD if name not in ("missing.tif", "no-crs.tif")}
    bad["missing.tif"] = tmp_path / "missing.tif"
    bad["no-crs.tif"] = tmp_path / "no-crs.tif"
    _no_crs_copy(reference.scenes[1], bad["no-crs.tif"])
    out = tmp_path / "out"
    done = cli("run", *map(str, bad.values()), *map(str, reference.scenes), "--out", str(out),
                "--tile-size", str(TILE), "--workers", "2")
    assert done.returncode == 1, done.stderr
    scenes = manifest(out)
    problems = []
    for name, words in BAD.items():
        stem = Path(name).stem
        lines = error_lines(done.stderr, name)
        if len(lines) != 1 or not lines[0].startswith(f"error: {name}") \
                or not all(w in lines[0] for w in words):
            problems.append(f"{name}: {len(lines)} lines, first: {lines[:1]}")
        assert scenes[stem]["status"] == "failed"
        assert not (out / f"{stem}.tif").exists() and not (out / f"{stem}.zarr").exists()
    for stem in STEMS:
        assert scenes[stem]["status"] == "done"
        reference.assert_same(out, stem)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------- 6, 7. odd scenes and names


ODD_NAMES = {"a b;c.tif": "a_b_c", "..tif": "scene", ".hidden.tif": "hidden",
             "$(touch pwned)`x`.tif": "_touch_pwned_x_"}


OddRun = tuple[Path, Path, "subprocess.CompletedProcess[str]", set[Path]]


@pytest.fixture(scope="module")
def odd_run(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> OddRun:
    """One run of the odd but valid reference rasters and of scenes with odd names.

    A one-band spec (the demo network and weights, band 1 repeated) so the
    one-band float_nan.tif can run; --allow-no-crs for it.
    """
    names = ("float_nan.tif", "all-nodata.tif", "world.rgb.tif", "RGB.byte.tif")
    shared = [shared_file(name) for name in names]
    base = tmp_path_factory.mktemp("odd")
    demo = ROOT / "pipeline" / "data"
    spec = yaml.safe_load((demo / "demo.yaml").read_text())
    spec.update(weights=str(demo / spec["weights"]), bands=[1, 1, 1])
    (base / "one-band.yaml").write_text(yaml.safe_dump(spec))
    inputs = base / "in"
    inputs.mkdir()
    for name in ODD_NAMES:
        shutil.copy(reference.scenes[0], inputs / name)
    (base / "cwd").mkdir()
    odd = [f"../in/{name}" for name in ODD_NAMES]  # relative, through ".."
    before = {p for p in base.rglob("*")}
    out = base / "out"
    done = cli("run", *map(str, shared), *odd, "--out", str(out), "--model",
                str(base / "one-band.yaml"), "--tile-size", "256", "--workers", "2",
                "--allow-no-crs", cwd=base / "cwd")
    return base, out, done, before


def test_odd_reference_rasters_work(odd_run: OddRun) -> None:
    """Guarantee 6b: a 3x2 NaN-nodata scene without CRS, an all-nodata scene (no inference),
    a geographic and a UTM scene in one run: all published on their own grid and CRS.

    Teeth: tasks._valid() returning all-True (nodata ignored): float_nan's NaN pixel
    gets a class and this fails.
    """
    _, out, done, _ = odd_run
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    for name in ("float_nan.tif", "all-nodata.tif", "world.rgb.tif", "RGB.byte.tif"):
        stem = Path(name).stem
        assert scenes[stem]["status"] == "done", scenes[stem]["error"]
        with rasterio.open(shared_file(name)) as src, rasterio.open(out / f"{stem}.tif") as cog:
            assert cog.shape == src.shape and cog.transform == src.transform
            assert cog.crs == src.crs
            labels, valid = cog.read(1), src.dataset_mask() > 0
            if np.issubdtype(src.dtypes[0], np.floating):
                valid &= ~np.isnan(src.read(1))
            assert np.array_equal(labels == NODATA, ~valid), name
    assert scenes["all-nodata"]["inferred"] == 0
    assert scenes["float_nan"]["inferred"] == 1
    with rasterio.open(out / "world.rgb.tif") as a, rasterio.open(out / "RGB.byte.tif") as b:
        assert a.crs.to_epsg() == 4326 and b.crs.to_epsg() == 32618


def test_odd_scene_names_write_inside_the_output_directory(odd_run: OddRun) -> None:
    """Guarantee 7: names with spaces, ';', '$()', backquotes, leading dots, given through
    '..', write sanitised outputs inside DIR and nothing anywhere else.

    Teeth: outputs_for() keeping a relative scene path ("../in/a b;c") in the stem
    writes next to the inputs and fails on `outside`; outputs_for() using the raw
    Path(scene).stem fails on the names (and "..tif" then has the stem ".", whose
    work folder is .fcn-pipeline itself: the run wipes its own journal).
    """
    base, out, done, before = odd_run
    created = {p for p in base.rglob("*")} - before
    outside = sorted(str(p) for p in created if out not in (p, *p.parents))
    assert not outside, outside
    assert not (base / "cwd" / "pwned").exists() and not (base / "in" / "pwned").exists()
    assert done.returncode == 0, done.stderr
    scenes = manifest(out)
    labels = {}
    for name, stem in ODD_NAMES.items():
        assert scenes[stem]["status"] == "done", (name, scenes[stem]["error"])
        with rasterio.open(out / f"{stem}.tif") as cog:
            labels[stem] = cog.read(1)
        assert (out / f"{stem}.zarr" / "zarr.json").is_file()
    first = labels.pop("a_b_c")  # all are copies of one scene
    assert first.shape == (SIZE, SIZE) and all(np.array_equal(first, v) for v in labels.values())
