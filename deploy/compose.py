"""``crossprobe compose``: ``docker-compose.yml`` (the two-site demo on one Docker host) and
``deploy/{site,coordinator}.compose.yml`` (one hospital; the coordinator), generated from the
command lines in ``deploy/argv.py``. Do not edit the generated files by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from deploy.argv import (
    FLOWER_ENV,
    clientapp_executor_argv,
    launch_argv,
    node_config,
    serverapp_executor_argv,
    superlink_argv,
    supernode_argv,
)
from deploy.certs import NODE_KEY

APP_DIR = Path(__file__).resolve().parents[1]

# in the containers
PORT = 9093  # SuperLink: Fleet + Control + Runtime API on one port (Flower 1.42)
RUNTIME_PORT = 9094  # a SuperNode's runtime API (its ClientApp executor connects here)
C_CERTS, C_DATA, C_OUTPUTS, C_RESULTS, C_STATE = "/certs", "/data", "/outputs", "/results", "/state"
C_NODE_KEY = f"{C_CERTS}/{NODE_KEY}"  # a site's SuperNode key: it also signs the site's replies
UID = 49999  # like Flower's official images
IMAGE = "${CROSSPROBE_IMAGE:-crossprobe:local}"
RUN_CONFIG = "${CROSSPROBE_RUN_CONFIG:-}"  # more run config for launch, e.g. timeout-train=3600


def _service(command: list[str], volumes: list[str], **extra: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {"image": IMAGE, "command": command}
    if volumes:
        svc["volumes"] = volumes
    svc["environment"] = dict(FLOWER_ENV)
    svc.update(extra)
    return svc


def _restart() -> dict[str, str]:
    return {"restart": "unless-stopped"}


def _demo_init(sites: list[tuple[str, str]], experiment: str) -> dict[str, Any]:
    """The one-shot ``init`` service: certificates and each site's synthetic data, written as root
    into fresh volumes, then handed to the unprivileged user."""
    volumes = ["certs-ca:/init/certs/ca", "certs-superlink:/init/certs/superlink"]
    for name, _ in sites:
        volumes += [f"certs-{name}:/init/certs/sites/{name}", f"data-{name}:/init/data/{name}"]
    site_args = " ".join(f"--site {n}" for n, _ in sites)
    command = (
        f"crossprobe certs --out /init/certs {site_args} --owner {UID}"
        f' && crossprobe demo-data --config "{experiment}" --out /init/data'
        f" && chown -R {UID}:{UID} /init/data"
    )
    return {
        "build": {
            "context": ".",
            "args": {
                "TORCH_INDEX_URL": "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}",
                # offline builds: a wheelhouse served over HTTP (tests/test_compose_up.py)
                "WHEELS_URL": "${CROSSPROBE_WHEELS_URL:-}",
            },
        },
        "image": IMAGE,
        "user": "root",
        "command": ["sh", "-c", command],
        "volumes": volumes,
        "environment": dict(FLOWER_ENV),
    }


def _demo_site(name: str, role: str, superlink: str) -> dict[str, Any]:
    """One site's SuperNode and ClientApp executor; only the executor sees the data (read-only)."""
    certs = f"certs-{name}:/certs:ro"
    nc = node_config(name, role, f"{C_DATA}/{name}", C_OUTPUTS, C_NODE_KEY)
    return {
        f"supernode-{name}": _service(
            supernode_argv(C_CERTS, superlink, "0.0.0.0", RUNTIME_PORT, nc),
            [certs],
            depends_on={"superlink": {"condition": "service_started"}},
            **_restart(),
        ),
        f"clientapp-{name}": _service(
            clientapp_executor_argv(C_CERTS, f"supernode-{name}:{RUNTIME_PORT}"),
            [certs, f"data-{name}:{C_DATA}:ro", f"outputs-{name}:{C_OUTPUTS}"],
            depends_on={f"supernode-{name}": {"condition": "service_started"}},
            **_restart(),
        ),
    }


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
    services: dict[str, Any] = {"init": _demo_init(sites, experiment)}
    services["superlink"] = _service(
        superlink_argv(C_CERTS, "0.0.0.0", PORT, f"{C_STATE}/state.db"),
        ["certs-superlink:/certs:ro", f"superlink-state:{C_STATE}"],
        depends_on={"init": {"condition": "service_completed_successfully"}},
        **_restart(),
    )
    services["serverapp"] = _service(
        serverapp_executor_argv(C_CERTS, superlink),
        ["certs-superlink:/certs:ro", f"results:{C_RESULTS}"],
        depends_on={"superlink": {"condition": "service_started"}},
        **_restart(),
    )
    for name, role in sites:
        services.update(_demo_site(name, role, superlink))
    services["launch"] = _service(
        launch_argv(
            superlink,
            C_CERTS,
            experiment,
            f"{C_RESULTS}/${{CROSSPROBE_RUN_NAME:-demo}}",
            RUN_CONFIG,
        ),
        ["certs-superlink:/certs:ro"],
        depends_on={
            "serverapp": {"condition": "service_started"},
            **{f"clientapp-{n}": {"condition": "service_started"} for n, _ in sites},
        },
    )
    volumes = ["certs-ca", "certs-superlink", "superlink-state", "results"]
    for name, _ in sites:
        volumes += [f"certs-{name}", f"data-{name}", f"outputs-{name}"]
    return {"services": services, "volumes": {v: None for v in volumes}}


def site_compose() -> dict[str, Any]:
    """One hospital: its SuperNode and ClientApp executor, configured by environment."""
    superlink = "${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS=host:port of the coordinator}"
    name = "${SITE_NAME:?set SITE_NAME}"
    role = "${SITE_ROLE:?set SITE_ROLE=source or target}"
    certs = (
        "${SITE_CERTS:?set SITE_CERTS=folder holding this site's certs/sites/<site> files}"
        ":/certs:ro"
    )
    data = "${SITE_DATA:?set SITE_DATA=the site's canonical data folder}:/data:ro"
    outputs = f"${{SITE_OUTPUTS:-./outputs}}:{C_OUTPUTS}"
    return {
        "services": {
            "supernode": _service(
                supernode_argv(C_CERTS, superlink, "0.0.0.0", RUNTIME_PORT,
                               node_config(name, role, C_DATA, C_OUTPUTS, C_NODE_KEY)),
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
                            f"{C_RESULTS}/${{CROSSPROBE_RUN_NAME:-run}}", RUN_CONFIG),
                [certs], profiles=["run"],
                depends_on={"serverapp": {"condition": "service_started"}},
            ),
        },
        "volumes": {"superlink-state": None},
    }  # fmt: skip


COMPOSE_FILES = {
    "docker-compose.yml": ("demo_compose", "docker compose up --build"),
    "deploy/site.compose.yml": (
        "site_compose",
        "docker compose -p crossprobe-site -f deploy/site.compose.yml up -d",
    ),
    "deploy/coordinator.compose.yml": (
        "coordinator_compose",
        "docker compose -p crossprobe-coordinator -f deploy/coordinator.compose.yml up -d",
    ),
}


def render_compose(path: str) -> str:
    """The text of one generated compose file (``COMPOSE_FILES``)."""
    import yaml

    fn, usage = COMPOSE_FILES[path]
    spec = globals()[fn]()
    head = (
        f"# GENERATED by `crossprobe compose --write` from deploy/compose.py and deploy/argv.py\n"
        f"# (the Flower command lines live there); do not edit by hand. Usage: {usage}\n"
        f"# Steps for a hospital: docs/deployment.md. No top-level `name:` (Compose v1 refuses\n"
        f"# it): -p or the folder names the project; `docker-compose` (v1) reads it the same.\n"
    )
    return head + yaml.safe_dump(spec, sort_keys=False, width=100)


def compose_command(
    write: Annotated[bool, typer.Option(help="Write the files instead of printing them.")] = False,
) -> None:
    """Print (or --write) docker-compose.yml and deploy/*.compose.yml from deploy/argv.py."""
    for path in COMPOSE_FILES:
        text = render_compose(path)
        if write:
            (APP_DIR / path).parent.mkdir(parents=True, exist_ok=True)
            (APP_DIR / path).write_text(text)
            typer.echo(f"wrote {path}", err=True)
        else:
            sys.stdout.write(f"# ---- {path}\n{text}")
