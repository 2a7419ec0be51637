"""`docker-compose up --build` of the two-site demo, for real: the image built from the project's
Dockerfile, one container per role, TLS, SuperNode auth, signed replies — to `launch` exiting 0,
then the report copied out of the results volume and `crossprobe audit` run on the server ledger
and on each site's ledger taken from that site's own volume.

Needs a Docker engine (`deploy/docker-engine.sh`; `.ci/run` runs it). The image installs from a
wheelhouse made from the wheels on this machine's disk and served over HTTP to the build (no
registry, no index is reached): torch as pip resolves it here (2.14.1 with its CUDA libraries: a
CPU build of torch cannot be paired with the CUDA build of torchvision that timm imports).
Compose v1 (`docker-compose`) drives it, as on Debian.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from common.fl.audit import audit_run
from deploy.compose import APP_DIR

WHEELHOUSE = Path(
    os.environ.get("CROSSPROBE_WHEELHOUSE", "/var/cache/crossprobe-engine/wheelhouse")
)
SITES = ("lumify", "telemed")  # configs/tiny.yaml
IMAGE = "crossprobe:test"
pytestmark = pytest.mark.slow


def _sh(*argv: str, timeout: float = 120, env=None, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        argv, cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-3000:]}"
                             f"\n{out.stderr[-3000:]}")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def engine() -> None:
    ok = (
        shutil.which("docker-compose")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail("no Docker engine: .ci/run prepares one with deploy/docker-engine.sh")
        pytest.skip("no Docker engine (sudo deploy/docker-engine.sh)")


@pytest.fixture(scope="module")
def wheels_url(engine):
    """The project's dependencies as wheels, served to the image build on the docker bridge."""
    if not any(WHEELHOUSE.glob("torch-*.whl")):
        import tomllib

        deps = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
        _sh("pip", "download", "-q", "-d", str(WHEELHOUSE), "--only-binary=:all:", *deps,
            "setuptools", "wheel", timeout=900)  # fmt: skip
    gateway = _bridge_gateway()
    handler = functools.partial(QuietHandler, directory=str(WHEELHOUSE))
    server = http.server.ThreadingHTTPServer((gateway, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{gateway}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _bridge_gateway() -> str:
    """The host's address on the default bridge, where build containers reach it (docker0; the
    daemon does not always fill IPAM's Gateway field)."""
    out = _sh("ip", "-4", "-o", "addr", "show", "docker0").stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    assert match, f"no IPv4 address on docker0: {out}"
    return match.group(1)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # pip fetches hundreds of files
        pass


class Project:
    """One compose project (its own name, network, volumes), always taken down."""

    def __init__(self, name: str, env: dict[str, str], files: tuple[str, ...] = ()):
        self.name, self.env = name, env
        self.args = ["docker-compose", "-p", name, *(a for f in files for a in ("-f", f))]

    def __call__(self, *argv: str, timeout: float = 120, check=True):
        return _sh(*self.args, *argv, timeout=timeout, env=self.env, check=check)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        _sh("docker", "cp", f"{self.container(service)}:{path}", str(dest))
        return dest

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "-t", "5", timeout=300, check=False)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return _sh("docker", "ps", "-aq", "--filter", label).stdout.split()


@pytest.fixture
def demo(engine, wheels_url):
    env = {
        **os.environ,
        "CROSSPROBE_EXPERIMENT": "configs/tiny.yaml",
        "CROSSPROBE_WHEELS_URL": wheels_url,
        "CROSSPROBE_IMAGE": IMAGE,  # not a user's crossprobe:local
        "COMPOSE_HTTP_TIMEOUT": "600",
    }
    project = Project(f"crossprobe-ci-{os.getpid()}", env)
    try:
        yield project
    finally:
        project.down()


def test_docker_compose_up_runs_the_demo_to_completed_and_its_ledgers_audit_clean(demo, tmp_path):
    t0 = time.monotonic()
    demo("build", "--force-rm", timeout=1500)
    built = time.monotonic() - t0
    image = _sh("docker", "image", "inspect", IMAGE, "-f", "{{.Size}}").stdout
    t1 = time.monotonic()
    demo("up", "-d", timeout=600)  # init (certs, data) first; the rest once it exited 0
    launch = demo.container("launch")
    assert launch, demo("ps").stdout
    code = int(_sh("docker", "wait", launch, timeout=900).stdout.strip())
    finished = time.monotonic() - t1
    logs = demo("logs", "--no-color", "launch", check=False).stdout
    assert code == 0, (
        f"launch exited {code}:\n{logs[-4000:]}\n"
        + demo("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]
    )
    assert "finished:completed" in logs, logs[-2000:]
    print(
        f"compose: image {int(image) / 1e6:.0f} MB built in {built:.0f} s; "
        f"up to finished:completed in {finished:.0f} s"
    )
    # what a user does next: the report out of the results volume, each ledger out of its volume
    results = demo.copy_out("serverapp", "/results/demo", tmp_path / "results")
    assert (results / "report.md").is_file() and (results / "results.json").is_file()
    keys = demo.copy_out("serverapp", "/certs/supernodes", tmp_path / "keys")
    outputs = [
        demo.copy_out(f"clientapp-{s}", "/outputs", tmp_path / f"outputs-{s}") for s in SITES
    ]
    report = audit_run(results, outputs, keys=keys)
    assert report.ok and report.checked["signatures"] == 11, report.render()
    demo.down()
    assert demo.leftovers() == []


# ------------------------------------------------------------------ separate hospitals
HOSPITALS = {"lumify": "source", "telemed": "target", "telemed2": "target"}  # tiny-3sites


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _owned(path: Path) -> Path:
    """A host folder the containers' user (UID 49999) may write."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 49999, 49999)
    return path


@pytest.fixture
def hospitals(demo, tmp_path):
    """The coordinator and one project per hospital, each with its own network; all taken down."""
    projects: list[Project] = []
    yield projects
    for project in projects:
        project.down()


def test_separate_hospitals_join_only_through_the_superlinks_published_port(
    demo, hospitals, tmp_path
):
    from deploy.certs import make_certs
    from simulations.demo_data import demo_data

    demo("build", "--force-rm", timeout=1500)  # the same image (cached after the demo test)
    config = "configs/tiny-3sites.yaml"
    certs = tmp_path / "certs"  # the coordinator's name in the server certificate's SAN
    make_certs(certs, list(HOSPITALS), hosts=["coordinator"])
    _sh("chown", "-R", "49999:49999", str(certs))  # as `crossprobe certs --owner 49999` does
    data = {p.parent.name: p for p in demo_data(APP_DIR / config, _owned(tmp_path / "data"))}
    _sh("chown", "-R", "49999:49999", str(tmp_path / "data"))
    port = _free_port()
    base = {**demo.env, "CROSSPROBE_EXPERIMENT": config, "CROSSPROBE_RUN_NAME": "ci"}
    coordinator = Project(
        f"{demo.name}-coordinator",
        {**base, "SUPERLINK_CERTS": str(certs / "superlink"), "SUPERLINK_PORT": str(port),
         "RESULTS_DIR": str(_owned(tmp_path / "results"))},
        ("deploy/coordinator.compose.yml",),
    )  # fmt: skip
    hospitals.append(coordinator)
    coordinator("up", "-d", timeout=300)
    # each hospital reaches the coordinator by name at the host's published port, nothing else
    joins = tmp_path / "join.compose.yml"
    joins.write_text('services:\n  supernode:\n    extra_hosts: ["coordinator:host-gateway"]\n')
    for site, role in HOSPITALS.items():
        env = {
            **base,
            "SITE_NAME": site,
            "SITE_ROLE": role,
            "SUPERLINK_ADDRESS": f"coordinator:{port}",
            "SITE_CERTS": str(certs / "sites" / site),
            "SITE_DATA": str(data[site]),
            "SITE_OUTPUTS": str(_owned(tmp_path / "out" / site)),
        }
        hospital = Project(f"{demo.name}-{site}", env, ("deploy/site.compose.yml", str(joins)))
        hospitals.append(hospital)
        hospital("up", "-d", timeout=300)
    networks = {
        _sh("docker", "inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}"
            "{{end}}", p.container("superlink" if p is coordinator else "supernode")).stdout
        for p in hospitals
    }  # fmt: skip
    assert len(networks) == len(hospitals)  # four projects, four networks
    t = time.monotonic()
    launch = coordinator("--profile", "run", "run", "--rm", "launch", timeout=900, check=False)
    assert launch.returncode == 0, launch.stdout[-4000:] + launch.stderr[-4000:]
    assert "finished:completed" in launch.stdout
    print(f"separate hospitals: tiny-3sites to finished:completed in {time.monotonic() - t:.0f} s")
    report = audit_run(
        tmp_path / "results" / "ci",
        [tmp_path / "out" / site for site in HOSPITALS],
        keys=certs / "superlink" / "supernodes",
    )
    assert report.ok and report.checked["signatures"] > 0, report.render()
    for project in hospitals:
        project.down()
        assert project.leftovers() == []
