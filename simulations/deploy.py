"""Real deployment: certificates and keys, the Flower command lines, compose files, launch, preflight.

Everything a container (or the process-topology test) runs comes from here, so the compose files and
the test cannot drift apart:

- :func:`superlink_argv`, :func:`serverapp_executor_argv`, :func:`supernode_argv`,
  :func:`clientapp_executor_argv` — the ONE place the Flower 1.42 flags are written (TLS everywhere,
  SuperNode authentication, process isolation, SuperExec shared secret, no runtime installs);
- :func:`make_certs` (``crossprobe certs``) — a CA, the SuperLink server certificate, and per site an
  ECDSA P-384 OpenSSH key pair, a certificate for the SuperNode's runtime API and a SuperExec secret;
- :func:`demo_compose`, :func:`site_compose`, :func:`coordinator_compose` — the compose files
  (``python -m simulations.deploy compose --write`` regenerates ``docker-compose.yml`` and
  ``deploy/*.compose.yml``; a test checks the committed files equal the generated ones);
- :func:`launch` — register the SuperNode keys, ``flwr run``, wait, and return the run's real status
  from ``flwr ls --format json`` (``flwr run`` exits 0 even when the run failed);
- :func:`preflight` (``crossprobe preflight``) — is a site (or the coordinator) ready to join.

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
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

APP_DIR = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ file layout (one place)
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_KEY, NODE_PUB = "supernode.key", "supernode.pub"
RUNTIME_CERT, RUNTIME_KEY = "runtime.crt", "runtime.key"
SECRET = "superexec.secret"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "superlink")

# in the containers
PORT = 9093  # SuperLink: Fleet + Control + Runtime API on one port (Flower 1.42)
RUNTIME_PORT = 9094  # a SuperNode's runtime API (its ClientApp executor connects here)
C_CERTS, C_DATA, C_OUTPUTS, C_RESULTS, C_STATE = "/certs", "/data", "/outputs", "/results", "/state"
UID = 49999  # like Flower's official images
IMAGE = "${CROSSPROBE_IMAGE:-crossprobe:local}"
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
CONNECTION = "crossprobe"  # the connection name `launch` writes into $FLWR_HOME/config.toml

_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


# ------------------------------------------------------------------ the Flower command lines
def superlink_argv(certs: str, host: str, port: int | str, database: str) -> list[str]:
    """The SuperLink: TLS, SuperNode authentication, process isolation (ServerApps run in a separate
    ``flower-superexec``, which must present the shared secret), no runtime dependency installs.
    ``certs`` is a ``certs/superlink`` folder."""
    return [
        "flower-superlink",
        "--ssl-ca-certfile", f"{certs}/{CA_CERT}",
        "--ssl-certfile", f"{certs}/{SERVER_CERT}",
        "--ssl-keyfile", f"{certs}/{SERVER_KEY}",
        "--enable-supernode-auth",
        "--isolation", "process",
        "--superexec-auth-secret-file", f"{certs}/{SECRET}",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
        "--database", database,
    ]  # fmt: skip


def serverapp_executor_argv(certs: str, superlink: str) -> list[str]:
    """The ServerApp executor: pulls runs from the SuperLink's Runtime API (same port) over TLS."""
    return [
        "flower-superexec",
        "--runtime-api-address", superlink,
        "--root-certificates", f"{certs}/{CA_CERT}",
        "--superexec-auth-secret-file", f"{certs}/{SECRET}",
    ]  # fmt: skip


def node_config(site: str, role: str, data_dir: str, out_dir: str) -> str:
    """``--node-config`` for a site (read by ``clients.site.resolve_site``)."""
    return f'site="{site}" role="{role}" data-dir="{data_dir}" out-dir="{out_dir}"'


def supernode_argv(
    certs: str,
    superlink: str,
    host: str,
    port: int | str,
    config: str,
    max_retries: int | None = None,
) -> list[str]:
    """A site's SuperNode: TLS to the SuperLink verified with the CA, authenticated with the site's
    private key, ClientApps run by a separate executor (process isolation) that reaches the
    SuperNode's runtime API over TLS with the shared secret. ``certs`` is a ``certs/sites/<site>``
    folder; ``config`` comes from :func:`node_config`."""
    argv = [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", f"{certs}/{CA_CERT}",
        "--auth-supernode-private-key", f"{certs}/{NODE_KEY}",
        "--isolation", "process",
        "--host", host,
        "--port", str(port),
        "--ssl-certfile", f"{certs}/{RUNTIME_CERT}",
        "--ssl-keyfile", f"{certs}/{RUNTIME_KEY}",
        "--ssl-ca-certfile", f"{certs}/{CA_CERT}",
        "--superexec-auth-secret-file", f"{certs}/{SECRET}",
        "--node-config", config,
    ]  # fmt: skip
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def clientapp_executor_argv(certs: str, runtime: str) -> list[str]:
    """A site's ClientApp executor (the process that reads the site's data)."""
    return [
        "flower-superexec",
        "--runtime-api-address", runtime,
        "--root-certificates", f"{certs}/{CA_CERT}",
        "--superexec-auth-secret-file", f"{certs}/{SECRET}",
    ]  # fmt: skip


def connection_toml(address: str, ca: str, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: TLS verified with the CA."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(ca)}\n"
    )


# ------------------------------------------------------------------ certificates and keys
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


def node_keypair() -> tuple[bytes, bytes]:
    """(private OpenSSH PEM, public OpenSSH line) of a new ECDSA P-384 SuperNode key."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    priv = k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    pub = k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return priv, pub + b"\n"


def runtime_hosts(site: str) -> list[str]:
    """Names the site's executor may use for its SuperNode: compose service names and loopback."""
    return ["supernode", f"supernode-{site}", "localhost", "127.0.0.1"]


def make_certs(
    out: Path, sites: list[str], hosts: list[str] = (), days: int = 825, force: bool = False
) -> list[Path]:
    """Create what is missing under ``out`` (see the module docstring); return the files written.

    Existing files are kept (rerunning is safe and adds new sites with the same CA) unless ``force``,
    which makes everything anew. The server certificate names ``localhost``, ``127.0.0.1``,
    ``superlink`` and ``hosts``.

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
            priv, pub = node_keypair()
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


# ------------------------------------------------------------------ compose files
def _service(command: list[str], volumes: list[str], **extra: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {"image": IMAGE, "command": command}
    if volumes:
        svc["volumes"] = volumes
    svc["environment"] = dict(FLOWER_ENV)
    svc.update(extra)
    return svc


def _restart() -> dict[str, str]:
    return {"restart": "unless-stopped"}


def demo_compose(config: Path = APP_DIR / "configs" / "demo.yaml") -> dict[str, Any]:
    """The two-site demo on one Docker host (``docker compose up``): one network, one container
    per role, each site's data in its own volume mounted read-only into that site's executor only,
    each site's keys in its own volume."""
    from common.config import load_experiment

    cfg = load_experiment(config)
    rel = config.resolve().relative_to(APP_DIR).as_posix()
    sites = [(s.name, s.role) for s in cfg.sites]
    experiment = f"${{CROSSPROBE_EXPERIMENT:-{rel}}}"
    superlink = f"superlink:{PORT}"
    init_volumes = ["certs-ca:/init/certs/ca", "certs-superlink:/init/certs/superlink"]
    for name, _ in sites:
        init_volumes += [f"certs-{name}:/init/certs/sites/{name}", f"data-{name}:/init/data/{name}"]
    site_args = " ".join(f"--site {n}" for n, _ in sites)
    init_cmd = (
        f"crossprobe certs --out /init/certs {site_args} --owner {UID}"
        f' && python -m simulations.deploy demo-data --config "{experiment}" --out /init/data'
        f" && chown -R {UID}:{UID} /init/data"
    )
    services: dict[str, Any] = {
        "init": {
            "build": {
                "context": ".",
                "args": {
                    "TORCH_INDEX_URL": "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
                },
            },
            "image": IMAGE,
            "user": "root",  # writes fresh volumes, then hands them to the unprivileged user
            "command": ["sh", "-c", init_cmd],
            "volumes": init_volumes,
            "environment": dict(FLOWER_ENV),
        },
    }
    after_init = {"init": {"condition": "service_completed_successfully"}}
    services["superlink"] = _service(
        superlink_argv(C_CERTS, "0.0.0.0", PORT, f"{C_STATE}/state.db"),
        ["certs-superlink:/certs:ro", f"superlink-state:{C_STATE}"],
        depends_on=after_init,
        **_restart(),
    )
    services["serverapp"] = _service(
        serverapp_executor_argv(C_CERTS, superlink),
        ["certs-superlink:/certs:ro", f"results:{C_RESULTS}"],
        depends_on={"superlink": {"condition": "service_started"}},
        **_restart(),
    )
    for name, role in sites:
        certs = f"certs-{name}:/certs:ro"
        nc = node_config(name, role, f"{C_DATA}/{name}", C_OUTPUTS)
        services[f"supernode-{name}"] = _service(
            supernode_argv(C_CERTS, superlink, "0.0.0.0", RUNTIME_PORT, nc),
            [certs],
            depends_on={"superlink": {"condition": "service_started"}},
            **_restart(),
        )
        services[f"clientapp-{name}"] = _service(
            clientapp_executor_argv(C_CERTS, f"supernode-{name}:{RUNTIME_PORT}"),
            [certs, f"data-{name}:{C_DATA}:ro", f"outputs-{name}:{C_OUTPUTS}"],
            depends_on={f"supernode-{name}": {"condition": "service_started"}},
            **_restart(),
        )
    services["launch"] = _service(
        launch_argv(superlink, C_CERTS, experiment, f"{C_RESULTS}/${{CROSSPROBE_RUN_NAME:-demo}}"),
        ["certs-superlink:/certs:ro"],
        depends_on={
            "serverapp": {"condition": "service_started"},
            **{f"clientapp-{n}": {"condition": "service_started"} for n, _ in sites},
        },
    )
    volumes = ["certs-ca", "certs-superlink", "superlink-state", "results"]
    for name, _ in sites:
        volumes += [f"certs-{name}", f"data-{name}", f"outputs-{name}"]
    return {"name": "crossprobe", "services": services, "volumes": {v: None for v in volumes}}


def launch_argv(superlink: str, certs: str, experiment: str, run_dir: str) -> list[str]:
    """The one-shot ``launch`` service: register keys, start the run, exit with its real status."""
    return [
        "python", "-m", "simulations.deploy", "launch",
        "--superlink", superlink,
        "--ca", f"{certs}/{CA_CERT}",
        "--register", f"{certs}/supernodes",
        "--run-config", f'experiment="{experiment}" run-dir="{run_dir}"',
    ]  # fmt: skip


def site_compose() -> dict[str, Any]:
    """One hospital: its SuperNode and ClientApp executor, configured by environment."""
    superlink = "${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS=host:port of the coordinator}"
    name = "${SITE_NAME:?set SITE_NAME}"
    role = "${SITE_ROLE:?set SITE_ROLE=source or target}"
    certs = "${SITE_CERTS:?set SITE_CERTS=folder holding this site's certs/sites/<site> files}:/certs:ro"
    data = "${SITE_DATA:?set SITE_DATA=the site's canonical data folder}:/data:ro"
    outputs = f"${{SITE_OUTPUTS:-./outputs}}:{C_OUTPUTS}"
    return {
        "name": "crossprobe-site",
        "services": {
            "supernode": _service(
                supernode_argv(C_CERTS, superlink, "0.0.0.0", RUNTIME_PORT,
                               node_config(name, role, C_DATA, C_OUTPUTS)),
                [certs], **_restart(),
            ),
            "clientapp": _service(
                clientapp_executor_argv(C_CERTS, f"supernode:{RUNTIME_PORT}"),
                [certs, data, outputs],
                depends_on={"supernode": {"condition": "service_started"}}, **_restart(),
            ),
            "preflight": _service(
                ["crossprobe", "preflight", "--data", C_DATA, "--certs", C_CERTS,
                 "--superlink", superlink],
                [certs, data], profiles=["preflight"],
            ),
        },
    }  # fmt: skip


def coordinator_compose() -> dict[str, Any]:
    """The coordinator host: SuperLink + ServerApp executor; ``launch`` starts a run (profile)."""
    certs = "${SUPERLINK_CERTS:?set SUPERLINK_CERTS=the certs/superlink folder}:/certs:ro"
    experiment = "${CROSSPROBE_EXPERIMENT:-configs/paper.yaml}"
    return {
        "name": "crossprobe-coordinator",
        "services": {
            "superlink": _service(
                superlink_argv(C_CERTS, "0.0.0.0", PORT, f"{C_STATE}/state.db"),
                [certs, f"superlink-state:{C_STATE}"],
                ports=[f"${{SUPERLINK_PORT:-{PORT}}}:{PORT}"], **_restart(),
            ),
            "serverapp": _service(
                serverapp_executor_argv(C_CERTS, f"superlink:{PORT}"),
                [certs, f"${{RESULTS_DIR:-./results}}:{C_RESULTS}"],
                depends_on={"superlink": {"condition": "service_started"}}, **_restart(),
            ),
            "launch": _service(
                launch_argv(f"superlink:{PORT}", C_CERTS, experiment,
                            f"{C_RESULTS}/${{CROSSPROBE_RUN_NAME:-run}}"),
                [certs], profiles=["run"],
                depends_on={"serverapp": {"condition": "service_started"}},
            ),
        },
        "volumes": {"superlink-state": None},
    }  # fmt: skip


COMPOSE_FILES = {
    "docker-compose.yml": ("demo_compose", "docker compose up"),
    "deploy/site.compose.yml": ("site_compose", "docker compose -f deploy/site.compose.yml up -d"),
    "deploy/coordinator.compose.yml": (
        "coordinator_compose",
        "docker compose -f deploy/coordinator.compose.yml up -d",
    ),
}


def render_compose(path: str) -> str:
    """The text of one generated compose file (``COMPOSE_FILES``)."""
    import yaml

    fn, usage = COMPOSE_FILES[path]
    spec = globals()[fn]()
    head = (
        f"# GENERATED by `python -m simulations.deploy compose --write` from simulations/deploy.py\n"
        f"# (the Flower command lines live there); do not edit by hand. Usage: {usage}\n"
        f"# Steps for a hospital: docs/deployment.md\n"
    )
    return head + yaml.safe_dump(spec, sort_keys=False, width=100)


# ------------------------------------------------------------------ demo data
def demo_data(config: Path, out: Path) -> list[Path]:
    """Each site's synthetic data under ``out/<site>/<site>`` (idempotent, via ``ensure_site``)."""
    from common.config import load_experiment
    from simulations.sites import ensure_site

    cfg = load_experiment(config)
    return [ensure_site(s, cfg.model.img_size, out / s.name, progress=False) for s in cfg.sites]


# ------------------------------------------------------------------ launch
class LaunchError(RuntimeError):
    """Registering keys or starting the run failed; the message says what Flower answered."""


def flwr_json(
    args: list[str], env: dict[str, str], cwd: Path = APP_DIR, timeout: float = 120
) -> dict:
    """Run ``flwr ... --format json`` and parse its answer."""
    flwr = shutil.which("flwr", path=env.get("PATH")) or "flwr"
    res = subprocess.run([flwr, *args, "--format", "json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        raise LaunchError(
            f"flwr {' '.join(args[:2])}: no JSON (exit {res.returncode}): "
            f"{res.stdout[-400:]} {res.stderr[-400:]}"
        ) from None


def register_keys(keys: dict[str, Path], env: dict[str, str]) -> dict[str, str]:
    """Register each SuperNode public key (name -> file); an already registered key is fine."""
    out = {}
    for name, path in keys.items():
        ans = flwr_json(["supernode", "register", str(path), CONNECTION, "--name", name], env)
        if ans.get("success"):
            out[name] = str(ans.get("node-id"))
        elif "already in use" in str(ans.get("error-message", "")):
            out[name] = "already registered"
        else:  # `flwr supernode register --format json` exits 0 even when it failed
            raise LaunchError(f"registering {path} as {name!r}: {ans.get('error-message', ans)}")
    return out


def wait_tls(address: str, ca: Path, timeout: float) -> None:
    """Wait until ``address`` accepts a TLS handshake verified with ``ca``."""
    host, port = _split(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_tls(host, port, ca, 5.0)
            return
        except (OSError, ssl.SSLError) as err:
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{address}: not reachable over TLS after {timeout:.0f} s: {err}"
                ) from None
            time.sleep(1.0)


def launch(
    superlink: str,
    ca: Path,
    keys: dict[str, Path],
    run_config: str,
    env: dict[str, str],
    app_dir: Path = APP_DIR,
    timeout: float = 0.0,
    poll: float = 3.0,
    wait_for: float = 120.0,
    say=print,
) -> dict:
    """Register ``keys``, ``flwr run`` the app, wait for the run to end; return its ``flwr ls`` entry.

    ``env`` must carry a writable ``FLWR_HOME``; the connection is written there.

    Raises:
        LaunchError: the SuperLink is unreachable, a key was refused, or the run did not start.
        TimeoutError: the run did not finish within ``timeout`` seconds (0 = no limit).
    """
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connection_toml(superlink, str(Path(ca).resolve())))
    wait_tls(superlink, ca, wait_for)
    for name, node in register_keys(keys, env).items():
        say(f"[launch] SuperNode {name}: {node}")
    args = ["run", str(app_dir), CONNECTION]
    if run_config:
        args += ["--run-config", run_config]
    ans = flwr_json(args, env)
    if not ans.get("success"):
        raise LaunchError(f"flwr run: {ans.get('error-message', ans)}")
    run_id = int(ans["run-id"])
    say(f"[launch] run {run_id} started (FAB {ans.get('fab-hash')})")
    t0, status = time.monotonic(), ""
    while True:
        runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env).get("runs") or [{}]
        entry = runs[0]
        if entry.get("status") != status:
            status = str(entry.get("status"))
            say(f"[launch] run {run_id}: {status} ({time.monotonic() - t0:.0f} s)")
        if status.startswith("finished"):
            return {**entry, "run-id": run_id, "fab-hash": ans.get("fab-hash")}
        if timeout and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def _keys_from(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(Path(folder).glob("*.pub"))}


def launch_command(
    superlink: Annotated[str, typer.Option(help="SuperLink host:port.")],
    ca: Annotated[Path, typer.Option(help="The federation's CA certificate.")],
    register: Annotated[
        Path | None, typer.Option(help="Folder of <site>.pub SuperNode keys to register first.")
    ] = None,
    run_config: Annotated[str, typer.Option(help="flwr run --run-config overrides.")] = "",
    app: Annotated[Path, typer.Option(help="The Flower app folder.")] = APP_DIR,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (0 = never).")
    ] = 0.0,
) -> None:
    """Register the SuperNode keys, start a run, wait, and exit 0 only if it finished completed."""
    env = os.environ.copy()
    env.setdefault("FLWR_HOME", str(Path.home() / ".flwr"))
    env.update(FLOWER_ENV)
    try:
        entry = launch(superlink, ca, _keys_from(register) if register else {}, run_config, env,
                       app, timeout)  # fmt: skip
    except (LaunchError, TimeoutError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(entry, indent=2))
    if entry.get("status") != "finished:completed":
        typer.echo(f"error: run {entry['run-id']} ended {entry.get('status')}", err=True)
        raise typer.Exit(1)


# ------------------------------------------------------------------ preflight
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


def _split(address: str) -> tuple[str, int]:
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


def _check_pair(crt: Path, key: Path, ca_cert) -> str:
    """Certificate signed by the CA, valid now, and matching its private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(_read(crt))
    k = serialization.load_pem_private_key(_read(key), None)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no message
        raise ValueError(f"{crt}: not signed by the CA ({type(err).__name__})") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            f"{crt}: not valid now (valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc})"
        )
    if _pub_bytes(cert.public_key()) != _pub_bytes(k.public_key()):
        raise ValueError(f"{key}: does not match {crt}")
    return f"{crt.name} signed by the CA, matches {key.name}"


def _pub_bytes(pub) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return pub.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)


def _check_certs(certs: Path) -> tuple[int, str]:
    """The files of a ``certs/sites/<site>`` or ``certs/superlink`` folder, present and consistent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

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
    notes = []
    try:
        try:
            ca = x509.load_pem_x509_certificate(raw[CA_CERT])
        except ValueError:
            raise ValueError(f"{certs / CA_CERT}: not a PEM certificate") from None
        if site:
            try:
                priv = serialization.load_ssh_private_key(raw[NODE_KEY], None)
            except ValueError as err:
                raise ValueError(
                    f"{certs / NODE_KEY}: not an OpenSSH private key ({err})"
                ) from None
            try:
                pub = serialization.load_ssh_public_key(raw[NODE_PUB])
            except ValueError as err:
                raise ValueError(f"{certs / NODE_PUB}: not an OpenSSH public key ({err})") from None
            if not isinstance(priv, ec.EllipticCurvePrivateKey) or priv.curve.name != "secp384r1":
                raise ValueError(f"{certs / NODE_KEY}: not an ECDSA P-384 key")
            if _pub_bytes(priv.public_key()) != _pub_bytes(pub):
                raise ValueError(f"{certs / NODE_KEY}: does not match {certs / NODE_PUB}")
            notes.append(f"{NODE_KEY} matches {NODE_PUB} (ECDSA P-384)")
            notes.append(_check_pair(certs / RUNTIME_CERT, certs / RUNTIME_KEY, ca))
        else:
            notes.append(_check_pair(certs / SERVER_CERT, certs / SERVER_KEY, ca))
    except ValueError as err:
        return Exit.CERTS_MISMATCH, str(err)
    return Exit.OK, "; ".join(notes)


def preflight(
    data: Path | None, certs: Path | None, superlink: str | None, flwr_home: Path | None,
    timeout: float = 5.0,
) -> list[Check]:  # fmt: skip
    """Run every check that has its input; see :class:`Exit` for what each failure means."""
    checks: list[Check] = []
    if data is not None:
        from common.data.manifest import DataError, load_site

        try:
            card = load_site(data).card()
            checks.append(Check("data", Exit.DATA, True, f"{data}: {card.get('counts', card)}"))
        except (DataError, OSError) as err:
            checks.append(Check("data", Exit.DATA, False, f"{data}: {err}"))
    if certs is not None:
        code, detail = _check_certs(certs)
        checks.append(Check("certificates", code or Exit.CERTS_MISMATCH, code == 0, detail))
    if superlink is not None:
        host, port = _split(superlink)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            checks.append(
                Check("superlink tcp", Exit.UNREACHABLE, True, f"{superlink}: TCP connect")
            )
        except OSError as err:
            checks.append(Check("superlink tcp", Exit.UNREACHABLE, False, f"{superlink}: {err}"))
        else:
            ca = certs / CA_CERT if certs is not None else None
            if ca is None or not ca.is_file():
                checks.append(Check("superlink tls", Exit.CERTS_MISSING, False,
                                    f"{superlink}: no CA certificate to verify it with ({ca})"))  # fmt: skip
            else:
                try:
                    v = check_tls(host, port, ca, timeout)
                    checks.append(
                        Check(
                            "superlink tls", Exit.TLS, True, f"{superlink}: {v}, verified with {ca}"
                        )
                    )
                except (OSError, ssl.SSLError) as err:
                    checks.append(
                        Check("superlink tls", Exit.TLS, False, f"{superlink} with CA {ca}: {err}")
                    )
    if flwr_home is not None:
        try:
            flwr_home.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=flwr_home, prefix=".preflight-"):
                pass
            checks.append(Check("FLWR_HOME", Exit.FLWR_HOME, True, f"{flwr_home}: writable"))
        except OSError as err:
            checks.append(
                Check("FLWR_HOME", Exit.FLWR_HOME, False, f"{flwr_home}: not writable ({err})")
            )
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


# ------------------------------------------------------------------ `python -m simulations.deploy`
cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
cli.command("certs")(certs_command)
cli.command("preflight")(preflight_command)
cli.command("launch")(launch_command)


@cli.command("compose")
def compose_command(
    write: Annotated[bool, typer.Option(help="Write the files instead of printing them.")] = False,
) -> None:
    """Print (or --write) docker-compose.yml and deploy/*.compose.yml from the command lines here."""
    for path in COMPOSE_FILES:
        text = render_compose(path)
        if write:
            (APP_DIR / path).parent.mkdir(parents=True, exist_ok=True)
            (APP_DIR / path).write_text(text)
            typer.echo(f"wrote {path}", err=True)
        else:
            sys.stdout.write(f"# ---- {path}\n{text}")


@cli.command("demo-data")
def demo_data_command(
    config: Annotated[Path, typer.Option(help="Experiment YAML whose sites to synthesise.")],
    out: Annotated[Path, typer.Option(help="Root: each site goes to OUT/<site>/<site>.")],
) -> None:
    """Make each site's synthetic data in its own folder (skips sites that are already there)."""
    for p in demo_data(config, out):
        typer.echo(f"site data: {p}")


if __name__ == "__main__":  # pragma: no cover
    cli()
