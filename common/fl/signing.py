"""Reply signatures: every reply a site sends is signed with that site's own ECDSA P-384 key, and
the server uses nothing of it before the signature verifies against the site's registered public
key.

What is signed is a short statement that binds the reply to the exact message it answers::

    {"v": 1, "run": run id, "node": the site's node id, "site": its name,
     "type": message type, "group": group id, "request_id": the request's message id,
     "request": digest of the request, "reply": digest of the reply}

where a digest is the SHA-256 of the canonical JSON of the message's described records
(``common/fl/describe.py``: every array's SHA-256, every config value, every scalar, every score
vector's SHA-256), without the signature record itself. So a reply forged by another node, a reply
replayed from another round or run, a reply to a request that was changed on the way, and a reply
changed on the way all fail verification. Signatures are deterministic (RFC 6979): the same
statement always gets the same 96 bytes, so they carry nothing a site chose.

Keys: in deployment the site's SuperNode key (``crossprobe certs``: ``certs/sites/<site>/
supernode.key``, registered as ``certs/superlink/supernodes/<site>.pub``); in simulation one key
pair per simulated site in ``<run-dir>/keys`` (:func:`ensure_site_keys`).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from common.errors import UserError
from common.fl.contract import SIGNATURE_ALG, SIGNATURE_BYTES  # the contract names them once

ALG = SIGNATURE_ALG  # signatures are SIGNATURE_BYTES long: r || s, 48 bytes each (P-384)
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"


class SigningKeyError(UserError):
    """A key file that is missing or cannot be read; the message names the file."""


def digest(records: list[dict], skip: str = "") -> str:
    """SHA-256 of a described message's canonical JSON, without the record named ``skip``."""
    from common.fl.ledger import canonical  # (lazy: `crossprobe certs --help` needs no Flower)

    kept = [r for r in records if r.get("name") != skip]
    return hashlib.sha256(canonical({"records": kept}).encode()).hexdigest()


def statement(
    *,
    run_id: int | None,
    node: int,
    site: str,
    message_type: str,
    group_id: str,
    request_id: str,
    request: str,
    reply: str,
) -> bytes:
    """The bytes a site signs for one reply (see the module docstring)."""
    from common.fl.ledger import canonical

    return canonical(
        {
            "v": 1,
            "run": run_id,
            "node": int(node),
            "site": site,
            "type": message_type,
            "group": group_id,
            "request_id": request_id,
            "request": request,
            "reply": reply,
        }
    ).encode()


def reply_statement(
    request_md, *, run_id: int | None, site: str, request: str, reply: str
) -> bytes:
    """The statement for a reply to the message whose metadata is ``request_md`` (a Flower
    ``Metadata``): what the guard signs and the server verifies, from the same fields."""
    return statement(
        run_id=run_id,
        node=request_md.dst_node_id,
        site=site,
        message_type=request_md.message_type,
        group_id=request_md.group_id,
        request_id=request_md.message_id or "",
        request=request,
        reply=reply,
    )


def new_keypair() -> tuple[bytes, bytes]:
    """(private OpenSSH PEM, public OpenSSH line) of a new ECDSA P-384 key — the format of a
    Flower SuperNode key."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    priv = k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    pub = k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return priv, pub + b"\n"


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"{path}: cannot read the {what} ({err.strerror or err})") from None


def load_private_key_from_bytes(data: bytes, where: str = "key"):
    """An ECDSA P-384 private key from OpenSSH or PEM bytes (no passphrase).

    Raises:
        SigningKeyError: naming ``where`` — not a key, protected, or not P-384.
    """
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = None
    for load in (s.load_ssh_private_key, s.load_pem_private_key):
        try:
            key = load(data, password=None)
            break
        except (ValueError, TypeError):
            continue
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise SigningKeyError(
            f"{where}: not an unencrypted ECDSA P-384 private key (OpenSSH or PEM); "
            "`crossprobe certs` makes one per site"
        )
    return key


@lru_cache(maxsize=64)
def load_private_key(path: str):
    """An ECDSA P-384 private key (OpenSSH or PEM, no passphrase).

    Raises:
        SigningKeyError: naming the file — unreadable, not a key, protected, or not P-384.
    """
    return load_private_key_from_bytes(_read(Path(path), "site's signing key"), str(path))


@lru_cache(maxsize=256)
def load_public_key(path: str):
    """An ECDSA P-384 public key (an OpenSSH line, as SuperNode keys are registered, or PEM).

    Raises:
        SigningKeyError: naming the file.
    """
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(Path(path), "site's public key")
    key = None
    for load in (s.load_ssh_public_key, s.load_pem_public_key):
        try:
            key = load(data)
            break
        except (ValueError, TypeError):
            continue
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SigningKeyError(f"{path}: not an ECDSA P-384 public key (OpenSSH line or PEM)")
    return key


def fingerprint(public_key) -> str:
    """``SHA256:<hex>`` of the key's OpenSSH encoding (what the ledgers record)."""
    from cryptography.hazmat.primitives import serialization as s

    raw = public_key.public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def sign(private_key, message: bytes) -> bytes:
    """Deterministic ECDSA P-384 / SHA-384 signature, as ``r || s`` (96 bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    der = private_key.sign(message, ec.ECDSA(hashes.SHA384(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def verify(public_key, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (``r || s``) is the key's signature of ``message``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def public_key_path(folder: Path, site: str) -> Path:
    """Where a site's registered public key lies: ``<folder>/<site>.pub``."""
    return Path(folder) / f"{site}{PUBLIC_SUFFIX}"


def ensure_site_keys(folder: Path, sites: list[str]) -> dict[str, Path]:
    """One key pair per simulated site in ``folder`` (``<site>.key``, mode 0600, and
    ``<site>.pub``); existing pairs are kept, so a resumed run signs with the same keys.

    Returns:
        site -> its private key file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for site in sites:
        priv_path, pub_path = folder / f"{site}{PRIVATE_SUFFIX}", public_key_path(folder, site)
        if not (priv_path.is_file() and pub_path.is_file()):
            priv, pub = new_keypair()
            tmp = folder / f".{site}.tmp"
            tmp.write_bytes(priv)
            os.chmod(tmp, 0o600)
            os.replace(tmp, priv_path)
            pub_path.write_bytes(pub)
        out[site] = priv_path
    return out
