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
        "COMPOSE_HTTP_TIMEOUT": "600",
    }
    project = Project(f"crossprobe-ci-{os.getpid()}", env)
    try:
        yield project
    finally:
        project.down()


def test_docker_compose_up_runs_the_demo_to_completed_and_its_ledgers_audit_clean(demo, tmp_path):
    t0 = time.monotonic()
    demo("build", timeout=1500)
    built = time.monotonic() - t0
    image = _sh("docker", "image", "inspect", "crossprobe:local", "-f", "{{.Size}}").stdout
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
