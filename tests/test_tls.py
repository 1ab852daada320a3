"""``--scheduler tls://``: a real TLS ``dask scheduler`` and ``dask worker`` on 127.0.0.1,
with the certificates that the openssl commands of deploy/README.md make; a second CA made
the same way stands for anyone else's certificates.

A run over TLS makes the labels of an embedded run; a client without a certificate of
the cluster's CA is refused, by our CLI before it loads torch (one line, exit 2) and by
the scheduler itself (a raw distributed connection).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from distributed import Client
from distributed.comm import CommClosedError
from distributed.comm import connect as comm_connect
from distributed.security import Security

from tests.certificates import make_certificates, tls_options
from tests.conftest import ROOT, run_cli
from tests.support import (
    STEMS,
    Cluster,
    Processes,
    Reference,
    cli,
    manifest,
    start_cluster,
)

#: Upper bound of a usage error's answer on a busy machine (it is well under 2 s idle).
QUICK = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The cluster's certificates, and another CA's made by the same commands."""
    base = tmp_path_factory.mktemp("certificates")
    return make_certificates(base / "ours"), make_certificates(base / "other")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated scene, for the runs that are refused."""
    folder = tmp_path_factory.mktemp("scene")
    done = cli("sample-scenes", str(folder), "--size", "64", "--count", "1")
    assert done.returncode == 0, done.stderr
    return folder / "scene-000.tif"


@pytest.fixture(scope="module")
def tls_cluster(certs: tuple[Path, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A scheduler that listens for tls:// only, and one worker, each with its certificate."""
    ours, _ = certs
    procs = Processes()
    try:
        cluster = start_cluster(
            procs, tmp_path_factory.mktemp("tls-cluster"), nanny=False, workers=1,
            scheduler_args=["--protocol", "tls", *tls_options(ours, "scheduler")],
            worker_args=tls_options(ours, "worker"))
        assert cluster.address.startswith("tls://127.0.0.1:"), cluster.address
        yield cluster
    finally:
        procs.close()


def _refused(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a CLI run refused as a usage error."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_run_over_tls_makes_the_labels_of_an_embedded_run(
        reference: Reference, tls_cluster: Cluster, certs: tuple[Path, Path],
        tmp_path: Path) -> None:
    """The outputs of a run on the TLS cluster are byte-identical to the embedded
    reference run's; run again with the same certificates at other paths (given through
    FCN_PIPELINE_COMPUTE_TLS_*), every scene is skipped: certificate paths do not change
    outputs, so they are not part of the fingerprint.

    Teeth: Client(...) in cluster.connect without security=: the run ends in a traceback
    (TypeError: TLS expects a ssl_context) and this fails; config.tls_cert added to
    actions.fingerprint_values: the outputs (whose attributes hold the fingerprint)
    differ from the reference's and this fails.
    """
    ours, _ = certs
    out = tmp_path / "out"
    done = cli(*reference.args(out, "--scheduler", tls_cluster.address,
                               *tls_options(ours, "runner")))
    assert done.returncode == 0, done.stderr + tls_cluster.scheduler.stderr()[-3000:]
    for stem in STEMS:
        reference.assert_same(out, stem)
    assert all(s["action"] == "start" for s in manifest(out).values()), manifest(out)

    moved = tmp_path / "moved"
    shutil.copytree(ours, moved)
    again = cli(*reference.args(out, "--scheduler", tls_cluster.address), env={
        "FCN_PIPELINE_COMPUTE_TLS_CA_FILE": str(moved / "ca.crt"),
        "FCN_PIPELINE_COMPUTE_TLS_CERT": str(moved / "runner.crt"),
        "FCN_PIPELINE_COMPUTE_TLS_KEY": str(moved / "runner.key")})
    assert again.returncode == 0, again.stderr
    assert [s["action"] for s in manifest(out).values()] == ["skip", "skip"], manifest(out)
    for stem in STEMS:
        reference.assert_same(out, stem)


@pytest.mark.slow
def test_our_cli_without_a_certificate_of_the_cluster_is_refused_in_one_line(
        scene: Path, tls_cluster: Cluster, certs: tuple[Path, Path], tmp_path: Path) -> None:
    """Without the --tls-* options, with another CA's certificate, or trusting another
    CA: exit 2, one line naming the settings, and nothing written.

    Teeth: check_tls's branch for a tls:// address without files removed: the run goes
    on, and distributed's TypeError ("TLS expects a ssl_context") becomes another line;
    cluster._ask's TLS branch removed: the other two say "does not answer as a Dask
    scheduler", without the settings to check.
    """
    ours, other = certs
    out = tmp_path / "out"
    args = ["run", str(scene), "--out", str(out), "--scheduler", tls_cluster.address]
    started = time.monotonic()
    _refused(cli(*args), "asks for TLS", "--tls-ca-file", "--tls-cert", "--tls-key")
    assert time.monotonic() - started < QUICK
    stranger = ["--tls-ca-file", str(ours / "ca.crt"), "--tls-cert", str(other / "runner.crt"),
                "--tls-key", str(other / "runner.key")]
    _refused(cli(*args, *stranger), "TLS handshake", tls_cluster.address, "--tls-cert")
    doubting = ["--tls-ca-file", str(other / "ca.crt"), "--tls-cert", str(ours / "runner.crt"),
                "--tls-key", str(ours / "runner.key")]
    _refused(cli(*args, *doubting), "TLS handshake", "CERTIFICATE_VERIFY_FAILED",
             "--tls-ca-file")
    plain = ["run", str(scene), "--out", str(out), "--scheduler",
             tls_cluster.address.replace("tls://", "tcp://")]
    _refused(cli(*plain), "closed the connection", "asks for TLS")
    assert not out.exists()


def _identity(address: str, context: ssl.SSLContext | None) -> object:
    """Ask the server at ``address`` who it is over a raw distributed connection."""
    async def ask() -> object:
        comm = await comm_connect(address, timeout=5, ssl_context=context)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    return asyncio.run(ask())


def test_the_scheduler_refuses_clients_without_a_certificate_of_its_ca(
        tls_cluster: Cluster, certs: tuple[Path, Path]) -> None:
    """distributed itself, whatever our CLI checks: a raw connection that shows no
    certificate, a Client with another CA's certificate and a plain tcp:// client are
    refused; the same Client with the cluster's runner certificate connects.

    Teeth: with the runner's certificate loaded into the anonymous context, or given to
    the stranger Client instead of the other CA's, the refusals do not happen ("DID NOT
    RAISE"): they are about the certificate, not the address.
    """
    ours, other = certs
    address = tls_cluster.address
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ours / "ca.crt"))
    anonymous.check_hostname = False
    with pytest.raises((CommClosedError, OSError)):
        _identity(address, anonymous)
    with pytest.raises((CommClosedError, OSError)):
        _identity(address.replace("tls://", "tcp://"), None)

    def security(folder: Path) -> Security:
        return Security(require_encryption=True, tls_ca_file=str(ours / "ca.crt"),
                        tls_client_cert=str(folder / "runner.crt"),
                        tls_client_key=str(folder / "runner.key"))

    with pytest.raises((OSError, TimeoutError)):
        Client(address, security=security(other), timeout="5s")
    with Client(address, security=security(ours), timeout="30s") as client:
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3


@pytest.mark.parametrize(("options", "needles"), [
    (lambda o, x: ["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(o / "ca.crt"),
                   "--tls-cert", str(o / "runner.crt"), "--tls-key", str(o / "nope.key")],
     ["--tls-key (compute.tls_key)", "nope.key: cannot read it (No such file or directory)"]),
    (lambda o, x: ["--scheduler", "tls://127.0.0.1:1", *tls_options(o, "runner")[:4],
                   "--tls-key", str(o / "worker.key")],
     ["runner.crt", "worker.key", "the key is not the certificate's"]),
    (lambda o, x: ["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(o / "ca.key"),
                   *tls_options(o, "runner")[2:]],
     ["--tls-ca-file (compute.tls_ca_file)", "ca.key: holds no PEM certificate"]),
    (lambda o, x: ["--scheduler", "tls://127.0.0.1:1", *tls_options(o, "runner")[:4],
                   "--tls-key", str(x)],
     ["encrypted with a passphrase"]),
    (lambda o, x: ["--scheduler", "tls://127.0.0.1:1", "--tls-cert", str(o / "runner.crt")],
     ["--tls-ca-file (compute.tls_ca_file) is not set"]),
    (lambda o, x: ["--scheduler", "tcp://127.0.0.1:1", *tls_options(o, "runner")],
     ["are for a tls:// scheduler", "tcp://127.0.0.1:1 is not one"]),
    (lambda o, x: tls_options(o, "runner"), ["the embedded cluster is not one"]),
])
def test_tls_settings_that_cannot_serve_are_refused_before_torch(
        scene: Path, certs: tuple[Path, Path], tmp_path: Path, options: Any,
        needles: list[str]) -> None:
    """A file that cannot be read or is not what its setting says, a missing setting, and
    files without a tls:// address (the connection would not be encrypted) are usage
    errors of one line, before torch loads or anything connects.

    Teeth: check_tls removed from preflight: six of the seven fail (distributed's own
    errors, without the setting; OpenSSL asking for the passphrase; the runs without a
    tls:// address going on); only --tls-cert alone is still refused, later, by tls_files.
    """
    ours, _ = certs
    encrypted = tmp_path / "encrypted.key"
    done = subprocess.run(["openssl", "pkey", "-in", str(ours / "runner.key"), "-aes256",
                           "-passout", "pass:secret", "-out", str(encrypted)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    started = time.monotonic()
    _refused(cli("run", str(scene), "--out", str(out), *options(ours, encrypted)), *needles)
    assert time.monotonic() - started < QUICK
    assert not out.exists()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_named_pipe_as_a_tls_file_is_refused_at_once(
        scene: Path, certs: tuple[Path, Path], tmp_path: Path, which: int) -> None:
    """A named pipe without a writer as the CA file, the certificate or the key: one line
    saying it is not a regular file, instead of ssl waiting for a writer forever (the
    run is killed after 30 s).

    Teeth: tls._readable() opening with open(path, "rb") again: the run blocks in
    open() and the test fails on subprocess.TimeoutExpired.
    """
    ours, _ = certs
    fifo = tmp_path / "pipe.pem"
    os.mkfifo(fifo)
    options = tls_options(ours, "runner")
    options[2 * which + 1] = str(fifo)
    done = run_cli("run", str(scene), "--out", str(tmp_path / "out"), "--scheduler",
                   "tls://127.0.0.1:1", *options, timeout=30, env={"PYTHONPATH": str(ROOT)})
    setting = ("--tls-ca-file", "--tls-cert", "--tls-key")[which]
    _refused(done, setting, "pipe.pem: not a regular file")


def test_a_workflow_names_the_tls_files_and_validate_checks_them(
        scene: Path, certs: tuple[Path, Path], tmp_path: Path) -> None:
    """compute.tls_* in a workflow file: validate prints them and refuses a missing one.

    Teeth: compute.tls_ca_file removed from config._LAYOUT ("not a known setting"), or
    check_tls removed from preflight (validate prints the configuration): this fails.
    """
    ours, _ = certs
    workflow = tmp_path / "wf.yaml"
    compute = {"scheduler": "tls://127.0.0.1:1", "tls_ca_file": str(ours / "ca.crt"),
               "tls_cert": str(ours / "runner.crt"), "tls_key": str(ours / "runner.key")}
    tree = {"schema": 1, "scenes": [str(scene)], "output": str(tmp_path / "out"),
            "compute": compute}
    workflow.write_text(yaml.safe_dump(tree))
    done = cli("validate", str(workflow))
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["compute"]["tls_cert"] == compute["tls_cert"]
    compute["tls_ca_file"] = str(tmp_path / "missing.crt")
    workflow.write_text(yaml.safe_dump(tree))
    _refused(cli("validate", str(workflow)), "missing.crt: cannot read it")
