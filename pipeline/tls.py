"""TLS to a Dask scheduler: the certificate files a run shows a ``tls://`` scheduler.

A ``tls://`` scheduler (``dask scheduler --tls-ca-file CA --tls-cert CERT --tls-key
KEY``) accepts only clients whose certificate its CA signed, and the run accepts only a
scheduler whose certificate the run's CA signed (distributed's ``Security``: mutual
TLS, host names not checked, one CA per cluster). :func:`check_tls` checks, with the
standard library alone and before Dask or torch loads, that the address and the files
agree: a ``tls://`` address has its files, the files go with a ``tls://`` address only,
and each file is readable and what its setting says it is.

Pure: the standard library's ``ssl``; imports neither Dask nor torch.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass

from pipeline.errors import ConfigError

#: Each file's setting as users write it: command-line option (configuration key).
CA_SETTING = "--tls-ca-file (compute.tls_ca_file)"
CERT_SETTING = "--tls-cert (compute.tls_cert)"
KEY_SETTING = "--tls-key (compute.tls_key)"


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a run's TLS connection to its scheduler (paths as given).

    Attributes:
        ca_file: The certificate of the CA that signed the scheduler's certificate.
        cert: This client's certificate, signed by the CA the scheduler trusts.
        key: The private key of ``cert``, unencrypted; None when ``cert`` holds it too.
    """

    ca_file: str
    cert: str
    key: str | None = None


def tls_files(ca_file: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    """The files as a :class:`TlsFiles`, or None when no file is given.

    Raises:
        ConfigError: Some files are given but the CA file or the certificate is not.
    """
    if ca_file is None and cert is None and key is None:
        return None
    if ca_file is None or cert is None:
        missing = " and ".join(s for s, v in ((CA_SETTING, ca_file), (CERT_SETTING, cert))
                               if v is None)
        raise ConfigError(f"TLS to a Dask scheduler needs {CA_SETTING} (the CA that signed the "
                          f"scheduler's certificate) and {CERT_SETTING} (this client's); "
                          f"{missing} is not set")
    return TlsFiles(ca_file, cert, key)


def is_tls(address: str) -> bool:
    """Whether ``address`` names a scheduler reached over TLS (``tls://``)."""
    return address.partition("://")[0].lower() == "tls" if "://" in address else False


def check_tls(address: str | None, files: TlsFiles | None) -> None:
    """Check that the scheduler ``address`` (None: an embedded cluster) and the TLS
    ``files`` go together, and that the files make a client TLS context.

    Raises:
        ConfigError: One line naming the setting and the file: a ``tls://`` address
            without files; files without a ``tls://`` address (they would be ignored:
            the connection would not be encrypted); a file that cannot be read, a CA
            file without a PEM certificate, a certificate without its key, a key that
            is not the certificate's or is encrypted with a passphrase.
    """
    if address is not None and is_tls(address):
        if files is None:
            raise ConfigError(
                f"the Dask scheduler {address} asks for TLS: give the CA and this client's "
                f"certificate and key with {CA_SETTING}, {CERT_SETTING} and {KEY_SETTING}")
        client_context(files)
    elif files is not None:
        where = f"the Dask scheduler {address}" if address else "the embedded cluster"
        raise ConfigError(
            f"{CA_SETTING}, {CERT_SETTING} and {KEY_SETTING} are for a tls:// scheduler, but "
            f"{where} is not one: give its address as tls://HOST:PORT, or drop them")


class _Encrypted(Exception):
    """The key asked for a passphrase (OpenSSL would otherwise prompt on the terminal)."""


def _no_passphrase() -> bytes:
    raise _Encrypted()


def _readable(path: str, setting: str) -> None:
    """Refuse a file that cannot be read, or that is not a regular file: ``ssl`` would
    wait forever on a named pipe without a writer."""
    try:
        # O_NONBLOCK: opening a named pipe for reading would wait for a writer
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: cannot read it ({exc.strerror or exc})") from exc
    if not regular:
        raise ConfigError(f"{setting} {path}: not a regular file (a folder, named pipe or "
                          "device); give the PEM file itself")


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client TLS context from ``files``, made as distributed makes it (their errors
    named here, before any connection).

    Raises:
        ConfigError: see :func:`check_tls`.
    """
    for path, setting in ((files.ca_file, CA_SETTING), (files.cert, CERT_SETTING),
                          (files.key, KEY_SETTING)):
        if path is not None:
            _readable(path, setting)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"{CA_SETTING} {files.ca_file}: holds no PEM certificate "
                          f"({exc.reason or exc}); give the CA's certificate") from exc
    pair = f"{CERT_SETTING} {files.cert}" + (f" and {KEY_SETTING} {files.key}" if files.key
                                             else "")
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(f"{pair}: the key is encrypted with a passphrase, which Dask cannot "
                          "give; decrypt it (openssl pkey -in KEY -out PLAIN.key)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = "the key is not the certificate's"
        elif files.key is None:
            problem = f"not a PEM certificate with its key; give the key with {KEY_SETTING}"
        else:
            problem = "not a PEM certificate and its private key"
        raise ConfigError(f"{pair}: {problem}") from exc
    return context
