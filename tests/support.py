"""Helpers of the tests that run the real CLI: processes in their own groups, waits, and
the reference outputs every interrupted or damaged run must end up reproducing.

One clean, uninterrupted run of two generated scenes (320 px, 64 px tiles: 25 tiles
each) is the reference (:class:`Reference`, built once per session in ``conftest``):
other runs are compared with it byte for byte, COG hashes and every file of the Zarr
stores (COG tags and store attributes hold the scene path, so runs compared with it use
the same scene files).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr

from tests.conftest import ROOT, run_cli

TILE = 64
SIZE = 320  # 5 x 5 tiles of 64; a multiple of 4 for the U-Net test models
TILES = (SIZE // TILE) ** 2
STEMS = ("scene-000", "scene-001")
NODATA = 255
WORK = ".fcn-pipeline"
WAIT = 240.0  # bound of every wait for a process to reach a point (2 shared, busy cores)
RUN_TIMEOUT = 420.0


# ----------------------------------------------------------------- processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: no FCN_PIPELINE_/DASK_ settings of ours, the
    project root importable (for ``tests.crash_models``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FCN_PIPELINE_", "DASK_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def cli(*args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fcn-pipeline ARGS`` to its end, with the project root importable."""
    return run_cli(*args, timeout=RUN_TIMEOUT, env={"PYTHONPATH": str(ROOT), **(env or {})},
                   cwd=cwd)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


@dataclass
class Proc:
    """A process started in its own session (process group), logging to files."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text(errors="replace")

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group and wait until none of it runs any more."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=60)
        deadline = time.monotonic() + 60
        while group_alive(self.pid):
            assert time.monotonic() < deadline, f"process group {self.pid} survived SIGKILL"
            time.sleep(0.05)


class Processes:
    """Starts processes and kills every group it started when closed."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            popen = subprocess.Popen(args, stdout=out, stderr=err, env=child_env(env),
                                     start_new_session=True)
        proc = Proc(popen, log)
        self.started.append(proc)
        return proc

    def cli(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
        return self.start([sys.executable, "-m", "pipeline.cli", *args], log, env)

    def close(self) -> None:
        """Kill every group, even when one of them will not die (then fail)."""
        survivors = []
        for proc in self.started:
            try:
                proc.kill()
            except (AssertionError, subprocess.TimeoutExpired):
                survivors.append(proc.pid)
        assert not survivors, f"process groups survived SIGKILL: {survivors}"


def wait_for(condition: Callable[[], bool], what: str, *, watch: Proc | None = None,
             timeout: float = WAIT, interval: float = 0.005) -> None:
    """Poll ``condition``; fail after ``timeout`` or when ``watch`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if watch is not None and not watch.running():
            if condition():
                return
            pytest.fail(f"{watch.log.name} exited ({watch.popen.returncode}) before {what}:\n"
                        f"{watch.stderr()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------- outputs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: relative path -> sha256."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder: Path, pattern: str = "*") -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob(pattern) if p.is_file()}


def markers(out: Path, stem: str) -> set[tuple[int, int]]:
    """The tile records of a scene's unfinished work."""
    folder = out / WORK / stem / "tiles"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set()
    return {(int(i), int(j)) for i, _, j in (n.partition("-") for n in names)
            if i.isdigit() and j.isdigit()}  # not the records being written (.I-J.*.tmp)


def manifest(out: Path) -> dict[str, dict[str, Any]]:
    return {s["stem"]: s for s in json.loads((out / "run.json").read_text())["scenes"]}


#: How the demo model's caveat starts: a run of the demo over scenes that are not generated
#: samples prints it once (tests/test_demo_caveat.py checks it).
DEMO_CAVEAT = "warning: the demo model was trained on generated sample scenes only"


def error_lines(stderr: str, name: str) -> list[str]:
    """The lines of ``stderr`` that name ``name``, but the demo model's caveat."""
    return [line for line in stderr.splitlines()
            if name in line and not line.startswith(DEMO_CAVEAT)]


def other_lines(stderr: str) -> list[str]:
    """stderr without the progress and dashboard lines and the demo model's caveat."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("tiles ", "Dask dashboard", DEMO_CAVEAT))]


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: the outputs every other run must reproduce."""

    out: Path
    scenes: tuple[Path, ...]
    cogs: dict[str, str]
    stores: dict[str, dict[str, str]]
    labels: dict[str, np.ndarray]

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["run", *map(str, self.scenes), "--out", str(out), "--tile-size", str(TILE), *extra]

    def tiles_with_data(self, stem: str) -> set[tuple[int, int]]:
        """Tiles whose core has a valid pixel: exactly the tiles a run infers."""
        labels = self.labels[stem]
        rows, cols = -(-labels.shape[0] // TILE), -(-labels.shape[1] // TILE)
        return {(i, j) for i in range(rows) for j in range(cols)
                if (labels[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] != NODATA).any()}

    def assert_same(self, out: Path, stem: str) -> None:
        """``out`` holds the published outputs of ``stem``, byte-identical to the reference."""
        assert sha256(out / f"{stem}.tif") == self.cogs[stem], f"{stem}.tif differs"
        got, want = tree(out / f"{stem}.zarr"), self.stores[stem]
        differ = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        assert not differ, f"{stem}.zarr differs from the reference in {differ}"
        stored = zarr.open_group(str(out / f"{stem}.zarr"), mode="r")["labels"][:]
        assert np.array_equal(stored, self.labels[stem])

    def assert_nothing_incomplete(self, out: Path) -> None:
        """Whatever is published is complete: a COG or a store exists only whole."""
        for stem in STEMS:
            if (out / f"{stem}.tif").exists():
                assert sha256(out / f"{stem}.tif") == self.cogs[stem], f"partial {stem}.tif"
                with rasterio.open(out / f"{stem}.tif") as cog:
                    assert np.array_equal(cog.read(1), self.labels[stem])
            if (out / f"{stem}.zarr").exists():
                got, want = tree(out / f"{stem}.zarr"), self.stores[stem]
                assert got == want, f"partial {stem}.zarr: lacks {sorted(want.keys() - got.keys())}"


def make_reference(scenes_dir: Path, out: Path) -> Reference:
    """Two generated scenes and one clean run of them (the :class:`Reference`)."""
    done = cli("sample-scenes", str(scenes_dir), "--size", str(SIZE), "--count", "2",
               "--seed", "11")
    assert done.returncode == 0, done.stderr
    scenes = tuple(scenes_dir / f"{stem}.tif" for stem in STEMS)
    ref = Reference(out, scenes, {}, {}, {})
    done = cli(*ref.args(out, "--workers", "2"))
    assert done.returncode == 0, done.stderr
    for stem in STEMS:
        ref.cogs[stem] = sha256(out / f"{stem}.tif")
        ref.stores[stem] = tree(out / f"{stem}.zarr")
        ref.labels[stem] = zarr.open_group(str(out / f"{stem}.zarr"), mode="r")["labels"][:]
        assert ref.tiles_with_data(stem), "a reference scene without data proves nothing"
    return ref


# ----------------------------------------------------------------- test models


def unet_spec(folder: Path, architecture: str, name: str) -> Path:
    """A spec of a tiny U-Net behind a test wrapper (``tests.crash_models:ARCH``) with
    random weights, for 3-band scenes of 4 classes; the processes that load it need the
    project root on PYTHONPATH (:func:`child_env`), and a run of it ``--trust-spec-code``
    (its architecture is an import path)."""
    from pipeline.model import save_weights
    from tests import crash_models

    torch.manual_seed(0)
    factory = getattr(crash_models, architecture.rpartition(":")[2])
    digest = save_weights(factory(base=2, depth=2).eval(), folder / f"{name}.safetensors")
    spec = {
        "schema": 1, "name": name, "architecture": architecture,
        "arguments": {"base": 2, "depth": 2}, "weights": f"{name}.safetensors", "sha256": digest,
        "bands": [1, 2, 3], "normalization": {"scale": 0.004, "mean": [0.5] * 3, "std": [0.25] * 3},
        "nodata": {"input": "scene", "output": NODATA},
        "classes": [{"name": f"c{k}", "color": [40 * k, 80, 120]} for k in range(4)],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Cluster:
    address: str
    scheduler: Proc
    workers: list[Proc]


def start_cluster(procs: Processes, folder: Path, *, nanny: bool, workers: int = 2,
                  scheduler_env: dict[str, str] | None = None,
                  worker_env: dict[str, str] | None = None,
                  scheduler_args: Sequence[str] = (),
                  worker_args: Sequence[str] = ()) -> Cluster:
    """A real ``dask scheduler`` and single-thread ``dask worker`` processes on 127.0.0.1
    (``*_args``: more options of ``dask scheduler`` and ``dask worker``, TLS ones say)."""
    info = folder / "scheduler.json"
    scheduler = procs.start(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(info), *scheduler_args],
        folder / "scheduler", env=scheduler_env)
    wait_for(lambda: info.is_file() and "address" in info.read_text(), "the scheduler file",
             watch=scheduler, interval=0.1)
    address = json.loads(info.read_text())["address"]
    started = [
        procs.start(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", f"w{k}",
             "--nthreads", "1", "--nworkers", "1", "--memory-limit", "0", "--no-dashboard",
             "--nanny" if nanny else "--no-nanny", *worker_args],
            folder / f"worker{k}", env=worker_env)
        for k in range(workers)
    ]
    for worker in started:
        wait_for(lambda w=worker: "Registered to" in w.stderr(), f"{worker.log.name} to register",
                 watch=worker, interval=0.1)
    return Cluster(address, scheduler, started)


def smooth_scene(path: Path, shape: tuple[int, int], *, seed: int = 0, cell: int = 16,
                 noise: float = 20.0, hole: tuple[int, int] = (9, 13)) -> Path:
    """A 3-band uint8 GeoTIFF (EPSG:32633, 10 m) of random fields constant on ``cell`` px
    squares plus Gaussian ``noise``, nodata 0 in its first ``hole`` rows x columns."""
    from rasterio.transform import Affine

    rng = np.random.default_rng(seed)
    rows, cols = shape
    coarse = rng.integers(1, 255, (3, rows // cell + 2, cols // cell + 2)).astype(float)
    data = np.stack([np.kron(b, np.ones((cell, cell)))[:rows, :cols] for b in coarse])
    data = np.clip(data + rng.normal(0, noise, data.shape), 1, 255).astype(np.uint8)
    data[:, :hole[0], :hole[1]] = 0
    profile = {"driver": "GTiff", "width": cols, "height": rows, "count": 3,
               "dtype": "uint8", "crs": "EPSG:32633", "nodata": 0,
               "transform": Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path
