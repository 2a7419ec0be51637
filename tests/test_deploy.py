"""Real deployment: certificates, preflight, the compose files, and the compose topology run
as real processes on 127.0.0.1 (CI has no Docker engine), its SuperLink port captured with tcpdump
and its ledgers audited with the registered keys."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from common.fl.audit import audit_run
from crossprobe.cli import app as crossprobe_cli
from deploy.argv import (
    clientapp_executor_argv,
    connection_toml,
    node_config,
    serverapp_executor_argv,
    superlink_argv,
    supernode_argv,
)
from deploy.certs import make_certs
from deploy.compose import APP_DIR, COMPOSE_FILES, render_compose
from deploy.launch import launch, register_keys, wait_tls
from simulations.demo_data import demo_data
from simulations.simulate import flower_env, started_processes
from tests.wire import Capture, WireReport

ROOT = APP_DIR
SITES = {"lumify": "source", "telemed": "target"}  # configs/tiny.yaml


# ------------------------------------------------------------------ compose files
def _compose(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("path", list(COMPOSE_FILES))
def test_compose_file_is_the_generated_one(path):
    expected = render_compose(path)
    # the committed file and the command lines in deploy/argv.py agree
    assert (ROOT / path).read_text() == expected, f"{path} is stale: run crossprobe compose --write"


def test_demo_compose_commands_come_from_the_one_place():
    services = _compose("docker-compose.yml")["services"]
    assert services["superlink"]["command"] == superlink_argv(
        "/certs", "0.0.0.0", 9093, "/state/state.db"
    )
    assert services["serverapp"]["command"] == serverapp_executor_argv("/certs", "superlink:9093")
    for site, role in SITES.items():
        nc = node_config(site, role, f"/data/{site}", "/outputs", "/certs/supernode.key")
        assert services[f"supernode-{site}"]["command"] == supernode_argv(
            "/certs", "superlink:9093", "0.0.0.0", 9094, nc
        )
        assert services[f"clientapp-{site}"]["command"] == clientapp_executor_argv(
            "/certs", f"supernode-{site}:9094"
        )


def test_each_site_data_volume_is_mounted_read_only_in_that_site_only():
    services = _compose("docker-compose.yml")["services"]
    # who mounts data-<site> (the init service writes it once, before anything starts)
    mounts = {
        (name, v.split(":")[0]): v for name, svc in services.items() for v in svc.get("volumes", [])
    }
    for site in SITES:
        users = {name for (name, vol) in mounts if vol == f"data-{site}"} - {"init"}
        assert users == {f"clientapp-{site}"}, f"data-{site} mounted in {users}"
        assert mounts[(f"clientapp-{site}", f"data-{site}")].endswith(":ro")
        keys = {name for (name, vol) in mounts if vol == f"certs-{site}"} - {"init"}
        assert keys == {f"supernode-{site}", f"clientapp-{site}"}
    assert services["init"]["command"][-1].count("--site") == len(SITES)


@pytest.mark.parametrize("path", list(COMPOSE_FILES))
def test_every_flower_service_uses_tls_and_nothing_is_insecure(path):
    spec = _compose(path)
    text = (ROOT / path).read_text()
    assert "--insecure" not in text and "insecure" not in text.lower()
    flower = {
        n: s["command"]
        for n, s in spec["services"].items()
        if s["command"][0].startswith(("flower-", "crossprobe-superlink"))
    }
    assert flower, path
    for name, cmd in flower.items():
        if cmd[0] == "crossprobe-superlink":
            assert {
                "--ssl-certfile",
                "--ssl-keyfile",
                "--ssl-ca-certfile",
                "--enable-supernode-auth",
            } <= set(cmd)
        elif cmd[0] == "flower-supernode":
            assert {"--root-certificates", "--auth-supernode-private-key", "--ssl-certfile"} <= set(
                cmd
            )
        else:
            assert "--root-certificates" in cmd, name
        if cmd[0] != "flower-supernode":
            assert "--superexec-auth-secret-file" in cmd, name
    for name, svc in spec["services"].items():
        assert svc.get("user") in (None, "root"), name
        assert svc["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1", name
        if svc.get("user") == "root":
            assert name == "init"


# ------------------------------------------------------------------ certs
def test_certs_creates_ca_server_cert_with_sans_and_p384_openssh_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    res = CliRunner().invoke(
        crossprobe_cli,
        [
            "certs",
            "--out",
            str(tmp_path),
            "--site",
            "lumify",
            "--site",
            "telemed",
            "--host",
            "fl.example.org",
        ],
    )
    assert res.exit_code == 0, res.output
    sl, site = tmp_path / "superlink", tmp_path / "sites" / "lumify"
    cert = x509.load_pem_x509_certificate((sl / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "superlink",
        "fl.example.org",
    }
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    priv = serialization.load_ssh_private_key((site / "supernode.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((site / "supernode.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert (site / "supernode.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert (sl / "supernodes" / "lumify.pub").read_bytes() == (site / "supernode.pub").read_bytes()
    rt = x509.load_pem_x509_certificate((site / "runtime.crt").read_bytes())
    rt_san = rt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "supernode-lumify" in rt_san.get_values_for_type(x509.DNSName)
    for private in (
        sl / "server.key",
        site / "supernode.key",
        site / "superexec.secret",
        tmp_path / "ca" / "ca.key",
    ):
        assert private.stat().st_mode & 0o077 == 0, private
    assert not (tmp_path / "sites" / "telemed" / "ca.key").exists()


def test_certs_rerun_keeps_existing_files_and_adds_a_site(tmp_path):
    make_certs(tmp_path, ["lumify"])
    before = (tmp_path / "sites" / "lumify" / "supernode.key").read_bytes()
    written = make_certs(tmp_path, ["lumify", "newsite"])
    assert (tmp_path / "sites" / "lumify" / "supernode.key").read_bytes() == before
    assert written and all("newsite" in str(p) for p in written)
    assert (
        CliRunner()
        .invoke(crossprobe_cli, ["certs", "--out", str(tmp_path), "--site", "Bad Name"])
        .exit_code
        != 0
    )


# ------------------------------------------------------------------ preflight
@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    return demo_data(ROOT / "configs" / "tiny.yaml", tmp_path_factory.mktemp("data"))[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _preflight(*args: str):
    return CliRunner().invoke(crossprobe_cli, ["preflight", "--timeout", "1", *args])


def test_preflight_ready_site_exits_0(tmp_path, site_data):
    make_certs(tmp_path / "certs", ["lumify"])
    res = _preflight("--data", str(site_data), "--certs", str(tmp_path / "certs/sites/lumify"),
                     "--flwr-home", str(tmp_path / "home"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ready" in res.output


def _break_data(tmp: Path, data: Path) -> tuple[list[str], str]:
    return ["--data", str(tmp / "nodata")], str(tmp / "nodata" / "dataset.yaml")


def _missing_key(tmp: Path, data: Path) -> tuple[list[str], str]:
    (tmp / "certs/sites/lumify/supernode.key").unlink()
    return ["--certs", str(tmp / "certs/sites/lumify")], "supernode.key"


def _wrong_pub(tmp: Path, data: Path) -> tuple[list[str], str]:
    other = (tmp / "certs/sites/telemed/supernode.pub").read_bytes()
    (tmp / "certs/sites/lumify/supernode.pub").write_bytes(other)
    return ["--certs", str(tmp / "certs/sites/lumify")], "supernode.key: does not match"


def _foreign_ca(tmp: Path, data: Path) -> tuple[list[str], str]:
    make_certs(tmp / "other", ["lumify"])
    for f in ("runtime.crt", "runtime.key"):
        (tmp / "certs/sites/lumify" / f).write_bytes((tmp / "other/sites/lumify" / f).read_bytes())
    return ["--certs", str(tmp / "certs/sites/lumify")], "runtime.crt: not signed by the CA"


def _expired_ca(tmp: Path, data: Path) -> tuple[list[str], str]:
    from tests.compose import expired_ca

    (tmp / "certs/sites/lumify/ca.crt").write_bytes(expired_ca(tmp / "certs/ca"))
    return ["--certs", str(tmp / "certs/sites/lumify")], "ca.crt: not valid now"


def _closed_port(tmp: Path, data: Path) -> tuple[list[str], str]:
    port = _free_port()
    return [
        "--superlink",
        f"127.0.0.1:{port}",
        "--certs",
        str(tmp / "certs/sites/lumify"),
    ], f"127.0.0.1:{port}"


def _no_tls(tmp: Path, data: Path) -> tuple[list[str], str]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts TCP, never speaks TLS
    _no_tls.sock = srv  # kept open for the call
    port = srv.getsockname()[1]
    return [
        "--superlink",
        f"127.0.0.1:{port}",
        "--certs",
        str(tmp / "certs/sites/lumify"),
    ], f"127.0.0.1:{port}"


def _passphrase_key(tmp: Path, data: Path) -> tuple[list[str], str]:
    from cryptography.hazmat.primitives import serialization as ser

    path = tmp / "certs/sites/lumify/runtime.key"
    key = ser.load_pem_private_key(path.read_bytes(), None)
    enc = ser.BestAvailableEncryption(b"open sesame")
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc))
    return ["--certs", str(tmp / "certs/sites/lumify")], f"{path}: a PEM private key is protected"


def _garbage_pem(tmp: Path, data: Path) -> tuple[list[str], str]:
    path = tmp / "certs/sites/lumify/runtime.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return ["--certs", str(tmp / "certs/sites/lumify")], f"{path}: not a PEM certificate"


def _empty_manifest(tmp: Path, data: Path) -> tuple[list[str], str]:
    site = tmp / "site"
    shutil.copytree(data, site)
    manifest = site / "manifest.csv"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")
    return ["--data", str(site)], "no frames"


def _bomb_frame(tmp: Path, data: Path) -> tuple[list[str], str]:
    from tests.test_data_manifest import bomb_png

    site = tmp / "site"
    shutil.copytree(data, site)
    frame = next((site / "frames").rglob("*.png"))
    bomb_png(frame)
    return ["--data", str(site)], f"refusing {frame}"


def _home_is_a_file(tmp: Path, data: Path) -> tuple[list[str], str]:
    (tmp / "afile").write_text("x")
    return ["--flwr-home", str(tmp / "afile" / "home")], str(tmp / "afile" / "home")


@pytest.mark.parametrize(
    ("breaker", "code"),
    [(_break_data, 10), (_empty_manifest, 10), (_bomb_frame, 10), (_missing_key, 11),
     (_wrong_pub, 12), (_foreign_ca, 12), (_expired_ca, 12), (_passphrase_key, 12),
     (_garbage_pem, 12),
     (_closed_port, 13), (_no_tls, 14), (_home_is_a_file, 15)],
    ids=["data", "empty-manifest", "bomb-frame", "missing-key", "key-mismatch", "foreign-ca",
         "expired-ca", "passphrase-key", "garbage-pem", "unreachable", "no-tls", "flwr-home"],
)  # fmt: skip
def test_preflight_failure_class_has_its_exit_code_and_names_the_culprit(
    tmp_path, site_data, breaker, code
):
    # a ready site, then break one thing
    make_certs(tmp_path / "certs", ["lumify", "telemed"])
    args, culprit = breaker(tmp_path, site_data)
    if "--flwr-home" not in args:
        args += ["--flwr-home", str(tmp_path / "home")]
    res = _preflight(*args)
    assert res.exit_code == code, res.output
    assert culprit in res.output
    with contextlib.suppress(AttributeError):
        _no_tls.sock.close()


def test_launch_keeps_waiting_through_a_superlink_restart_and_gives_up_on_one_that_stays_away(
    monkeypatch,
):
    import deploy.launch as launch_mod

    answers = iter(
        [{"runs": [{"status": "running"}]}, "down", "down", {"runs": []},
         {"runs": [{"status": "running"}]}, {"runs": [{"status": "finished:completed"}]}]
    )  # fmt: skip

    def flwr_json(args, env, **kw):
        ans = next(answers)
        if ans == "down":
            raise launch_mod.LaunchError("flwr ls: no JSON (exit 1): connection refused")
        return ans

    monkeypatch.setattr(launch_mod, "flwr_json", flwr_json)
    said: list[str] = []
    entry = launch_mod._wait_for_end(7, {}, timeout=0, poll=0, say=said.append)
    assert entry["status"] == "finished:completed"
    assert said == ["[launch] run 7: running (0 s)", "[launch] run 7: finished:completed (0 s)"]
    # a SuperLink that never comes back ends the wait with a clear error, not a hang
    monkeypatch.setattr(launch_mod, "SUPERLINK_AWAY", 0.05)
    monkeypatch.setattr(
        launch_mod, "flwr_json", lambda *a, **k: (_ for _ in ()).throw(launch_mod.LaunchError("x"))
    )
    with pytest.raises(launch_mod.LaunchError, match="run 7: no status for 0 s"):
        launch_mod._wait_for_end(7, {}, timeout=0, poll=0.01, say=said.append)


# ------------------------------------------------------------------ the topology as processes
class Topology:
    """Processes of one deployment on 127.0.0.1, each in its own process group and FLWR_HOME."""

    def __init__(self, root: Path):
        self.root, self.procs, self.homes = root, {}, []
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, name: str) -> dict[str, str]:
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        self.homes.append(home)
        env = flower_env(home)  # FLWR_HOME, no runtime installs, no telemetry, no update check
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        return env

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.root / "logs" / f"{name}.log").open("w")
        p = subprocess.Popen(argv, env=self.env(name), cwd=self.root, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs[name] = p
        return p

    def run(self, name: str, argv: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env(name), cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)  # fmt: skip

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                p.poll() is None for p in self.procs.values()
            ):
                time.sleep(0.1)
        for home in self.homes:  # anything that left its process group (ClientApp/ServerApp runs)
            from simulations.simulate import stop_processes

            stop_processes(home)

    def leftovers(self) -> list[int]:
        return sorted({pid for h in self.homes for pid in started_processes(h)})


@pytest.fixture
def topology(tmp_path):
    topo = Topology(tmp_path)
    try:
        yield topo
    finally:
        topo.stop()


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


CAN_CAPTURE = shutil.which("tcpdump") is not None and os.geteuid() == 0
WIRE_OVERHEAD = 0.10  # TLS, HTTP/2, gRPC and Flower framing, on top of what the ledgers account
WIRE_FIXED = 8 * 2**20  # bytes: the FAB to every node, TLS handshakes, heartbeats and polling


def _check_wire(wire: WireReport, port: int, ledgered: int) -> None:
    """Every byte on the SuperLink's port was TLS (but the refused plaintext client's), and the
    bytes that crossed are what the ledgers account for: each array crosses the port twice
    (ServerApp → SuperLink → SuperNode, and back), plus a stated overhead."""
    plain = [s for s in wire.streams if s.non_tls]
    # `flower-supernode --insecure` speaks Flower's REST transport: an HTTP/1 POST, refused
    assert plain and all(s.dst[1] == port and "plaintext HTTP" in s.non_tls for s in plain), (
        wire.non_tls
    )
    tls = [s for s in wire.streams if not s.non_tls and s.payload_bytes]
    assert all(s.tls_records and set(s.tls_types) <= {20, 21, 22, 23} for s in tls)
    on_wire = sum(s.payload_bytes for s in tls)
    print(
        f"wire: {len(tls)} TLS streams, {on_wire} B on port {port}; ledgers: {ledgered} B of "
        f"arrays; wire / (2 x ledgers) = {on_wire / (2 * ledgered):.3f}"
    )
    assert 2 * ledgered <= on_wire <= 2 * ledgered * (1 + WIRE_OVERHEAD) + WIRE_FIXED


@pytest.mark.slow
def test_compose_topology_as_processes_tls_auth_and_a_completed_run(topology, tmp_path):
    # certificates (plus a key nobody registers), each site's data in its own folder
    certs = tmp_path / "certs"
    make_certs(certs, [*SITES, "rogue"])
    data = {p.parent.name: p for p in demo_data(ROOT / "configs" / "tiny.yaml", tmp_path / "data")}
    port = _free_port()
    if os.environ.get("CI") == "true":
        assert CAN_CAPTURE, "CI captures the wire: .ci/run installs tcpdump and runs as root"
    with contextlib.ExitStack() as stack:
        capture = None
        if CAN_CAPTURE:  # the SuperLink's one port, from before it starts
            capture = stack.enter_context(Capture(tmp_path / "superlink.pcap", [port]))
        _run_topology(topology, tmp_path, certs, data, port, capture)


def _run_topology(topology, tmp_path, certs, data, port, capture) -> None:
    superlink = f"127.0.0.1:{port}"
    sl_certs = str(certs / "superlink")
    topology.start(
        "superlink", superlink_argv(sl_certs, "127.0.0.1", port, str(tmp_path / "state.db"))
    )
    wait_tls(superlink, certs / "superlink" / "ca.crt", 60)
    topology.start("serverapp", serverapp_executor_argv(sl_certs, superlink))
    cli_env = topology.env("cli")
    (Path(cli_env["FLWR_HOME"]) / "config.toml").write_text(
        connection_toml(superlink, str(certs / "superlink" / "ca.crt"))
    )
    keys = {s: certs / "superlink" / "supernodes" / f"{s}.pub" for s in SITES}
    assert set(register_keys(keys, cli_env)) == set(SITES)
    for site, role in SITES.items():
        rport, sc = _free_port(), str(certs / "sites" / site)
        nc = node_config(site, role, str(data[site]), str(tmp_path / "outputs" / site),
                         f"{sc}/supernode.key")  # fmt: skip
        topology.start(f"supernode-{site}", supernode_argv(sc, superlink, "127.0.0.1", rport, nc))
        topology.start(f"clientapp-{site}", clientapp_executor_argv(sc, f"127.0.0.1:{rport}"))
    for site in SITES:
        _wait_for(
            lambda s=site: "SuperNode ID" in topology.log(f"supernode-{s}"),
            60,
            f"{site} did not connect",
        )

    # a SuperNode whose key was never registered is refused
    rogue = topology.run("rogue", supernode_argv(
        str(certs / "sites" / "rogue"), superlink, "127.0.0.1", _free_port(),
        node_config("rogue", "source", str(data["lumify"]), str(tmp_path / "rogue"),
                    str(certs / "sites" / "rogue" / "supernode.key")), max_retries=1,
    ))  # fmt: skip
    assert rogue.returncode != 0 and "Failed to activate SuperNode" in rogue.stdout + rogue.stderr
    assert "No SuperNode found with the given public key" in topology.log("superlink")
    # a plaintext client cannot talk to the TLS SuperLink
    plain = topology.run("plain", ["flower-supernode", "--insecure", "--superlink", superlink,
                                   "--isolation", "process", "--port", str(_free_port()),
                                   "--max-retries", "1", "--max-wait-time", "10"])  # fmt: skip
    assert (
        plain.returncode != 0 and "could not establish a connection" in plain.stdout + plain.stderr
    )

    # the tiny study through flwr run, status from flwr ls (keys already registered)
    t0 = time.monotonic()
    entry = launch(
        superlink, certs / "superlink" / "ca.crt", keys,
        f'run-dir="{tmp_path / "results"}" node-wait=60 '
        f'experiment="{ROOT / "configs" / "tiny.yaml"}" site-keys="{sl_certs}/supernodes"',
        cli_env, timeout=540, say=lambda s: print(s, flush=True),
    )  # fmt: skip
    print(f"deployment run: {time.monotonic() - t0:.0f} s")
    assert entry["status"] == "finished:completed", (entry, topology.log("serverapp")[-3000:])
    assert (tmp_path / "results" / "report.md").is_file()
    assert (tmp_path / "outputs" / "telemed").is_dir()  # site-local artifacts stayed at the site
    # the audit with the keys the SuperLink registered: every reply signed by its site
    report = audit_run(
        tmp_path / "results",
        [tmp_path / "outputs" / s for s in SITES],
        keys=certs / "superlink" / "supernodes",
    )
    assert report.ok and report.checked["signatures"] == 11, report.render()
    topology.stop()
    assert topology.leftovers() == []
    if capture is not None:
        ledgered = sum(n for (party, _, _), n in report.bytes.items() if party == "server")
        wire = capture.stop()
        print(f"tcpdump: {capture.summary}")
        _check_wire(wire, port, ledgered)
