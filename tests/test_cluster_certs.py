"""`sectors cluster certs` and the address rule: files, modes, re-runs and every bad input."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.sealing.backends.dask.certs import CA_DAYS, CertError, make_certs
from sectorfsm.sealing.backends.dask.security import (
    AddressError,
    check_address,
    engine_security,
    tls_files,
    worker_security,
)


def certs(*args: str) -> tuple[int, str]:
    """Run `sectors cluster certs ARGS`; returns (exit code, output)."""
    result = CliRunner().invoke(app, ["cluster", "certs", *args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: bad input must exit cleanly
    return result.exit_code, result.output


def cert(path: Path) -> x509.Certificate:
    """The certificate at `path`."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in `directory` with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_makes_a_ca_and_one_signed_pair_per_machine(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    code, out = certs(str(d), "--worker", "pc1-box", "--worker", "c2-box", "--days", "30")
    assert code == 0, out
    assert set(snapshot(d)) == {
        f"{n}.{ext}" for n in ("ca", "engine", "pc1-box", "c2-box") for ext in ("pem", "key")
    }
    assert "created CA" in out and "created pc1-box.pem and pc1-box.key" in out
    ca = cert(d / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("engine", "pc1-box", "c2-box"):
        leaf = cert(d / f"{name}.pem")
        leaf.verify_directly_issued_by(ca)
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        days = (leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
        assert 29 <= days <= 30
        assert mode(d / f"{name}.key") == 0o600
        assert mode(d / f"{name}.pem") == 0o644
    assert mode(d / "ca.key") == 0o600
    assert mode(d) == 0o700
    # Each file set is what the Security builders accept.
    assert tls_files(d, "pc1-box").cert == d / "pc1-box.pem"
    assert engine_security(d).require_encryption
    assert worker_security(d, "c2-box").tls_worker_cert == str(d / "c2-box.pem")


def test_rerun_adds_new_names_under_the_same_ca_and_overwrites_nothing(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    assert certs(str(d), "--worker", "w1")[0] == 0
    before = snapshot(d)
    code, out = certs(str(d), "--worker", "w1", "--worker", "w2", "--engine", "engine")
    assert code == 0, out
    assert "kept the existing CA" in out
    assert "kept w1.pem and w1.key (already there)" in out
    assert "created w2.pem and w2.key" in out
    after = snapshot(d)
    assert {k: after[k] for k in before} == before  # not one byte of the old files changed
    assert set(after) - set(before) == {"w2.pem", "w2.key"}
    cert(d / "w2.pem").verify_directly_issued_by(cert(d / "ca.pem"))
    # A second engine name is just another machine under the same CA.
    assert certs(str(d), "--worker", "w1", "--engine", "engine-2")[0] == 0
    cert(d / "engine-2.pem").verify_directly_issued_by(cert(d / "ca.pem"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--worker", "w1", "--worker", "bad/name"], "bad machine name 'bad/name'"),
        (["--worker", "w1", "--worker", ""], "bad machine name ''"),
        (["--worker", "-rf"], "bad machine name '-rf'"),
        (["--worker", "ca"], "ca.pem would be the CA's file"),
        (["--worker", "w1", "--engine", "a b"], "bad machine name 'a b'"),
        (["--worker", "w1", "--days", "0"], "--days must be between 1 and"),
        ([], "name at least one worker (--worker NAME)"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    d = tmp_path / "certs"
    code, out = certs(str(d), *args)
    assert code == 1
    assert out.strip() == f"error: {out.strip().removeprefix('error: ')}"
    assert message in out and len(out.strip().splitlines()) == 1, out
    assert not d.exists()


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    code, out = certs(str(tmp_path / "missing" / "certs"), "--worker", "w1")
    assert (code, out.count("\n")) == (1, 1) and "does not exist (create it first)" in out
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    code, out = certs(str(tmp_path / "file"), "--worker", "w1")
    assert (code, out.count("\n")) == (1, 1) and "exists and is not a directory" in out
    assert (tmp_path / "file").read_text() == "x"


def test_an_inconsistent_directory_is_refused_untouched(tmp_path: Path) -> None:
    d, other = tmp_path / "certs", tmp_path / "other"
    assert certs(str(d), "--worker", "w1")[0] == 0
    assert certs(str(other), "--worker", "w2")[0] == 0

    def refused(directory: Path, message: str, *args: str) -> None:
        before = snapshot(directory)
        code, out = certs(str(directory), "--worker", "w1", "--worker", "w9", *args)
        assert code == 1 and message in out and out.count("\n") == 1, out
        assert snapshot(directory) == before

    # A certificate another CA signed is never "kept" as if it were ours.
    shutil.copy(other / "w2.pem", d / "w2.pem")
    shutil.copy(other / "w2.key", d / "w2.key")
    refused(d, "w2.pem is not signed by this directory's ca.pem", "--worker", "w2")
    (d / "w2.pem").unlink()
    # Half a pair: its other half is not guessed, nor regenerated.
    refused(d, "has w2.key but no w2.pem", "--worker", "w2")
    (d / "w2.key").unlink()
    # The CA's own end date (CA_DAYS days on, which is not always "this year + 10").
    until = cert(d / "ca.pem").not_valid_after_utc
    assert until > dt.datetime.now(dt.UTC) + dt.timedelta(days=CA_DAYS - 1)
    refused(d, f"--days 4000 outlives the CA (valid until {until:%Y-%m-%d})", "--days", "4000")
    (other / "ca.key").unlink()
    refused(other, "has ca.pem but no ca.key")
    (other / "ca.pem").unlink()
    refused(other, "has engine.pem but no CA")
    shutil.copy(d / "w1.key", d / "ca.key.new")
    (d / "ca.key").unlink()
    (d / "ca.key.new").rename(d / "ca.key")
    refused(d, "ca.key is not the key of")


def test_make_certs_reports_what_it_did(tmp_path: Path) -> None:
    report = make_certs(tmp_path / "c", ["w1", "w1", "engine"])
    assert (report.ca_created, report.created, report.kept) == (True, ("engine", "w1"), ())
    (tmp_path / "c" / "ca.key").chmod(0o644)
    report = make_certs(tmp_path / "c", ["w1"], engine="e2")
    assert (report.ca_created, report.created, report.kept) == (False, ("e2",), ("w1",))
    assert report.warnings and "chmod 600" in report.warnings[0]
    make_certs(tmp_path / "other", ["w1"])
    shutil.copy(tmp_path / "other" / "w1.pem", tmp_path / "c" / "w1.pem")
    with pytest.raises(CertError, match="not signed"):
        make_certs(tmp_path / "c", ["w1", "w2"])
    assert not (tmp_path / "c" / "w2.pem").exists()


def test_tls_files_refuses_what_would_fail_in_the_handshake(tmp_path: Path) -> None:
    d, other = tmp_path / "certs", tmp_path / "other"
    make_certs(d, ["w1", "w2"])
    make_certs(other, ["w1"])
    with pytest.raises(CertError, match="no certificate directory"):
        tls_files(tmp_path / "none", "w1")
    with pytest.raises(CertError, match=r"w3\.pem is missing"):
        tls_files(d, "w3")
    with pytest.raises(CertError, match="bad machine name"):
        worker_security(d, "../w1")
    worker = tmp_path / "worker"  # what a worker machine holds: no ca.key
    worker.mkdir()
    for name in ("ca.pem", "w1.pem", "w1.key"):
        shutil.copy(d / name, worker / name)
    assert tls_files(worker, "w1").key == worker / "w1.key"
    shutil.copy(d / "w2.key", worker / "w1.key")
    with pytest.raises(CertError, match=r"w1\.key is not the key of"):
        tls_files(worker, "w1")
    shutil.copy(other / "w1.pem", worker / "w1.pem")
    with pytest.raises(CertError, match=r"not signed by this directory's ca\.pem"):
        tls_files(worker, "w1")


@pytest.mark.parametrize(
    "address",
    [
        "tls://0.0.0.0:8786",
        "tls://seal-01.example:8786",
        "tcp://127.0.0.1:8786",
        "tcp://127.8.0.1:8786",
        "tcp://localhost:8786",
        "tcp://[::1]:8786",
        "127.0.0.1:8786",
        "inproc://10.0.0.1/1/2",
    ],
)
def test_encrypted_or_loopback_addresses_pass(address: str) -> None:
    assert check_address(address) is None
    assert check_address(address, insecure=True) is None


@pytest.mark.parametrize(
    ("address", "where"),
    [
        ("tcp://0.0.0.0:8786", "0.0.0.0"),
        ("tcp://10.0.0.5:8786", "10.0.0.5"),
        ("tcp://seal-01:8786", "seal-01"),
        ("tcp://:8786", "every interface"),
        ("10.0.0.5:8786", "10.0.0.5"),
        ("tcp://[2001:db8::1]:8786", "2001:db8::1"),
    ],
)
def test_plain_tcp_off_loopback_needs_insecure_and_then_warns(address: str, where: str) -> None:
    with pytest.raises(AddressError, match="pass --insecure") as e:
        check_address(address)
    assert "\n" not in str(e.value) and where in str(e.value)
    warning = check_address(address, insecure=True)
    assert warning is not None and "unencrypted" in warning and where in warning


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("udp://127.0.0.1:1", "unsupported scheme"),
        ("tcp://127.0.0.1:port", "bad address"),
        ("tls://10.0.0.1:99999", "bad address"),
    ],
)
def test_malformed_addresses_are_refused(address: str, message: str) -> None:
    for insecure in (False, True):
        with pytest.raises(AddressError, match=message):
            check_address(address, insecure=insecure)
