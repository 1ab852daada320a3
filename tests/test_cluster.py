"""The embedded cluster: its workers get the packaged Dask settings, and it listens on
the loopback unless compute.listen says otherwise."""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import Client
from distributed.security import Security

from pipeline.cluster import ClusterSpec, connect, worker_config
from tests.crash_models import SLOW_LOG_ENV, SLOW_SECONDS_ENV
from tests.support import RUN_TIMEOUT, Processes, cli, unet_spec, wait_for


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


def _refused(address: str, security: Security) -> str | None:
    """Why a client at ``address`` with ``security`` could not run anything: None when it
    ran a function on the cluster (the guard failed)."""
    try:
        with Client(address, security=security, timeout="5s") as client:
            client.run(os.getpid)  # on every worker, busy or not
    except Exception as exc:  # refused: the handshake fails or the comm is closed
        return type(exc).__name__
    return None


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, http.client.HTTPException):  # not HTTP, or no answer
        return 0


def _speaks_tls(server: tuple[str, int]) -> bool:
    """Whether ``server`` completes a TLS handshake (certificate unchecked) in 5 s."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(server, timeout=5) as sock, \
                context.wrap_socket(sock, server_hostname=server[0]):
            return True
    except (OSError, ssl.SSLError):
        return False


@pytest.mark.slow
def test_an_embedded_run_refuses_clients_without_its_temporary_credentials(
        procs: Processes, tmp_path: Path) -> None:
    """Any local user reaches the loopback: the embedded cluster's comms are mutual TLS
    with credentials made for the run, so neither a plain tcp:// client nor a tls:// one
    with credentials of its own runs anything there, and every server of it but the
    dashboard (scheduler, nannies, workers) speaks TLS; the run completes all the same.

    Teeth: with ``security=`` dropped from LocalCluster and the Client (before), the
    scheduler's address was tcp:// and the plain client ran os.getpid there.
    """
    scenes, log = tmp_path / "scenes", tmp_path / "slow.log"
    assert cli("sample-scenes", str(scenes), "--size", "128", "--count", "1").returncode == 0
    spec = unet_spec(tmp_path, "tests.crash_models:slow", "slow-unet")
    run = procs.cli(["run", str(scenes / "scene-000.tif"), "--out", str(tmp_path / "out"),
                     "--model", str(spec), "--trust-spec-code", "--tile-size", "64",
                     "--workers", "2", "--verbose"],
                    tmp_path / "run", env={SLOW_SECONDS_ENV: "10", SLOW_LOG_ENV: str(log)})
    wait_for(lambda: log.is_file() and "start" in log.read_text(), "a forward pass to start",
             watch=run)
    found = re.search(r"Dask scheduler: (\w+)://(\S+)", run.stderr())
    assert found is not None, run.stderr()
    scheme, location = found.groups()
    assert scheme == "tls"
    assert _refused(f"tcp://{location}", Security()) is not None
    assert _refused(f"tls://{location}", Security.temporary()) is not None
    # Each server is a Dask comm (the scheduler, the nannies, the workers: TLS) or the
    # read-only HTTP server of the scheduler's or a worker's dashboard.
    sockets = _listening(run.pid)
    kinds = {s: "tls" if _speaks_tls(s) else _status(f"http://{s[0]}:{s[1]}/health")
             for s in sockets}
    assert set(kinds.values()) == {"tls", 200}, kinds
    assert sum(kind == "tls" for kind in kinds.values()) >= 5, kinds
    assert run.running(), "the run ended before the checks: they proved nothing"
    assert run.popen.wait(timeout=RUN_TIMEOUT) == 0, run.stderr()


def test_the_embedded_dashboard_keeps_only_read_only_routes() -> None:
    """The dashboard is plain HTTP without authentication: distributed's proxy route
    (which relays requests anywhere with jupyter-server-proxy installed) and the API
    routes (which retire workers) are not served; its pages and health are.

    Teeth: without EMBEDDED_SETTINGS in connect, /proxy/... answered 200.
    """
    with connect(ClusterSpec(workers=1)) as client:
        base = client.dashboard_link.rsplit("/", 1)[0]
        assert _status(f"{base}/health") == 200
        assert _status(f"{base}/info/main/workers.html") == 200
        assert _status(f"{base}/proxy/8786/127.0.0.1/status") == 404
        assert _status(f"{base}/api/v1") == 404


def test_run_dry_run_and_validate_refuse_a_listen_address_this_machine_lacks(
        tmp_path: Path) -> None:
    """An address the embedded cluster cannot bind is a usage error in one line (exit 2)
    before a cluster starts, for run, run --dry-run and validate alike.

    Teeth: preflight without check_listen: run --dry-run and validate exit 0, and run
    exits 1 with distributed's "Cluster failed to start" traceback.
    """
    scene = tmp_path / "scene.tif"
    assert cli("sample-scenes", str(tmp_path), "--size", "64", "--count", "1").returncode == 0
    (tmp_path / "scene-000.tif").rename(scene)
    workflow = tmp_path / "flow.yaml"
    workflow.write_text(f"schema: 1\nscenes: [{scene}]\noutput: {tmp_path}/o\n"
                        "compute:\n  listen: example.invalid\n")
    for args in (["run", str(scene), "--out", str(tmp_path / "o"), "--listen", "999.1.1.1"],
                 ["run", str(scene), "--out", str(tmp_path / "o"), "--listen", "999.1.1.1",
                  "--dry-run"],
                 ["validate", str(workflow)]):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: compute.listen"), (args, lines)
    assert not (tmp_path / "o").exists()


def test_a_run_warns_when_its_cluster_listens_beyond_the_loopback(tmp_path: Path) -> None:
    """One warning line names the address (the scene here cannot be read, so that no
    cluster starts and nothing opens to the network); none on the loopback.

    Teeth: without the warning in cli.run, the 0.0.0.0 case fails.
    """
    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"not a scene")
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        done = cli("run", str(scene), "--out", str(tmp_path / "o"), "--listen", host)
        warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == ([f"warning: the embedded cluster listens on {host} "
                             "(compute.listen): anyone who reaches it can view its dashboard "
                             "(plain HTTP, read-only) and load its scheduler and workers, "
                             "which run code only for holders of this run's temporary TLS "
                             "credentials"] if warned else []), done.stderr
