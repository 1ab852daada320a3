"""``fcn-pipeline run --scheduler``: a real scheduler and real workers on the loopback.

One ``dask scheduler`` process and two ``dask worker`` processes (only one of
them has the ``GPU`` resource) on 127.0.0.1, started as their own process
groups and always terminated. An observer client records the scheduler's task
stream while the CLI runs, so the tests see where every task ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from distributed import Client, get_task_stream

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

START_TIMEOUT = 90.0  # seconds for the scheduler file, then for both workers
RUN_TIMEOUT = 300.0
GPU_WORKER = "loopback-gpu"
CPU_WORKER = "loopback-cpu"


@dataclass(frozen=True)
class Loopback:
    """The running cluster: its address, the two workers' addresses and an observer."""

    address: str
    gpu_worker: str
    cpu_worker: str
    observer: Client
    logs: Path

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FCN_PIPELINE_", "DASK_"))}


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, wait, then SIGKILL whatever is left."""
    for proc in processes:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in processes:
        try:  # the group may hold the worker process under its nanny even after the nanny ended
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dask scheduler exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.2)
    pytest.fail(f"no scheduler file after {START_TIMEOUT:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    folder = tmp_path_factory.mktemp("loopback")
    scheduler_file = folder / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []
    observer: Client | None = None
    try:
        log = folder / "scheduler.log"
        scheduler = _start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                            "--scheduler-file", str(scheduler_file), "--no-dashboard"], log)
        processes.append(scheduler)
        address = _wait_for_file(scheduler_file, scheduler, log)["address"]
        assert address.startswith("tcp://127.0.0.1:"), address
        for name, extra in ((GPU_WORKER, ["--resources", "GPU=1"]), (CPU_WORKER, [])):
            processes.append(_start([
                "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--name", name,
                "--nthreads", "1", "--memory-limit", "0", "--no-dashboard",
                "--local-directory", str(folder / name), "--death-timeout", "60", *extra,
            ], folder / f"{name}.log"))
        observer = Client(address, timeout="30s")
        try:
            observer.wait_for_workers(2, timeout=START_TIMEOUT)
        except TimeoutError:
            pytest.fail("the two workers did not join:\n" + "\n".join(
                p.read_text(errors="replace")[-3000:] for p in sorted(folder.glob("*.log"))))
        workers = observer.scheduler_info(n_workers=-1)["workers"]
        by_name = {info["name"]: addr for addr, info in workers.items()}
        assert set(by_name) == {GPU_WORKER, CPU_WORKER}, workers
        assert workers[by_name[GPU_WORKER]]["resources"] == {"GPU": 1}
        assert not workers[by_name[CPU_WORKER]]["resources"]
        yield Loopback(address, by_name[GPU_WORKER], by_name[CPU_WORKER], observer, folder)
    finally:
        if observer is not None:
            observer.close(timeout=10)
        _stop(processes)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("scenes")
    done = run_cli("sample-scenes", str(directory), "--size", "256", "--count", "2", "--seed", "3",
                   timeout=120)
    assert done.returncode == 0, done.stderr
    return directory


def _labels(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(out / f"{stem}.tif") as cog:
        cog_labels = cog.read(1)
    stored = zarr.open_group(str(out / f"{stem}.zarr"), mode="r")["labels"][:]
    return cog_labels, stored


def _assert_summary_done(stdout: str, stems: tuple[str, ...]) -> None:
    lines = stdout.splitlines()
    for stem in stems:
        rows = [line for line in lines if line.split()[:1] == [stem]]
        assert len(rows) == 1, stdout
        assert rows[0].split()[5] == "done", rows[0]  # scene, size, tiles, seconds, Mpx/s, status


def _run_observed(loopback: Loopback, stems: tuple[str, ...],
                  *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Run the CLI on the loopback scheduler and check that ``stems`` are done; the
    scheduler's task records of that run."""
    with get_task_stream(client=loopback.observer) as stream:
        done = run_cli("run", *args, "--scheduler", loopback.address, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{loopback.log_text()}"
    _assert_summary_done(done.stdout, stems)
    return done, list(stream.data)


def _keyed(records: list[dict], prefix: str) -> list[dict]:
    return [r for r in records if str(r["key"]).startswith(prefix)]


def test_gpu_resource_run_sends_inference_to_the_gpu_worker(
        loopback: Loopback, scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "remote"
    done, records = _run_observed(loopback, ("scene-000", "scene-001"), str(scenes / "*.tif"),
                                  "--out", str(out), "--device", "cpu", "--gpu-resource",
                                  "--tile-size", "64")
    assert "tiles 32/32 (100%)" in done.stderr

    predict, publish = _keyed(records, "predict-"), _keyed(records, "publish-")
    assert predict, records
    assert {r["worker"] for r in predict} == {loopback.gpu_worker}, \
        [(r["key"], r["worker"]) for r in predict if r["worker"] != loopback.gpu_worker]
    assert all(r["status"] == "OK" for r in predict + publish), records
    assert len(predict) == 32, [r["key"] for r in predict]  # 4x4 tiles of 64 a scene, one a task
    assert sorted(str(r["key"])[:len("publish-scene-000-")] for r in publish) == [
        "publish-scene-000-", "publish-scene-001-"], publish

    embedded = tmp_path / "embedded"
    local = run_cli("run", str(scenes / "*.tif"), "--out", str(embedded), "--device", "cpu",
                    "--tile-size", "64", "--workers", "1", timeout=RUN_TIMEOUT)
    assert local.returncode == 0, local.stderr
    for stem in ("scene-000", "scene-001"):
        remote_cog, remote_store = _labels(out, stem)
        local_cog, local_store = _labels(embedded, stem)
        assert remote_cog.shape == (256, 256)
        assert np.array_equal(remote_cog, remote_store)
        assert np.array_equal(remote_cog, local_cog)
        assert np.array_equal(remote_store, local_store)
    manifest = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in manifest["scenes"]] == ["done", "done"]
    assert manifest["device"] == "cpu"


def test_run_without_gpu_resource_on_the_loopback_cluster(
        loopback: Loopback, scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    _, records = _run_observed(loopback, ("scene-000",), str(scenes / "scene-000.tif"),
                               "--out", str(out), "--device", "cpu", "--no-gpu-resource",
                               "--tile-size", "64")
    predict = _keyed(records, "predict-")
    assert len(predict) == 16, [r["key"] for r in records]  # 4x4 tiles of 64, one a task
    assert {r["worker"] for r in predict} <= {loopback.gpu_worker, loopback.cpu_worker}
    assert _keyed(records, "publish-scene-000-")
    assert (out / "scene-000.tif").is_file()
