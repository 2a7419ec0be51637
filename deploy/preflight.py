"""``crossprobe preflight``: is a site (or the coordinator) ready to join a federation — its data,
its certificates and keys, the SuperLink over TLS, a writable ``$FLWR_HOME``; one exit code per
failure class."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from deploy.certs import (
    CA_CERT,
    NODE_KEY,
    NODE_PUB,
    RUNTIME_CERT,
    RUNTIME_KEY,
    SECRET,
    SERVER_CERT,
    SERVER_KEY,
)


class Exit:
    """``crossprobe preflight`` exit codes, one per failure class (the first failure decides)."""

    OK = 0
    DATA = 10  # data folder missing, unreadable or not a valid canonical site (load_site)
    CERTS_MISSING = 11  # a certificate/key file is absent or unreadable
    CERTS_MISMATCH = 12  # key ≠ public key/certificate, a certificate not signed by the CA, expired
    UNREACHABLE = 13  # no TCP connection to the SuperLink
    TLS = 14  # TCP works but the TLS handshake fails (untrusted certificate, wrong hostname)
    FLWR_HOME = 15  # $FLWR_HOME cannot be written


@dataclass
class Check:
    name: str
    code: int  # Exit.* on failure
    ok: bool
    detail: str


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{address!r}: expected host:port", param_hint="--superlink")
    return host.strip("[]"), int(port)


def check_tls(host: str, port: int, ca: Path, timeout: float) -> str:
    """A TLS handshake verified with ``ca`` (hostname included); returns the TLS version."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return str(tls.version())


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return path.read_bytes()  # PermissionError (an OSError) when unreadable


def _load(path: Path, data: bytes, what: str, loader):
    """``loader(data)``, or ValueError naming the file: unparseable, or encrypted (a SuperNode or
    TLS key must be readable without a passphrase; Flower cannot ask for one)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return loader(data)
    except (TypeError, UnsupportedAlgorithm):  # "Password was not given but … is encrypted"
        raise ValueError(
            f"{path}: {what} is protected by a passphrase; store it without one"
        ) from None
    except (ValueError, IndexError, AssertionError) as err:
        raise ValueError(f"{path}: not {what} ({type(err).__name__})") from None


def _pem_cert(path: Path, data: bytes):
    from cryptography import x509

    return _load(path, data, "a PEM certificate", x509.load_pem_x509_certificate)


def _pem_key(path: Path, data: bytes):
    from cryptography.hazmat.primitives import serialization

    return _load(
        path, data, "a PEM private key", lambda b: serialization.load_pem_private_key(b, None)
    )


def _check_pair(crt: Path, key: Path, ca_cert) -> str:
    """Certificate signed by the CA, valid now, and matching its private key."""
    cert = _pem_cert(crt, _read(crt))
    k = _pem_key(key, _read(key))
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no message
        raise ValueError(f"{crt}: not signed by the CA ({type(err).__name__})") from None
    _check_valid_now(crt, cert)
    if _pub_bytes(cert.public_key()) != _pub_bytes(k.public_key()):
        raise ValueError(f"{key}: does not match {crt}")
    return f"{crt.name} signed by the CA, matches {key.name}"


def _check_valid_now(path: Path, cert) -> None:
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            f"{path}: not valid now "
            f"(valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc})"
        )


def _pub_bytes(pub) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return pub.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)


def _check_node_key(certs: Path, raw: dict[str, bytes]) -> str:
    """The SuperNode's OpenSSH key pair: readable, ECDSA P-384, private matches public."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv = _load(
        certs / NODE_KEY,
        raw[NODE_KEY],
        "an OpenSSH private key",
        lambda b: serialization.load_ssh_private_key(b, None),
    )
    pub = _load(
        certs / NODE_PUB, raw[NODE_PUB], "an OpenSSH public key", serialization.load_ssh_public_key
    )
    if not isinstance(priv, ec.EllipticCurvePrivateKey) or priv.curve.name != "secp384r1":
        raise ValueError(f"{certs / NODE_KEY}: not an ECDSA P-384 key")
    if _pub_bytes(priv.public_key()) != _pub_bytes(pub):
        raise ValueError(f"{certs / NODE_KEY}: does not match {certs / NODE_PUB}")
    return f"{NODE_KEY} matches {NODE_PUB} (ECDSA P-384)"


def _check_certs(certs: Path) -> tuple[int, str]:
    """The files of a ``certs/sites/<site>`` or ``certs/superlink`` folder, present and
    consistent."""
    site = (certs / NODE_KEY).exists() or (certs / NODE_PUB).exists()
    need = [CA_CERT, SECRET] + (
        [NODE_KEY, NODE_PUB, RUNTIME_CERT, RUNTIME_KEY] if site else [SERVER_CERT, SERVER_KEY]
    )
    try:
        raw = {n: _read(certs / n) for n in need}
    except OSError as err:
        return Exit.CERTS_MISSING, str(err)
    if not raw[SECRET].strip():
        return Exit.CERTS_MISSING, f"{certs / SECRET}: empty"
    try:
        ca = _pem_cert(certs / CA_CERT, raw[CA_CERT])
        _check_valid_now(certs / CA_CERT, ca)  # an expired CA fails every TLS handshake
        if site:
            notes = [
                _check_node_key(certs, raw),
                _check_pair(certs / RUNTIME_CERT, certs / RUNTIME_KEY, ca),
            ]
        else:
            notes = [_check_pair(certs / SERVER_CERT, certs / SERVER_KEY, ca)]
    except ValueError as err:
        return Exit.CERTS_MISMATCH, str(err)
    return Exit.OK, "; ".join(notes)


def _check_data(data: Path) -> Check:
    from common.data.manifest import DataError, load_site

    try:
        card = load_site(data).card()
        return Check("data", Exit.DATA, True, f"{data}: {card.get('counts', card)}")
    except (DataError, OSError) as err:
        return Check("data", Exit.DATA, False, f"{data}: {err}")


def _check_superlink(superlink: str, certs: Path | None, timeout: float) -> list[Check]:
    """TCP to the SuperLink, then a TLS handshake verified with the site's CA."""
    host, port = split_address(superlink)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return [Check("superlink tcp", Exit.UNREACHABLE, False, f"{superlink}: {err}")]
    tcp = Check("superlink tcp", Exit.UNREACHABLE, True, f"{superlink}: TCP connect")
    ca = certs / CA_CERT if certs is not None else None
    if ca is None or not ca.is_file():
        why = f"{superlink}: no CA certificate to verify it with ({ca})"
        return [tcp, Check("superlink tls", Exit.CERTS_MISSING, False, why)]
    try:
        v = check_tls(host, port, ca, timeout)
        return [
            tcp,
            Check("superlink tls", Exit.TLS, True, f"{superlink}: {v}, verified with {ca}"),
        ]
    except (OSError, ssl.SSLError) as err:
        return [tcp, Check("superlink tls", Exit.TLS, False, f"{superlink} with CA {ca}: {err}")]


def _check_flwr_home(flwr_home: Path) -> Check:
    try:
        flwr_home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=flwr_home, prefix=".preflight-"):
            pass
        return Check("FLWR_HOME", Exit.FLWR_HOME, True, f"{flwr_home}: writable")
    except OSError as err:
        return Check("FLWR_HOME", Exit.FLWR_HOME, False, f"{flwr_home}: not writable ({err})")


def preflight(
    data: Path | None,
    certs: Path | None,
    superlink: str | None,
    flwr_home: Path | None,
    timeout: float = 5.0,
) -> list[Check]:
    """Run every check that has its input; see :class:`Exit` for what each failure means."""
    checks: list[Check] = []
    if data is not None:
        checks.append(_check_data(data))
    if certs is not None:
        code, detail = _check_certs(certs)
        checks.append(Check("certificates", code or Exit.CERTS_MISMATCH, code == 0, detail))
    if superlink is not None:
        checks += _check_superlink(superlink, certs, timeout)
    if flwr_home is not None:
        checks.append(_check_flwr_home(flwr_home))
    return checks


def preflight_command(
    data: Annotated[Path | None, typer.Option(help="The site's canonical data folder.")] = None,
    certs: Annotated[
        Path | None,
        typer.Option(help="This host's certs folder (certs/sites/<site> or certs/superlink)."),
    ] = None,
    superlink: Annotated[
        str | None, typer.Option(help="SuperLink host:port to reach over TLS.")
    ] = None,
    flwr_home: Annotated[
        Path | None,
        typer.Option(
            envvar="FLWR_HOME", help="Flower's home folder (default $FLWR_HOME or ~/.flwr)."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for each network check.")] = 5.0,
) -> None:
    """Check a site (or the coordinator) is ready to join: data, certificates, SuperLink, FLWR_HOME.

    Exit codes: 0 ready; 10 data invalid or unreadable; 11 certificate/key file missing;
    12 certificates/keys do not match or are not signed by the CA; 13 SuperLink unreachable (TCP);
    14 TLS handshake with the SuperLink fails; 15 FLWR_HOME not writable. The first failure decides.
    """
    home = flwr_home or Path.home() / ".flwr"
    checks = preflight(data, certs, superlink, home, timeout)
    for c in checks:
        typer.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name:14s} {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        typer.echo(f"preflight failed ({failed[0].name}): exit {failed[0].code}", err=True)
        raise typer.Exit(failed[0].code)
    typer.echo("preflight: ready")
