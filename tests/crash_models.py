"""A model factory that kills its own process on a marker value, for the worker-loss tests.

Importable as ``tests.crash_models`` so a spec can name ``tests.crash_models:poisoned``
(the processes that load it need the project root on ``PYTHONPATH``).

:func:`poisoned` wraps a tiny real network (``unet_small``). Its forward pass ends
the process with ``os._exit(1)`` when the normalised input holds a value above
:data:`THRESHOLD`: no real scene gets there (a uint8 band normalised by the test
spec stays below 3), a patch of 60000 in a uint16 scene does. So only the task
whose window holds the patch kills its worker, every time it is tried. Each
crash appends a line (the pid) to the file named by :data:`LOG_ENV`, if set, so a
test can count the attempts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from pipeline.models import unet_small

#: A normalised input value above this marks the poisoned window.
THRESHOLD = 100.0
#: Environment variable naming the file each crash appends its pid to.
LOG_ENV = "FCN_TEST_POISON_LOG"


class Poisoned(nn.Module):
    """``net`` unchanged, except that a marked window ends the process."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tracing (receptive-field analysis) and meta tensors (shape checks) carry no values.
        if (not isinstance(x, torch.fx.Proxy) and x.device.type != "meta"
                and bool((x.abs() > THRESHOLD).any())):
            log = os.environ.get(LOG_ENV)
            if log:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
            os._exit(1)
        return self.net(x)


def poisoned(**kwargs: Any) -> nn.Module:
    """``unet_small(**kwargs)`` behind the poison check."""
    return Poisoned(unet_small(**kwargs))


#: Environment variables of :func:`slow`: seconds each forward pass on data sleeps, and a
#: file each pass appends ``start PID`` and ``end PID`` lines to.
SLOW_SECONDS_ENV = "FCN_TEST_SLOW_SECONDS"
SLOW_LOG_ENV = "FCN_TEST_SLOW_LOG"


class Slow(nn.Module):
    """``net`` unchanged, but every forward pass on data first sleeps
    ``$FCN_TEST_SLOW_SECONDS`` (0 when unset): a task that is still running when its run
    is interrupted, for the tests of what such a task may still write."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy) and x.device.type != "meta":
            log = os.environ.get(SLOW_LOG_ENV)
            if log:
                with open(log, "a") as f:
                    f.write(f"start {os.getpid()}\n")
            time.sleep(float(os.environ.get(SLOW_SECONDS_ENV, "0")))
            if log:
                with open(log, "a") as f:
                    f.write(f"end {os.getpid()}\n")
        return self.net(x)


def slow(**kwargs: Any) -> nn.Module:
    """``unet_small(**kwargs)`` behind the sleep."""
    return Slow(unet_small(**kwargs))
