"""The cluster's certificates: one CA and one key and certificate per machine.

Dask's TLS is mutual (both ends present a certificate and check it against the CA), so a
machine joins the cluster exactly when it holds a key whose certificate the cluster CA
signed. There are no roles: any such key can run code on every worker, so the CA key is the
cluster's master key (keep it off the sealing machines once their certificates are made).

`make_certs` creates the CA on its first run and one certificate per new machine name on
every run; it never replaces a file that exists, so re-running it with more names adds them
under the same CA. Everything is checked before anything is written, so bad input creates
nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
#: The certificate the engine (its embedded scheduler and its client) presents.
ENGINE = "engine"
#: Days a leaf certificate is valid unless told otherwise.
DEFAULT_DAYS = 365
#: A new CA outlives the certificates it signs by default, so re-runs can keep adding machines.
CA_DAYS = 3650
MAX_DAYS = 36500
#: Allowance for clocks that disagree between machines.
_SKEW = dt.timedelta(minutes=5)
#: A machine name is also a file name and a certificate CN: keep it to a DNS-like label.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_RESERVED = {"ca"}


class CertError(ValueError):
    """Bad input or an inconsistent certificate directory (the message is one line)."""


@dataclass(frozen=True, slots=True)
class CertReport:
    """What one `make_certs` run did: files it created and machines it kept as they were."""

    directory: Path
    ca_created: bool
    created: tuple[str, ...]
    kept: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        """One line per fact, for the CLI."""
        out = [
            f"created CA {self.directory / CA_CERT} and {CA_KEY} (mode 0600)"
            if self.ca_created
            else f"kept the existing CA {self.directory / CA_CERT} (never overwritten)"
        ]
        out += [f"created {name}.pem and {name}.key (mode 0600)" for name in self.created]
        out += [f"kept {name}.pem and {name}.key (already there)" for name in self.kept]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def check_name(name: str) -> str:
    """Return `name` if it can name a machine's certificate, else raise CertError."""
    if not _NAME.fullmatch(name) or name.endswith("."):
        raise CertError(
            f"bad machine name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name.lower() in _RESERVED:
        raise CertError(f"bad machine name {name!r}: {name}.pem would be the CA's file")
    return name


def _names(engine: str, workers: Iterable[str]) -> list[str]:
    names: list[str] = []
    for name in (engine, *workers):
        check_name(name)
        if name not in names:
            names.append(name)
    return names


def _directory(directory: Path) -> Path:
    if directory.exists() and not directory.is_dir():
        raise CertError(f"{directory} exists and is not a directory")
    if not directory.exists() and not directory.parent.is_dir():
        raise CertError(f"{directory.parent} does not exist (create it first)")
    return directory


def _pair(directory: Path, cert: str, key: str) -> bool:
    """Whether the pair exists; a half pair is an error (its other half is not guessed)."""
    has_cert, has_key = (directory / cert).exists(), (directory / key).exists()
    if has_cert != has_key:
        there, missing = (cert, key) if has_cert else (key, cert)
        raise CertError(
            f"{directory} has {there} but no {missing}: restore it or remove {there} to reissue"
        )
    return has_cert


def load_cert(path: Path) -> x509.Certificate:
    """The PEM certificate at `path` (CertError if it cannot be read)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(f"cannot read the certificate {path}: {e}") from None


def load_ca(directory: Path) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    """The CA certificate and key kept in `directory` (CertError if missing or mismatched)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

    cert = load_cert(directory / CA_CERT)
    try:
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise CertError(f"cannot read the CA key {directory / CA_KEY}: {e}") from None
    if not isinstance(key, EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
    return cert, key


def check_signed(cert_path: Path, ca: x509.Certificate) -> None:
    """Raise CertError unless the certificate at `cert_path` was signed by `ca`."""
    cert = load_cert(cert_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise CertError(f"{cert_path} is not signed by this directory's {CA_CERT}: {e}") from None
    except Exception as e:  # cryptography's InvalidSignature is a bare Exception subclass
        raise CertError(f"{cert_path} is not signed by this directory's {CA_CERT}") from e


def check_key(cert_path: Path, key_path: Path) -> None:
    """Raise CertError unless `key_path` holds the private key of the certificate."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise CertError(f"cannot read the key {key_path}: {e}") from None
    if key.public_key() != load_cert(cert_path).public_key():
        raise CertError(f"{key_path} is not the key of {cert_path}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    # P-256: fast to make and to handshake, and every OpenSSL build accepts it in TLS 1.2+.
    return ec.generate_private_key(ec.SECP256R1())


def _name_attr(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sectorfsm cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_ca(days: int) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    now = _now()
    name = _name_attr("sectorfsm cluster CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=max(days, CA_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_leaf(
    name: str, ca: x509.Certificate, ca_key: EllipticCurvePrivateKey, not_after: dt.datetime
) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name_attr(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Every Dask process both listens and dials, so each certificate serves both ends.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a file that appeared since the checks is never overwritten, and a key is
    # 0600 from its first byte (no window in which another user could read it).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed a certificate's 0644


def make_certs(
    directory: Path,
    workers: Sequence[str],
    *,
    engine: str = ENGINE,
    days: int = DEFAULT_DAYS,
) -> CertReport:
    """Create the CA if `directory` has none, and a key and certificate per new name."""
    if not workers:
        raise CertError("name at least one worker (--worker NAME)")
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days must be between 1 and {MAX_DAYS}, not {days}")
    directory = _directory(directory)
    names = _names(engine, workers)
    warnings: list[str] = []
    has_ca = directory.is_dir() and _pair(directory, CA_CERT, CA_KEY)
    existing = [n for n in names if directory.is_dir() and _pair(directory, f"{n}.pem", f"{n}.key")]
    not_after = _now() + dt.timedelta(days=days)
    if has_ca:
        ca, ca_key = load_ca(directory)
        for name in existing:
            check_signed(directory / f"{name}.pem", ca)
        if not_after > ca.not_valid_after_utc:
            raise CertError(
                f"--days {days} outlives the CA (valid until {ca.not_valid_after_utc:%Y-%m-%d})"
            )
        if (directory / CA_KEY).stat().st_mode & 0o077:
            warnings.append(f"{directory / CA_KEY} is readable by others: chmod 600 it")
    elif existing:
        raise CertError(
            f"{directory} has {existing[0]}.pem but no CA: its certificates cannot be extended"
        )
    else:
        ca, ca_key = _new_ca(days)
    new = [n for n in names if n not in existing]
    files = [] if has_ca else [(CA_CERT, _pem(ca), 0o644), (CA_KEY, _key_pem(ca_key), 0o600)]
    for name in new:
        cert, key = _new_leaf(name, ca, ca_key, not_after)
        files += [(f"{name}.pem", _pem(cert), 0o644), (f"{name}.key", _key_pem(key), 0o600)]
    created: list[Path] = []
    made_dir = not directory.exists()
    try:
        if made_dir:
            directory.mkdir(mode=0o700)
        for file_name, data, mode in files:
            _write_new(directory / file_name, data, mode)
            created.append(directory / file_name)
    except OSError as e:
        # Undo this run's files, so a failed run leaves the directory as it found it.
        for path in created:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise CertError(f"cannot write in {directory}: {e.strerror or e}") from None
    return CertReport(directory, not has_ca, tuple(new), tuple(existing), tuple(warnings))
