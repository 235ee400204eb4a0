"""Mutual TLS for the cluster: Dask `Security` objects from a certificate directory.

The directory is what `sectors cluster certs` makes (see `certs.py`). Dask checks the peer's
certificate against the CA on both ends of every connection (scheduler, workers, clients)
and does not check host names, so a certificate names a machine, not an address.

`check_address` is the rule for plain connections: unencrypted `tcp://` only on loopback,
unless the operator says `insecure`, and then with a warning to print.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .certs import CA_CERT, ENGINE, CertError, check_key, check_name, check_signed, load_cert

if TYPE_CHECKING:
    from distributed import Security

#: Schemes whose traffic is encrypted and authenticated by Dask's TLS.
_SECURE = {"tls", "wss"}
#: Schemes that carry the cluster's traffic (code, results) in the clear.
_PLAIN = {"tcp", "ws"}


class AddressError(ValueError):
    """A cluster address that the address rule refuses (the message is one line)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The CA and one machine's certificate and key, checked to belong together."""

    ca: Path
    cert: Path
    key: Path


def tls_files(directory: Path, name: str) -> TlsFiles:
    """The files for machine `name` in `directory`; CertError if missing or not CA-signed."""
    check_name(name)
    if not directory.is_dir():
        raise CertError(f"no certificate directory {directory} (run `sectors cluster certs`)")
    files = TlsFiles(directory / CA_CERT, directory / f"{name}.pem", directory / f"{name}.key")
    for path in (files.ca, files.cert, files.key):
        if not path.is_file():
            raise CertError(
                f"{path} is missing (`sectors cluster certs {directory} --worker {name}`)"
            )
    # Only ca.pem: a worker machine rightly holds no ca.key.
    check_signed(files.cert, load_cert(files.ca))
    check_key(files.cert, files.key)
    return files


def engine_security(directory: Path, name: str = ENGINE) -> Security:
    """Mutual TLS for the engine: its embedded scheduler and its client present `name`."""
    from distributed import Security

    f = tls_files(directory, name)
    return Security(  # type: ignore[no-untyped-call]  # distributed leaves it unannotated
        tls_ca_file=str(f.ca),
        tls_scheduler_cert=str(f.cert),
        tls_scheduler_key=str(f.key),
        tls_client_cert=str(f.cert),
        tls_client_key=str(f.key),
        require_encryption=True,
    )


def worker_security(directory: Path, name: str) -> Security:
    """Mutual TLS for the worker machine `name` (its worker, nanny and in-task clients)."""
    from distributed import Security

    f = tls_files(directory, name)
    return Security(  # type: ignore[no-untyped-call]  # distributed leaves it unannotated
        tls_ca_file=str(f.ca),
        tls_worker_cert=str(f.cert),
        tls_worker_key=str(f.key),
        # A task that calls get_client() dials the scheduler as a client.
        tls_client_cert=str(f.cert),
        tls_client_key=str(f.key),
        require_encryption=True,
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: its address is not known here


def check_address(address: str, *, insecure: bool = False) -> str | None:
    """Apply the address rule: None if fine, a warning if allowed by `insecure`, else raise."""
    scheme, sep, _ = address.partition("://")
    if not sep:
        scheme = "tcp"  # Dask's default for a bare host:port
        address = f"tcp://{address}"
    scheme = scheme.lower()
    if scheme == "inproc":  # in-process queues: no network at all
        return None
    if scheme not in _SECURE | _PLAIN:
        raise AddressError(f"unsupported scheme in {address!r}: use tls://HOST:PORT")
    try:
        parts = urlsplit(address)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError as e:
        raise AddressError(f"bad address {address!r}: {e}") from None
    if scheme in _SECURE or (host and _is_loopback(host)):
        return None
    where = host or "every interface"
    if not insecure:
        raise AddressError(
            f"{address} is unencrypted on {where}: use tls:// with cluster certificates, "
            "or pass --insecure"
        )
    return (
        f"{address} is unencrypted and unauthenticated on {where}: anyone who can reach it "
        "can run code on every worker"
    )
