"""The embedded cluster: its workers get the packaged Dask settings."""

from __future__ import annotations

import os

import dask.config

from pipeline.cluster import ClusterSpec, connect, worker_config


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
