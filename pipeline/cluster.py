"""Where the Dask work runs: an embedded LocalCluster or a scheduler address."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import dask.config
import yaml
from distributed import Client, LocalCluster
from distributed.comm import CommClosedError, registry
from distributed.comm import connect as comm_connect
from distributed.comm.addressing import parse_address
from distributed.security import Security

from pipeline.config import cpu_workers
from pipeline.errors import ConfigError
from pipeline.tls import CA_SETTING, CERT_SETTING, TlsFiles, is_tls
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
    #: The interface the embedded cluster's scheduler, dashboard, nannies and workers
    #: bind to: the loopback unless widened (``compute.listen``).
    listen: str = "127.0.0.1"
    #: The files this client shows a ``tls://`` scheduler (checked by ``pipeline.tls``).
    tls: TlsFiles | None = None

    def address(self) -> str | None:
        """The scheduler address from the spec, else ``DASK_SCHEDULER_ADDRESS``."""
        return self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None

    def security(self) -> Security:
        """distributed's client security: mutual TLS with :attr:`tls` (encryption
        required), else Dask's configuration."""
        if self.tls is None:
            return Security()
        return Security(require_encryption=True, tls_ca_file=self.tls.ca_file,
                        tls_client_cert=self.tls.cert, tls_client_key=self.tls.key)


def default_workers(threads_per_worker: int, gpu: bool) -> int:
    """One worker per GPU, or enough single-purpose workers to fill the CPU cores."""
    if gpu:
        import torch  # only to count devices; the cluster itself does not need torch

        return max(1, torch.cuda.device_count())
    return cpu_workers(threads_per_worker)


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


#: Dask settings of the embedded cluster's scheduler. Its dashboard serves plain HTTP
#: without authentication, so it keeps only distributed's read-only routes (pages, JSON,
#: Prometheus metrics, health, static files): not ``distributed.http.proxy``, which
#: (with jupyter-server-proxy installed) relays requests to any host and port, nor the
#: ``distributed.http.scheduler.api`` routes that retire workers.
EMBEDDED_SETTINGS: dict[str, Any] = {
    "distributed.scheduler.http.routes": [
        "distributed.http.scheduler.prometheus",
        "distributed.http.scheduler.info",
        "distributed.http.scheduler.json",
        "distributed.http.health",
        "distributed.http.statics",
    ],
}


#: Seconds to open a connection to a Dask scheduler: distributed retries a refused or
#: failed attempt, with backoff, until then (its own default is 30 s).
CONNECT_TIMEOUT = 10.0
#: Seconds more for an opened connection to answer as a Dask scheduler: distributed
#: waits for the handshake's answer without a limit, and an HTTP server never sends one.
ANSWER_TIMEOUT = 5.0
#: A well-formed scheduler address, for error messages.
_EXAMPLE = "tcp://10.0.0.5:8786"
#: The Dask servers that are not a scheduler, by the type their identity reports.
_NOT_SCHEDULERS = {"Worker": "worker", "Nanny": "worker's nanny"}


def check_address(address: str) -> None:
    """Check that ``address`` has a form distributed can connect to, before connecting.

    The form is ``SCHEME://HOST:PORT``, or ``HOST:PORT`` for tcp, with a scheme
    distributed has a comm backend for (tcp, tls, ws, wss, ...); an
    ``inproc://`` address names a server in this process and has no port.

    Raises:
        ConfigError: The address holds spaces or control characters, its scheme is
            not one distributed connects with (http:// is the dashboard's), or it
            lacks a host or a port, or its port is not a number from 1 to 65535.
    """
    if not address.isprintable() or any(c.isspace() for c in address):
        raise ConfigError(
            f"Dask scheduler address {address!r} contains spaces or control characters; "
            f"give one such as {_EXAMPLE}"
        )
    scheme, location = parse_address(address)
    try:
        registry.get_backend(scheme)
    except ValueError:
        known = ", ".join(f"{name}://" for name in sorted(registry.backends))
        dashboard = (" (an http:// address is the dashboard's, not the scheduler's)"
                     if scheme in ("http", "https") else "")
        raise ConfigError(
            f"Dask scheduler address {address!r} has the scheme {scheme!r}, which Dask does "
            f"not connect with{dashboard}; give the scheduler's address with one of {known}, "
            f"such as {_EXAMPLE}"
        ) from None
    problem = None if scheme == "inproc" else _host_port_problem(location)
    if problem:
        raise ConfigError(
            f"Dask scheduler address {address!r} is not SCHEME://HOST:PORT ({problem}); "
            f"give one such as {_EXAMPLE}"
        )


def _host_port_problem(location: str) -> str | None:
    """What is wrong with ``location`` as ``HOST:PORT`` (``[IPV6]:PORT``), if anything."""
    if location.startswith("["):
        host, bracket, tail = location[1:].partition("]")
        if not bracket:
            return "the IPv6 host has no closing bracket, as in [::1]:8786"
        if not tail.startswith(":"):
            return "no port" if not tail else f"{tail!r} follows the IPv6 host instead of :PORT"
        port = tail[1:]
    else:
        host, colon, port = location.rpartition(":")
        if not colon:
            return "no port"
        if ":" in host:
            return "more than one colon: an IPv6 host needs brackets, as in tcp://[::1]:8786"
    if not host:
        return "no host"
    if not port.isascii() or not port.isdigit():
        return f"the port {port!r} is not a number" if port else "no port"
    if not 1 <= int(port) <= 65535:
        return f"the port {int(port)} is not from 1 to 65535"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    chain = [exc]
    while True:
        inner = chain[-1].__cause__ or chain[-1].__context__
        if inner is None or inner in chain:
            return chain
        chain.append(inner)


def _cause(exc: BaseException) -> str:
    """The innermost cause of ``exc`` that says something, on one line."""
    for error in reversed(_chain(exc)):
        text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        lines = text.strip().splitlines()
        if lines:
            return lines[0]
    return type(exc).__name__


def _system_cause(exc: BaseException) -> str | None:
    """The operating system's reason behind ``exc`` (``Connection refused``), if any.

    distributed's connection timeout keeps only its last attempt's error, which
    is often its own timeout rather than the refusal before it: then ``None``.
    """
    for error in reversed(_chain(exc)):
        if isinstance(error, OSError) and error.strerror:
            return str(error.strerror)
    return None


def _identity(address: str, security: Security) -> object:
    """What the server at ``address`` says it is, asked the way distributed's rpc asks
    (with ``security``'s client TLS context for a ``tls://`` address).

    Bounded: distributed retries the connection for :data:`CONNECT_TIMEOUT`, then
    waits for the handshake's answer without a limit; the whole exchange gets
    :data:`ANSWER_TIMEOUT` more. It runs on an event loop of its own, in a thread
    of its own (the caller may be running a loop), which is left behind if even
    the loop's shutdown hangs (a name lookup that never returns).
    """
    args = security.get_connection_args("client")  # what Client uses

    async def ask() -> object:
        comm = await comm_connect(address, timeout=CONNECT_TIMEOUT, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> object:
        return await asyncio.wait_for(ask(), CONNECT_TIMEOUT + ANSWER_TIMEOUT)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fcn-scheduler-probe")
    try:
        future = pool.submit(asyncio.run, bounded())
        try:
            return future.result(timeout=CONNECT_TIMEOUT + 2 * ANSWER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise asyncio.TimeoutError() from None
    finally:
        pool.shutdown(wait=False)


def _ask(address: str, security: Security) -> object:
    """:func:`_identity`; with a ``tls://`` address, a TLS error or a connection closed
    by the server (how a scheduler refuses a certificate it does not trust, often before
    the TLS alert arrives) is a ConfigError that names the certificate settings."""
    try:
        return _identity(address, security)
    except Exception as exc:
        tls = next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)
        if not is_tls(address) or (tls is None and not isinstance(exc, CommClosedError)):
            raise
        cause = (tls.reason or type(tls).__name__) if tls is not None else _cause(exc)
        raise ConfigError(
            f"the TLS handshake with the Dask scheduler at {address} failed ({cause}): check "
            f"that {CA_SETTING} is the CA that signed the scheduler's certificate and that "
            f"the scheduler trusts the CA that signed {CERT_SETTING}") from exc


def check_scheduler(address: str, security: Security | None = None) -> None:
    """Check that a Dask scheduler answers at ``address``, in bounded time.

    distributed's own connection, given a server that is not a Dask scheduler
    (an HTTP server, say), waits for its answer forever or reads its bytes as
    a message of exabytes; this asks the server's identity within
    :data:`CONNECT_TIMEOUT` plus :data:`ANSWER_TIMEOUT` seconds instead, with
    ``security`` (default: Dask's configuration) as :class:`Client` would.

    Raises:
        ConfigError: The address is malformed (:func:`check_address`), nothing
            accepts a connection there within :data:`CONNECT_TIMEOUT` (nothing
            listens, the host is unknown or unreachable), the TLS handshake fails
            (the scheduler's certificate is not signed by our CA, or ours not by
            the one it trusts), or what answers is not a Dask scheduler (it
            closes the connection, answers something else, nothing, or is a Dask
            worker).
    """
    check_address(address)
    scheduler_port = "the scheduler's address (usually port 8786, not the dashboard's 8787)"
    try:
        reply = _ask(address, security or Security())
    except ConfigError:
        raise
    except asyncio.TimeoutError:  # before OSError: from Python 3.11 it is one
        raise ConfigError(
            f"{address} did not answer as a Dask scheduler within "
            f"{CONNECT_TIMEOUT + ANSWER_TIMEOUT:g} s; check that it is {scheduler_port}"
        ) from None
    except CommClosedError as exc:
        raise ConfigError(
            f"{address} closed the connection without answering as a Dask scheduler "
            f"({_cause(exc)}); check that it is {scheduler_port}"
            + ("" if is_tls(address) else
               f", and whether the scheduler asks for TLS (then tls:// and {CA_SETTING}, ...)")
        ) from exc
    except OSError as exc:
        reason = _system_cause(exc)
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address}: no connection within "
            f"{CONNECT_TIMEOUT:g} s{f' ({reason})' if reason else ''}; check the address "
            "and that the scheduler is running"
        ) from exc
    except Exception as exc:  # whatever it sent (MemoryError: bytes read as a size), not one
        raise ConfigError(
            f"{address} does not answer as a Dask scheduler ("
            f"{type(exc).__name__}: {_cause(exc)}); check that it is {scheduler_port}"
        ) from exc
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind in _NOT_SCHEDULERS:
        assert isinstance(reply, dict)
        own = reply.get("scheduler")
        fix = (f"give its scheduler's address, {own}" if isinstance(own, str)
               else f"give {scheduler_port}")
        raise ConfigError(
            f"{address} is a Dask {_NOT_SCHEDULERS[kind]}, not the scheduler; {fix}"
        )
    if not isinstance(kind, str):
        raise ConfigError(
            f"{address} answered, but not as a Dask scheduler; check that it is {scheduler_port}"
        )


@contextmanager
def connect(spec: ClusterSpec) -> Iterator[Client]:
    """A Dask client for the run, closed (and any embedded cluster shut down) on exit.

    With a scheduler address (:meth:`ClusterSpec.address`), the address is
    checked and the scheduler asked who it is first (:func:`check_scheduler`),
    so that a wrong address fails in bounded time, in one line; with TLS files
    (:attr:`ClusterSpec.tls`) both connections are mutual TLS, encryption
    required. Without an address, an embedded cluster bound to
    :attr:`ClusterSpec.listen`, its comms mutual TLS with credentials made for
    this call (a client without them is refused), its dashboard's HTTP routes
    read-only (:data:`EMBEDDED_SETTINGS`).

    Raises:
        ConfigError: The scheduler address is malformed, unreachable, not a
            Dask scheduler's, or the TLS handshake with it fails; the message
            names the address and the cause.
    """
    # The client's own warnings (a lost worker, a task retried) are the run's to report,
    # once, as its own lines: distributed's loggers print only errors to the terminal.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    address = spec.address()
    if address:
        security = spec.security()
        check_scheduler(address, security)
        try:
            client = Client(address, security=security, timeout=f"{CONNECT_TIMEOUT}s")
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConfigError(
                f"cannot connect to the Dask scheduler at {address} ({_cause(exc)}); check "
                "the address and that the scheduler is running"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    workers = spec.workers or default_workers(spec.threads_per_worker, spec.gpu)
    # Anyone who reaches a Dask scheduler runs code in its workers, and the loopback is
    # every local user's: the scheduler, nannies and workers talk mutual TLS with
    # credentials made for this run and held in memory only (the workers get them with
    # their start-up arguments), so a client without them is refused.
    security = Security.temporary()
    with dask.config.set({**worker_config(), **EMBEDDED_SETTINGS}):  # read as they start
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            security=security,
            # Scheduler, nannies and workers, and the dashboard (plain HTTP, its routes
            # read-only: EMBEDDED_SETTINGS) on the loopback unless widened. A free port
            # for the dashboard, so concurrent runs on one machine never fight over 8787.
            host=spec.listen,
            dashboard_address=f"{spec.listen}:0",
            resources={GPU_RESOURCE: 1} if spec.gpu else None,
            silence_logs=logging.CRITICAL,  # a failed tile is reported once, by the run
            preload=["pipeline.worker_setup"],  # Ctrl-C is the run's to handle
            env={WORKER_LOG_ENV: spec.worker_log} if spec.worker_log else None,
        )
    try:
        with Client(cluster, security=security) as client:
            yield client
    finally:
        cluster.close()
