"""Shared fixtures: the reference data folder and helpers to run the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A reference raster from ../shared/data; the test skips when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference data {name} not available (../shared/data)")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fcn-pipeline ARGS`` in a real subprocess and return its result."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FCN_PIPELINE_", "DASK_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """Small convolutions on two shared cores: threads cost far more than they give."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def procs():  # type: ignore[no-untyped-def]
    """Processes started in their own groups, all killed when the test ends."""
    from tests.support import Processes

    started = Processes()
    yield started
    started.close()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Two generated scenes and one clean run of them: what interrupted, damaged or
    resumed runs must reproduce byte for byte (:class:`tests.support.Reference`)."""
    from tests.support import make_reference

    base = tmp_path_factory.mktemp("reference")
    return make_reference(base / "scenes", base / "out")
