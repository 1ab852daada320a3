"""SIGINT and SIGTERM as an exception the run can clean up after.

Kubernetes stops a pod with SIGTERM (then SIGKILL after the grace period), a
terminal with SIGINT. Both must stop a run cleanly: tasks cancelled, scenes
recorded as ``interrupted``, the output directory's lock released, one line
printed, exit status ``128 + signal`` (130, 143). Python's defaults give none of
that: SIGTERM kills the process outright, and as PID 1 of a container (the
image's entrypoint) the kernel ignores a signal that has no handler at all.

:func:`stop_on_signals` installs explicit handlers that raise :class:`Interrupted`
in the main thread; :func:`deferred` holds a signal back while a short critical
step (writing the manifest, releasing the lock) finishes, then raises it.
Pure: standard library only.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: The signals a run stops on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was asked to stop by ``signum`` (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` in a library swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143)."""
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.deferring = 0
        self.pending: int | None = None
        self.received: int | None = None


_STATE = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _STATE.received is not None:
        return  # already stopping: a second Ctrl-C must not abort the clean-up
    _STATE.received = signum
    if _STATE.deferring:
        _STATE.pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (once; later signals
    are ignored while the run cleans up). Handlers are restored on exit. Outside the
    main thread (where Python allows no handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _STATE.received = _STATE.pending = None
    _STATE.deferring = 0
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> int | None:
    """The stop signal received so far in :func:`stop_on_signals`, if any."""
    return _STATE.received


def check_signals() -> None:
    """Raise :class:`Interrupted` for a stop signal that was received but whose exception
    never arrived: a handler's exception raised while a C library runs a Python callback
    (rasterio's error hook during a blocked open) is swallowed there. Call it after such
    calls; outside :func:`deferred`, a received signal otherwise always raises at once."""
    if _STATE.received is not None and not _STATE.deferring:
        raise Interrupted(_STATE.received)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal back until the block ends, then raise it (a short critical step
    such as writing the manifest must not be cut in half)."""
    _STATE.deferring += 1
    try:
        yield
    finally:
        _STATE.deferring -= 1
        if not _STATE.deferring and _STATE.pending is not None:
            signum, _STATE.pending = _STATE.pending, None
            raise Interrupted(signum)
