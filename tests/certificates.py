"""The certificate commands of deploy/README.md, run as written: a CA and a certificate
for each role (scheduler, worker, runner) in a folder, for the TLS tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "deploy" / "README.md"
ROLES = ("scheduler", "worker", "runner")


def readme_block(needle: str) -> str:
    """The one ```sh block of deploy/README.md that contains ``needle``."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    found = [block for block in blocks if needle in block]
    assert len(found) == 1, f"{len(found)} sh blocks of {README} contain {needle!r}"
    return found[0]


def run_block(block: str, folder: Path, prelude: str = "") -> str:
    """Run a shell block in ``folder`` (bash, stopping at the first error); its stdout."""
    done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{prelude}\n{block}"], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{block}\nfailed:\n{done.stderr}"
    return done.stdout


def make_certificates(folder: Path) -> Path:
    """``folder`` with ca.crt, ca.key and ROLE.crt, ROLE.key for each role (skips the
    test where the openssl command is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot run the certificate commands of "
                    "deploy/README.md")
    folder.mkdir(parents=True, exist_ok=True)
    run_block(readme_block("openssl req"), folder)
    for name in ("ca", *ROLES):
        assert (folder / f"{name}.crt").is_file() and (folder / f"{name}.key").is_file(), name
    return folder


def tls_options(folder: Path, role: str) -> list[str]:
    """The ``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` options of ``role``'s
    certificate in ``folder`` (the same names in ``fcn-pipeline run``, ``dask scheduler``
    and ``dask worker``)."""
    return ["--tls-ca-file", str(folder / "ca.crt"), "--tls-cert", str(folder / f"{role}.crt"),
            "--tls-key", str(folder / f"{role}.key")]
