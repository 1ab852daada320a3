"""Where the Dask work runs: an embedded LocalCluster or a scheduler address."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import dask.config
import yaml
from distributed import Client, LocalCluster

from pipeline.config import usable_cores
from pipeline.errors import ConfigError
from pipeline.worker_setup import WORKER_LOG_ENV

#: The Dask resource that inference tasks ask for on a GPU run.
GPU_RESOURCE = "GPU"


@dataclass(frozen=True)
class ClusterSpec:
    """How to get a Dask client for a run."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    gpu: bool = False
    #: Where the embedded cluster's workers write their stdout and stderr (messages of
    #: C libraries such as libtiff's "No space left on device" among them), instead of
    #: the terminal: the run reports each failure once, in one line. None: inherited.
    worker_log: str | None = None

    def address(self) -> str | None:
        """The scheduler address from the spec, else ``DASK_SCHEDULER_ADDRESS``."""
        return self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def default_workers(threads_per_worker: int, gpu: bool) -> int:
    """One worker per GPU, or enough single-purpose workers to fill the CPU cores."""
    if gpu:
        import torch  # only to count devices; the cluster itself does not need torch

        return max(1, torch.cuda.device_count())
    return max(1, usable_cores() // threads_per_worker)


def worker_config() -> dict[str, Any]:
    """The Dask settings of ``pipeline/data/dask.yaml`` as dotted keys for ``dask.config.set``."""
    path = resources.files("pipeline").joinpath("data").joinpath("dask.yaml")
    text = path.read_text(encoding="utf-8")
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", yaml.safe_load(text))
    return flat


@contextmanager
def connect(spec: ClusterSpec) -> Iterator[Client]:
    """A Dask client for the run, closed (and any embedded cluster shut down) on exit."""
    address = spec.address()
    if address:
        try:
            client = Client(address, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        try:
            yield client
        finally:
            client.close()
        return
    workers = spec.workers or default_workers(spec.threads_per_worker, spec.gpu)
    with dask.config.set(worker_config()):  # read when the nannies are made
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            # A free port for the dashboard (and the scheduler's HTTP routes), so
            # concurrent runs on one machine never fight over 8787.
            dashboard_address=":0",
            resources={GPU_RESOURCE: 1} if spec.gpu else None,
            silence_logs=logging.CRITICAL,  # a failed tile is reported once, by the run
            preload=["pipeline.worker_setup"],  # Ctrl-C is the run's to handle
            env={WORKER_LOG_ENV: spec.worker_log} if spec.worker_log else None,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
