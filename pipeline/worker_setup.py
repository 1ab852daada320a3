"""Dask worker preload of the embedded cluster: workers leave Ctrl-C to the run.

A terminal sends SIGINT to every process of its foreground group, the embedded
cluster's worker processes included. The run itself stops them (cancelling their
tasks, recording the scenes as interrupted); a worker that also reacted on its own
would print a traceback and die mid-write. So its worker processes ignore SIGINT.
"""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by Dask in the worker process's main thread when the worker starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
