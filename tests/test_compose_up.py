"""`docker-compose up --build` of the two-site demo, for real: the image built from the project's
Dockerfile, one container per role, TLS, SuperNode auth, signed replies — to `launch` exiting 0,
then the report copied out of the results volume and `crossprobe audit` run on the server ledger
and on each site's ledger taken from that site's own volume. Then, on the same containers, the
faults a hospital network brings (docs/deployment.md, "When things fail"), and the coordinator and
three hospitals as separate compose projects.

Needs a Docker engine (`deploy/docker-engine.sh`; `.ci/run` runs it); tests/compose.py builds the
image from the wheels on this machine's disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from common.fl.audit import audit_run
from deploy.argv import node_config, supernode_argv
from deploy.compose import APP_DIR
from tests.compose import (
    IMAGE,
    UID,
    Project,
    build,
    expired_ca,
    free_port,
    launched_run,
    owned,
    sh,
    site_messages,
    wait_until,
)

SITES = ("lumify", "telemed")  # configs/tiny.yaml
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(engine, wheels_url):
    env = {
        **os.environ,
        "CROSSPROBE_EXPERIMENT": "configs/tiny.yaml",
        "CROSSPROBE_WHEELS_URL": wheels_url,
        "CROSSPROBE_IMAGE": IMAGE,
        "COMPOSE_HTTP_TIMEOUT": "600",
    }
    project = Project(f"crossprobe-ci-{os.getpid()}", env)
    try:
        yield project
    finally:
        project.down()


@pytest.fixture(scope="module")
def calm(demo, tmp_path_factory) -> dict:
    """What the README says a user does: build, `up`, wait for `launch` to exit; the run is left
    up for the fault test. Returns what came of it (the report copied out of its volume)."""
    out = tmp_path_factory.mktemp("calm")
    t0 = time.monotonic()
    build(demo)
    built = time.monotonic() - t0
    image = int(sh("docker", "image", "inspect", IMAGE, "-f", "{{.Size}}").stdout)
    t1 = time.monotonic()
    demo("up", "-d", timeout=600)  # init (certs, data) first; the rest once it exited 0
    launch = demo.container("launch")
    assert launch, demo("ps").stdout
    code = int(sh("docker", "wait", launch, timeout=900).stdout.strip())
    finished = time.monotonic() - t1
    print(f"compose: image {image / 1e6:.0f} MB built in {built:.0f} s; "
          f"up to launch exiting {code} in {finished:.0f} s")  # fmt: skip
    logs = demo("logs", "--no-color", "launch", check=False).stdout
    if code != 0:
        logs += demo("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]
    results = out / "results"
    if code == 0:
        demo.copy_out("serverapp", "/results/demo", results)
    return {"code": code, "logs": logs, "results": results, "out": out}


def test_docker_compose_up_runs_the_demo_to_completed_and_its_ledgers_audit_clean(demo, calm):
    assert calm["code"] == 0, f"launch exited {calm['code']}:\n{calm['logs'][-8000:]}"
    assert "finished:completed" in calm["logs"], calm["logs"][-2000:]
    # what a user does next: the report out of the results volume, each ledger out of its volume
    results = calm["results"]
    assert (results / "report.md").is_file() and (results / "results.json").is_file()
    keys = demo.copy_out("serverapp", "/certs/supernodes", calm["out"] / "keys")
    outputs = [
        demo.copy_out(f"clientapp-{s}", "/outputs", calm["out"] / f"outputs-{s}") for s in SITES
    ]
    report = audit_run(results, outputs, keys=keys)
    assert report.ok and report.checked["signatures"] == 11, report.render()


# ------------------------------------------------------------------ faults
# well above the calm run's rounds, and above a site that needs two restarts to come back
FAULT_RUN_CONFIG = "timeout-train=600 timeout-evaluate=180"
HEARTBEAT_LAPSE = 75  # seconds: longer than Flower's heartbeat patience (2 x 30 s)


def _dice(results: Path) -> dict:
    tables = json.loads((results / "results.json").read_text())["tables"]
    return {site: {m: row["dice"] for m, row in t.items()} for site, t in tables.items()}


def _rogue_sites(demo: Project, certs: Path, tmp_path: Path) -> dict[str, tuple[list, str]]:
    """Site containers that must not get in: (volume folder or "", argv, what Flower says)."""
    expired = tmp_path / "expired-ca"
    expired.mkdir()
    for f in (certs / "sites" / "telemed").iterdir():
        (expired / f.name).write_bytes(f.read_bytes())
    (expired / "ca.crt").write_bytes(expired_ca(certs / "ca"))
    sh("chown", "-R", f"{UID}:{UID}", str(expired))
    telemed = node_config("telemed", "target", "/data", "/outputs", "/certs/supernode.key")
    argv = [*supernode_argv("/certs", "superlink:9093", "0.0.0.0", 9094, telemed, max_retries=1),
            "--max-wait-time", "15"]  # fmt: skip
    return {
        "another site's key": (certs / "sites" / "lumify", argv, "Failed to activate SuperNode"),
        "an expired CA certificate": (expired, argv, "certificate has expired"),
        "plaintext": (None, ["flower-supernode", "--insecure", "--superlink", "superlink:9093",
                             "--isolation", "process", "--max-retries", "1", "--max-wait-time",
                             "15"], "could not establish a connection"),
    }  # fmt: skip


def test_a_hospital_network_cut_a_killed_supernode_and_a_superlink_restart_leave_the_study_as_if_uninterrupted(  # noqa: E501
    demo, calm, tmp_path
):
    assert calm["code"] == 0, "the uninterrupted run failed; see the demo test"
    net = f"{demo.name}_default"
    certs = demo.copy_out("init", "/init/certs", tmp_path / "certs")
    sh("chown", "-R", f"{UID}:{UID}", str(certs))
    # a site started with another site's key, an expired CA certificate, or plaintext: refused
    # by the SuperLink (or refusing it) before it joins; the federation does not notice
    for i, (what, (folder, argv, says)) in enumerate(_rogue_sites(demo, certs, tmp_path).items()):
        mount = ["-v", f"{folder}:/certs:ro"] if folder else []
        rogue = sh("docker", "run", "--rm", "--name", f"{demo.name}-rogue-{i}", "--label",
                   f"com.docker.compose.project={demo.name}", "--network", net, *mount, IMAGE,
                   *argv, timeout=180, check=False)  # fmt: skip
        said = rogue.stdout + rogue.stderr
        assert rogue.returncode != 0 and says in said, f"{what}: exit {rogue.returncode}\n{said}"
    # the same study again, through three faults; each recovery timed from the fault's end
    env = {**demo.env, "CROSSPROBE_RUN_NAME": "faults", "CROSSPROBE_RUN_CONFIG": FAULT_RUN_CONFIG}
    runs = Project(demo.name, env)
    launch_log = tmp_path / "launch-1.log"
    with launch_log.open("w") as log:
        first = subprocess.Popen([*runs.args, "run", "--rm", "--no-deps", "launch"], cwd=APP_DIR,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        run_id = launched_run(launch_log)
        try:
            recovery = _inject_faults(demo, net, run_id)
        except TimeoutError as e:  # what the run said, to tell a slow machine from a stuck run
            said = [f"--- launch\n{launch_log.read_text()[-3000:]}"]
            for service in ("serverapp", "supernode-telemed", "clientapp-telemed", "superlink"):
                logs = demo("logs", "--no-color", "--tail", "40", service, check=False).stdout
                said.append(f"--- {service}\n{logs[-4000:]}")
            raise AssertionError("\n".join([str(e), *said])) from e
        # lumify's SuperNode stopped mid-evaluation and not back within timeout-evaluate: the run
        # ends, and FAILED.json names the site and the phase
        lumify = demo.container("clientapp-lumify")
        wait_until(lambda: site_messages(lumify, run_id, "in", "evaluate") >= 1, 300, "evaluation")
        stopped = time.monotonic()
        sh("docker", "stop", "-t", "5", demo.container("supernode-lumify"))
        assert first.wait(timeout=600) != 0, launch_log.read_text()[-3000:]
        recovery["site gone past the timeout (ends)"] = time.monotonic() - stopped
    finally:
        if first.poll() is None:
            first.kill()
    failed = demo("exec", "-T", "serverapp", "cat", "/results/faults/FAILED.json").stdout
    failed = json.loads(failed)
    assert "'lumify'" in failed["error"] and "'evaluate'" in failed["error"], failed
    assert failed["completed"] == ["pretrain", "finetune"], failed
    # the site back, `launch` again: it resumes after the last completed phase
    sh("docker", "start", demo.container("supernode-lumify"))
    t = time.monotonic()
    again = runs("run", "--rm", "--no-deps", "launch", timeout=900, check=False)
    assert again.returncode == 0 and "finished:completed" in again.stdout, again.stdout[-4000:]
    recovery["rerun launch (evaluate only)"] = time.monotonic() - t
    results = demo.copy_out("serverapp", "/results/faults", tmp_path / "results")
    phases = json.loads((results / "results.json").read_text())["phases"]
    assert [p["phase"] for p in phases if p["resumed"]] == ["pretrain", "finetune"], phases
    assert _dice(results) == _dice(calm["results"])  # as if nothing had happened
    server = [json.loads(line) for line in (results / "ledger.jsonl").read_text().splitlines()]
    lost = {(e["site"], e["phase"]) for e in server if e.get("event") == "abandoned"}
    assert {("telemed", "pretrain"), ("lumify", "finetune"), ("lumify", "evaluate")} <= lost
    keys = demo.copy_out("serverapp", "/certs/supernodes", tmp_path / "keys")
    outputs = [demo.copy_out(f"clientapp-{s}", "/outputs", tmp_path / f"out-{s}") for s in SITES]
    report = audit_run(results, outputs, keys=keys)
    assert report.ok, report.render()
    print("faults: " + "; ".join(f"{k} {v:.0f} s" for k, v in recovery.items()))
    demo.down()
    assert demo.leftovers() == []  # nothing left running, the rogue sites' containers included


def _inject_faults(demo: Project, net: str, run_id: int) -> dict[str, float]:
    """During the run `launch` started: cut telemed's network mid-pretraining for longer than
    its heartbeat, kill lumify's SuperNode mid-fine-tuning and start it again, restart the
    SuperLink (its state volume kept). Returns the seconds from each fault's end until the run
    moved on (the site got its job again; for the SuperLink, the next phase began)."""
    sites = {s: demo.container(f"clientapp-{s}") for s in SITES}
    supernodes = {s: demo.container(f"supernode-{s}") for s in SITES}

    def jobs(site: str, phase: str) -> int:
        return site_messages(sites[site], run_id, "in", phase)

    recovery = {}
    wait_until(lambda: jobs("telemed", "pretrain") >= 1, 300, "telemed's first pretraining job")
    sh("docker", "network", "disconnect", net, supernodes["telemed"])
    time.sleep(HEARTBEAT_LAPSE)
    sh("docker", "network", "connect", "--alias", "supernode-telemed", net, supernodes["telemed"])
    n = jobs("telemed", "pretrain")
    recovery["network cut 75 s (pretrain)"] = wait_until(
        lambda: jobs("telemed", "pretrain") > n, 300, "telemed's pretraining job sent again"
    )
    wait_until(lambda: jobs("lumify", "finetune") >= 1, 700, "lumify's first fine-tuning job")
    sh("docker", "kill", supernodes["lumify"])
    sh("docker", "start", supernodes["lumify"])
    n = jobs("lumify", "finetune")
    recovery["SuperNode killed (finetune)"] = wait_until(
        lambda: jobs("lumify", "finetune") > n, 400, "lumify's fine-tuning job sent again"
    )
    sh("docker", "restart", "-t", "5", demo.container("superlink"))
    recovery["SuperLink restarted (finetune)"] = wait_until(
        lambda: jobs("telemed", "evaluate") + jobs("lumify", "evaluate") >= 1, 400, "evaluation"
    )
    return recovery


# ------------------------------------------------------------------ separate hospitals
HOSPITALS = {"lumify": "source", "telemed": "target", "telemed2": "target"}  # tiny-3sites


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

    build(demo)  # the same image (cached after the demo test)
    config = "configs/tiny-3sites.yaml"
    certs = tmp_path / "certs"  # the coordinator's name in the server certificate's SAN
    make_certs(certs, list(HOSPITALS), hosts=["coordinator"])
    sh("chown", "-R", f"{UID}:{UID}", str(certs))  # as `crossprobe certs --owner` does
    data = {p.parent.name: p for p in demo_data(APP_DIR / config, owned(tmp_path / "data"))}
    sh("chown", "-R", f"{UID}:{UID}", str(tmp_path / "data"))
    port = free_port()
    base = {**demo.env, "CROSSPROBE_EXPERIMENT": config, "CROSSPROBE_RUN_NAME": "ci"}
    coordinator = Project(
        f"{demo.name}-coordinator",
        {**base, "SUPERLINK_CERTS": str(certs / "superlink"), "SUPERLINK_PORT": str(port),
         "RESULTS_DIR": str(owned(tmp_path / "results"))},
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
            "SITE_OUTPUTS": str(owned(tmp_path / "out" / site)),
        }
        hospital = Project(f"{demo.name}-{site}", env, ("deploy/site.compose.yml", str(joins)))
        hospitals.append(hospital)
        hospital("up", "-d", timeout=300)
    networks = {
        sh("docker", "inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}"
            "{{end}}", p.container("superlink" if p is coordinator else "supernode")).stdout
        for p in hospitals
    }  # fmt: skip
    assert len(networks) == len(hospitals)  # four projects, four networks
    t = time.monotonic()
    launch = coordinator("--profile", "run", "run", "--rm", "launch", timeout=900, check=False)
    if launch.returncode != 0:  # e.g. "No heartbeat received from the task": say why it stopped
        tails = ("logs", "--no-color", "--tail", "60", "serverapp", "superlink")
        logs = coordinator(*tails, check=False)
        pytest.fail(launch.stdout[-4000:] + launch.stderr[-4000:] + logs.stdout[-12000:])
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
