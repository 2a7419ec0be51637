"""The Flower 1.42 command lines of every process of a deployment — the one place they are written,
so the compose files, the process-topology test and ``crossprobe launch`` cannot drift apart."""

from __future__ import annotations

import json

from deploy.certs import (
    CA_CERT,
    NODE_KEY,
    RUNTIME_CERT,
    RUNTIME_KEY,
    SECRET,
    SERVER_CERT,
    SERVER_KEY,
)

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
CONNECTION = "crossprobe"  # the connection name `launch` writes into $FLWR_HOME/config.toml


def superlink_argv(certs: str, host: str, port: int | str, database: str) -> list[str]:
    """The SuperLink (``crossprobe-superlink``: Flower's ``flower-superlink``, waiting longer for
    its SQLite lock, deploy/superlink.py): TLS, SuperNode authentication, process isolation
    (ServerApps run in a separate ``flower-superexec``, which must present the shared secret), no
    runtime dependency installs. ``certs`` is a ``certs/superlink`` folder."""
    return [
        "crossprobe-superlink",
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


def node_config(site: str, role: str, data_dir: str, out_dir: str, signing_key: str) -> str:
    """``--node-config`` for a site (read by ``clients.site.resolve_site``); ``signing_key`` is the
    private key the site signs its replies with: its SuperNode key, whose public half the server
    verifies them against."""
    return (
        f'site="{site}" role="{role}" data-dir="{data_dir}" out-dir="{out_dir}" '
        f'signing-key="{signing_key}"'
    )


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


def launch_argv(
    superlink: str, certs: str, experiment: str, run_dir: str, extra: str = ""
) -> list[str]:
    """The one-shot ``launch`` service: register keys, start the run, exit with its real status.
    The ServerApp verifies every reply against the same public keys the SuperLink registers.
    ``extra`` is appended to the run config (compose: ``${CROSSPROBE_RUN_CONFIG:-}``, e.g. the
    timeouts)."""
    run_config = f'experiment="{experiment}" run-dir="{run_dir}" site-keys="{certs}/supernodes"'
    return [
        "crossprobe", "launch",
        "--superlink", superlink,
        "--ca", f"{certs}/{CA_CERT}",
        "--register", f"{certs}/supernodes",
        "--run-config", f"{run_config} {extra}".strip(),
    ]  # fmt: skip
