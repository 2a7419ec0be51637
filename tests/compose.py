"""Helpers for the tests that run the real containers (tests/test_compose_up.py): a Docker engine
or a skip, the project's wheels served to the image build, one compose project that is always
taken down, a site's ledger read inside its container, and an expired copy of a CA certificate.

The image installs from a wheelhouse made from the wheels on this machine's disk and served over
HTTP to the build (no registry, no index is reached): torch as pip resolves it here (2.14.1 with its
CUDA libraries: a CPU build of torch cannot be paired with the CUDA build of torchvision that timm
imports). The wheelhouse links to the files pip found on this disk rather than copying them (3 GB),
and is served on a fixed port, so that the image's dependency layer (the URL is one of its build
arguments) stays cached from one test session to the next; a rebuilt test image replaces the old
one. Compose v1 (`docker-compose`) drives it, as on Debian.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from deploy.compose import APP_DIR

WHEELHOUSE = Path(
    os.environ.get("CROSSPROBE_WHEELHOUSE", "/var/cache/crossprobe-engine/wheelhouse")
)
IMAGE = "crossprobe:test"  # not a user's crossprobe:local
WHEELS_PORT = 38081  # fixed: the wheelhouse URL is part of the dependency layer's cache key
# what building the image from nothing needs free under Docker's root: its dependency layer (5.7 GB:
# torch's CUDA libraries without triton, deploy/install_wheelhouse.py) twice, since the build
# commits a layer by copying it (measured: 10.5 GB at the peak), and a batch of wheels
BUILD_DISK_BYTES = 12_000_000_000
UID = 49999  # the image's user


def sh(*argv: str, timeout: float = 120, env=None, check=True) -> subprocess.CompletedProcess:
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
    remove_abandoned_projects()


# Project names: crossprobe-ci-<the pid of the pytest that made it>[-site]
PROJECT = re.compile(r"crossprobe-ci-(\d+)(-.+)?")


def remove_abandoned_projects() -> None:
    """Take down what a killed test run left: its containers restart with the engine (their
    restart policy) and would keep training beside every later test, slowing it into timeouts."""
    key = "com.docker.compose.project"
    for kind, ls, name in (
        ("container", ["ps", "-a"], "{{.ID}}"),
        ("volume", ["volume", "ls"], "{{.Name}}"),
        ("network", ["network", "ls"], "{{.ID}}"),
    ):
        listed = sh("docker", *ls, "--filter", f"label={key}",
                    "--format", f'{name} {{{{.Label "{key}"}}}}', check=False).stdout  # fmt: skip
        abandoned = [
            id_
            for id_, _, project in (line.partition(" ") for line in listed.splitlines())
            if (m := PROJECT.fullmatch(project)) and not Path(f"/proc/{m[1]}").exists()
        ]
        if abandoned:
            force = ["-f"] if kind == "container" else []
            sh("docker", kind, "rm", *force, *abandoned, check=False)


@pytest.fixture(scope="module")
def wheels_url(engine):
    """The project's dependencies as wheels, served to the image build on the docker bridge."""
    import tomllib

    deps = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    make_wheelhouse([*deps, "setuptools", "wheel"], WHEELHOUSE)
    gateway = bridge_gateway()
    handler = functools.partial(QuietHandler, directory=str(WHEELHOUSE))
    try:
        server = http.server.ThreadingHTTPServer((gateway, WHEELS_PORT), handler)
    except OSError:  # the port is taken: any port works, only the layer cache misses
        server = http.server.ThreadingHTTPServer((gateway, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{gateway}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def make_wheelhouse(requirements: list[str], folder: Path) -> None:
    """A folder with one wheel per package of the set pip resolves for ``requirements``: a link to
    each wheel pip found on this disk, a download of each it found on an index. Made again when
    the requirements change; an interrupted one leaves no marker and is made again too."""
    marker = folder / ".complete"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if marker.is_file() and marker.read_text() == digest:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    report = folder / "resolved.json"
    sh(sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
       "--only-binary=:all:", "--report", str(report), *requirements, timeout=900)  # fmt: skip
    remote = []
    for item in json.loads(report.read_text())["install"]:
        url = item["download_info"]["url"]
        if url.startswith("file://"):
            path = Path(unquote(urlsplit(url).path))
            (folder / path.name).symlink_to(path)
        else:
            remote.append(url)
    if remote:
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *remote,
           timeout=900)  # fmt: skip
    report.unlink()
    marker.write_text(digest)


def build(project: Project, timeout: float = 1500) -> None:
    """``docker-compose build`` of the test image; the image it replaces is removed (each one is
    several GB), and a machine without the disk to build it skips the container tests."""
    before = image_id(IMAGE)
    if not before:
        root = sh("docker", "info", "-f", "{{.DockerRootDir}}").stdout.strip()
        free = shutil.disk_usage(root).free
        if free < BUILD_DISK_BYTES:
            pytest.skip(f"building {IMAGE} needs {BUILD_DISK_BYTES / 1e9:.1f} GB free under "
                        f"{root}; {free / 1e9:.1f} GB are")  # fmt: skip
    project("build", "--force-rm", timeout=timeout)
    after = image_id(IMAGE)
    if before and after != before:
        sh("docker", "rmi", before, check=False)


def image_id(tag: str) -> str:
    out = sh("docker", "image", "inspect", tag, "-f", "{{.Id}}", check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def bridge_gateway() -> str:
    """The host's address on the default bridge, where build containers reach it (docker0; the
    daemon does not always fill IPAM's Gateway field)."""
    out = sh("ip", "-4", "-o", "addr", "show", "docker0").stdout
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
        return sh(*self.args, *argv, timeout=timeout, env=self.env, check=check)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        sh("docker", "cp", f"{self.container(service)}:{path}", str(dest))
        return dest

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "-t", "5", timeout=300, check=False)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return sh("docker", "ps", "-aq", "--filter", label).stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def owned(path: Path) -> Path:
    """A host folder the containers' user may write."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


_READ_LEDGER = """
import json, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except FileNotFoundError:
    lines = []
for line in lines:
    e = json.loads(line)
    print(json.dumps({k: e.get(k) for k in ("event", "direction", "phase")}))
"""


def site_messages(container: str, run_id: int, direction: str, phase: str) -> int:
    """How many messages of ``phase`` the site in ``container`` logged going ``direction`` in run
    ``run_id`` (its ledger ``/outputs/run-<id>/ledger.jsonl``; 0 before it exists)."""
    ledger = f"/outputs/run-{run_id}/ledger.jsonl"
    out = sh("docker", "exec", container, "python", "-c", _READ_LEDGER, ledger, check=False).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sum(
        e["event"] == "message" and e["direction"] == direction and e["phase"] == phase
        for e in entries
    )


def launched_run(log: Path, timeout: float = 180) -> int:
    """The run id ``crossprobe launch`` printed into ``log`` once it started the run."""
    found: list[int] = []

    def started() -> bool:
        match = re.search(r"\[launch\] run (\d+) started", log.read_text(errors="replace"))
        found.extend([int(match.group(1))] if match else [])
        return bool(found)

    wait_until(started, timeout, f"a run started by launch ({log})")
    return found[0]


def wait_until(pred, timeout: float, what: str, every: float = 1.0) -> float:
    """Poll ``pred`` until it is true; the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def expired_ca(ca_dir: Path) -> bytes:
    """The federation's CA certificate re-issued with its own key and subject but valid only until
    yesterday: what a site holds when its copy of the CA has expired (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(ca.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=1))
    )
    for ext in ca.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)
