"""``crossprobe certs``: the federation's CA, the SuperLink's TLS certificate and, per site, an
ECDSA P-384 SuperNode key pair (OpenSSH), a certificate for the SuperNode's runtime API and the
SuperExec shared secret.

Certificate folder written by ``crossprobe certs --out certs`` (ship each folder to its host only)::

    certs/ca/ca.crt, ca.key           the CA; ca.key never leaves the machine that ran `certs`
    certs/superlink/                  coordinator host: ca.crt, server.crt, server.key,
                                      superexec.secret, supernodes/<site>.pub (keys to register)
    certs/sites/<site>/               hospital <site>: ca.crt, supernode.key + supernode.pub (node
                                      auth), runtime.crt + runtime.key (SuperNode runtime API TLS),
                                      superexec.secret
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Annotated

import typer

from common.fl.signing import new_keypair

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_KEY, NODE_PUB = "supernode.key", "supernode.pub"
RUNTIME_CERT, RUNTIME_KEY = "runtime.crt", "runtime.key"
SECRET = "superexec.secret"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "superlink")
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _check_site_name(name: str) -> str:
    if not _SITE_NAME.match(name):
        raise typer.BadParameter(
            f"site name {name!r}: use lowercase letters, digits, '-' or '_' (it names files, "
            "containers and volumes)"
        )
    return name


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600 if private else 0o644)
    os.replace(tmp, path)


def _san(hosts: list[str]):
    from cryptography import x509

    out = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(out)


def _issue(ca_cert, ca_key, cn: str, hosts: list[str], days: int):
    """A server certificate (ECDSA P-384) for ``hosts``, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    if hasattr(obj, "public_bytes") and not hasattr(obj, "private_bytes"):
        return obj.public_bytes(s.Encoding.PEM)
    return obj.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def _load_or_make_ca(ca_dir: Path, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    crt, key = ca_dir / CA_CERT, ca_dir / CA_KEY
    if crt.is_file() and key.is_file():
        return (
            x509.load_pem_x509_certificate(crt.read_bytes()),
            serialization.load_pem_private_key(key.read_bytes(), None),
            False,
        )
    k = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crossprobe federation CA")])
    now = dt.datetime.now(dt.UTC)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
        .sign(k, hashes.SHA384())
    )
    _write(key, _pem(k), private=True)
    _write(crt, _pem(c))
    return c, k, True


def runtime_hosts(site: str) -> list[str]:
    """Names the site's executor may use for its SuperNode: compose service names and loopback."""
    return ["supernode", f"supernode-{site}", "localhost", "127.0.0.1"]


def make_certs(
    out: Path, sites: list[str], hosts: list[str] = (), days: int = 825, force: bool = False
) -> list[Path]:
    """Create what is missing under ``out`` (see the module docstring); return the files written.

    Existing files are kept (rerunning is safe and adds new sites with the same CA) unless
    ``force``, which makes everything anew. The server certificate names ``localhost``,
    ``127.0.0.1``, ``superlink`` and ``hosts``.

    Raises:
        typer.BadParameter: a site name unusable as a file/container name.
    """
    sites = [_check_site_name(s) for s in sites]
    out = Path(out)
    if force:
        for sub in ("ca", "superlink", "sites"):
            shutil.rmtree(out / sub, ignore_errors=True)
    written: list[Path] = []
    ca_cert, ca_key, new_ca = _load_or_make_ca(out / "ca", days)
    if new_ca:
        written += [out / "ca" / CA_CERT, out / "ca" / CA_KEY]
    ca_pem = _pem(ca_cert)

    def put(path: Path, data: bytes, private: bool = False) -> None:
        _write(path, data, private)
        written.append(path)

    sl = out / "superlink"
    if new_ca or not (sl / CA_CERT).is_file():
        put(sl / CA_CERT, ca_pem)
    if new_ca or not ((sl / SERVER_CERT).is_file() and (sl / SERVER_KEY).is_file()):
        cert, key = _issue(ca_cert, ca_key, "superlink", [*DEFAULT_HOSTS, *hosts], days)
        put(sl / SERVER_KEY, _pem(key), private=True)
        put(sl / SERVER_CERT, _pem(cert))
    if not (sl / SECRET).is_file():
        put(sl / SECRET, secrets.token_hex(32).encode(), private=True)
    for site in sites:
        d = out / "sites" / site
        if new_ca or not (d / CA_CERT).is_file():
            put(d / CA_CERT, ca_pem)
        if not ((d / NODE_KEY).is_file() and (d / NODE_PUB).is_file()):
            priv, pub = new_keypair()
            put(d / NODE_KEY, priv, private=True)
            put(d / NODE_PUB, pub)
        if new_ca or not ((d / RUNTIME_CERT).is_file() and (d / RUNTIME_KEY).is_file()):
            cert, key = _issue(ca_cert, ca_key, f"supernode-{site}", runtime_hosts(site), days)
            put(d / RUNTIME_KEY, _pem(key), private=True)
            put(d / RUNTIME_CERT, _pem(cert))
        if not (d / SECRET).is_file():
            put(d / SECRET, secrets.token_hex(32).encode(), private=True)
        reg = sl / "supernodes" / f"{site}.pub"  # what the coordinator registers
        if not reg.is_file() or reg.read_bytes() != (d / NODE_PUB).read_bytes():
            put(reg, (d / NODE_PUB).read_bytes())
    return written


def certs_command(
    site: Annotated[
        list[str], typer.Option("--site", help="A site name (repeat): one key pair per site.")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write (see docs/deployment.md).")] = Path(
        "certs"
    ),
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="Extra SuperLink hostname/IP for the server certificate (repeat)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of the certificates.")] = 825,
    force: Annotated[bool, typer.Option(help="Replace everything, including the CA.")] = False,
    owner: Annotated[
        int | None, typer.Option(help="chown the files to this uid:gid (containers run as 49999).")
    ] = None,
) -> None:
    """Create the federation's CA, the SuperLink TLS certificate and one ECDSA P-384 SuperNode key
    pair (OpenSSH) per site, keeping files that already exist."""
    written = make_certs(out, site, list(host or []), days, force)
    if owner is not None:
        for p in [out, *out.rglob("*")]:
            os.chown(p, owner, owner)
    for p in written:
        typer.echo(f"wrote {p}")
    typer.echo(
        f"{len(written)} file(s) written under {out}; ship {out}/superlink/ to the coordinator and "
        f"{out}/sites/<site>/ to each site; keep {out}/ca/{CA_KEY} offline"
    )
