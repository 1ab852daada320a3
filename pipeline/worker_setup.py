"""Dask worker preload of the embedded cluster: workers leave the terminal to the run.

A terminal sends SIGINT to every process of its foreground group, the embedded
cluster's worker processes included. The run itself stops them (cancelling their
tasks, recording the scenes as interrupted); a worker that also reacted on its own
would print a traceback and die mid-write. So its worker processes ignore SIGINT.

C libraries print to the process's stderr directly (libtiff: "_tiffWriteProc: No space
left on device."); the run reports each failure once, in one line. So when
``$FCN_WORKER_LOG`` names a file, the worker's stdout and stderr go there.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

#: The environment variable naming the file for the workers' stdout and stderr.
WORKER_LOG_ENV = "FCN_WORKER_LOG"


def dask_setup(worker: Any) -> None:
    """Called by Dask in the worker process's main thread when the worker starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = os.environ.get(WORKER_LOG_ENV)
    if not log:
        return
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # the terminal then, rather than no worker at all
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
