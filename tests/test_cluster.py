"""The embedded cluster: its workers get the packaged Dask settings, and it listens on
the loopback unless compute.listen says otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dask.config
import psutil
import pytest

from pipeline.cluster import ClusterSpec, connect, worker_config
from tests.crash_models import SLOW_LOG_ENV, SLOW_SECONDS_ENV
from tests.support import Processes, cli, unet_spec, wait_for


def _malloc_setting() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_packaged_settings_unset_the_malloc_trim_threshold() -> None:
    config = worker_config()
    assert config == {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536


def test_embedded_workers_start_without_it() -> None:
    # distributed's default (65536) pins glibc's mmap threshold and made tile tasks and
    # COG writing about 3x slower; the embedded cluster's workers must not inherit it.
    with connect(ClusterSpec(workers=1)) as client:
        settings = client.run(_malloc_setting)
    assert list(settings.values()) == [None]


def _listening(pid: int) -> dict[tuple[str, int], int]:
    """Every listening inet socket of process ``pid`` and its descendants: (host, port)
    -> the pid that holds it."""
    found: dict[tuple[str, int], int] = {}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for sock in proc.net_connections(kind="inet"):
                if sock.status == psutil.CONN_LISTEN:
                    found[(sock.laddr.ip, sock.laddr.port)] = proc.pid
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("environ", "host"), [
    ({}, "127.0.0.1"),
    ({"FCN_PIPELINE_COMPUTE_LISTEN": "127.0.0.2"}, "127.0.0.2"),
])
def test_an_embedded_run_listens_only_where_compute_listen_says(
        procs: Processes, tmp_path: Path, environ: dict[str, str], host: str) -> None:
    """Anyone who reaches a Dask scheduler or its HTTP routes runs code in its workers:
    by default the embedded cluster (scheduler, dashboard, nannies, workers) listens on
    the loopback only; compute.listen moves all of it to another interface (here another
    loopback address, so that the test opens nothing to the network).

    Teeth: with LocalCluster's dashboard_address ":0" (before), the dashboard listened on
    every interface and the default case failed; with host=spec.listen dropped, the
    127.0.0.2 case failed on the scheduler, nannies and workers (127.0.0.1).
    """
    scenes, log = tmp_path / "scenes", tmp_path / "slow.log"
    assert cli("sample-scenes", str(scenes), "--size", "128", "--count", "1").returncode == 0
    spec = unet_spec(tmp_path, "tests.crash_models:slow", "slow-unet")
    run = procs.cli(["run", str(scenes / "scene-000.tif"), "--out", str(tmp_path / "out"),
                     "--model", str(spec), "--trust-spec-code", "--tile-size", "64",
                     "--workers", "2"],
                    tmp_path / "run",
                    env={SLOW_SECONDS_ENV: "60", SLOW_LOG_ENV: str(log), **environ})
    wait_for(lambda: log.is_file() and "start" in log.read_text(), "a forward pass to start",
             watch=run)
    sockets = _listening(run.pid)
    assert {ip for ip, _ in sockets} == {host}, sockets
    # The scheduler, its dashboard and the two nannies in the run; a worker in each child.
    assert sum(pid == run.pid for pid in sockets.values()) >= 4, sockets
    assert len(set(sockets.values()) - {run.pid}) >= 2, sockets
    dashboard = re.search(r"Dask dashboard: http://([^/:]+):(\d+)/", run.stderr())
    assert dashboard is not None, run.stderr()
    assert (dashboard.group(1), int(dashboard.group(2))) in sockets, sockets
