"""Only weights cross: the guard refuses smuggling on the site, every party keeps a hash-chained
ledger, and `crossprobe audit` verifies chains, contract, model schema and site-vs-server agreement.

Runs the real ServerApp main and the real ClientApp (with its guard mod) in process
(tests/fl_harness.py) on configs/tiny.yaml with 2 steps per stage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load_file
from typer.testing import CliRunner

from clients.app import app as client_app
from clients.site import known_site
from common.config import dump_experiment, load_experiment
from common.fl import audit, contract, ledger, messages, schema
from common.fl.describe import describe
from server.app import app as server_app
from server.workflow import WorkflowError
from tests.fl_harness import InProcessGrid, run_server, sign_as_site, site_grid, task_identity

STEPS = {f"{s}.optim.max_steps": 2 for s in ("simmim", "contrastive", "finetune")}


# ------------------------------------------------------------------ file reads, via audit hooks
class _Reads:
    """Every file or folder opened in this process while ``active``, with the node handling a
    message at that moment (None = the server). Python audit hooks see every ``open`` (builtins,
    io, os, PIL, numpy) and directory listing; a hook cannot be removed, so it goes inert."""

    active = False
    node: int | None = None
    seen: list[tuple[int | None, str]] = []

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not cls.active or event not in ("open", "os.listdir", "os.scandir"):
            return
        path = args[0] if args else None
        if isinstance(path, str | bytes | os.PathLike):
            cls.seen.append((cls.node, os.path.abspath(os.fsdecode(path))))


_HOOKED: list[bool] = []


def _record_reads(grid: InProcessGrid) -> None:
    if not _HOOKED:
        sys.addaudithook(_Reads.hook)
        _HOOKED.append(True)
    handle = grid._handle

    def traced(msg):
        _Reads.node = msg.metadata.dst_node_id
        try:
            return handle(msg)
        finally:
            _Reads.node = None

    grid._handle = traced


# ------------------------------------------------------------------ fixtures
def _experiment(tmp: Path, name: str) -> Path:
    cfg = load_experiment("configs/tiny.yaml", overrides=STEPS)
    path = tmp / f"{name}.yaml"
    path.write_text(dump_experiment(cfg.model_copy(update={"name": name})))
    return path


def _grid(exp: Path, run_dir: Path, sites_root: Path, n: int = 2, **rc) -> InProcessGrid:
    return site_grid(client_app, exp, run_dir, sites_root, n, **rc)


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    from simulations.sites import ensure_site

    root = tmp_path_factory.mktemp("sites")
    cfg = load_experiment("configs/tiny.yaml")
    for site in cfg.sites:
        ensure_site(site, cfg.model.img_size, root, progress=False)
    return root


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, sites_root):
    """One complete tiny run (shared by the tests that only read it), file reads recorded."""
    tmp = tmp_path_factory.mktemp("clean")
    grid = _grid(_experiment(tmp, "clean"), tmp / "run", sites_root)
    _record_reads(grid)
    _Reads.seen, _Reads.active = [], True
    try:
        with task_identity():
            run_server(server_app, grid)
    finally:
        _Reads.active = False
    return tmp / "run", grid, list(_Reads.seen)


def _copy(run: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("phases"))
    return dst


def _audit_cli(*args: str):
    from crossprobe.cli import app

    return CliRunner().invoke(app, ["audit", *args])


# ------------------------------------------------------------------ a clean run
def test_clean_run_audits_clean_and_counts_exactly_the_exchanged_weights(clean_run):
    run, _, _ = clean_run
    cfg = load_experiment(run / "config.yaml")
    enc = schema.schema_bytes(schema.model_schema(cfg, contract.ENCODER))
    mdl = schema.schema_bytes(schema.model_schema(cfg, contract.MODEL))

    def saved(phase: str) -> int:  # what the server kept of each phase, as state dicts
        return sum(
            t.numel() * t.element_size()
            for f in sorted((run / "phases" / phase).glob("*.safetensors"))
            for t in load_file(str(f)).values()
        )

    report = audit.audit_run(run)
    assert report.ok, report.render()
    # 11 requests + replies: 2 query, 2 pretrain, 4 finetune, 3 evaluate (2 test + source val)
    assert len(report.ledgers) == 3 and report.checked["matched messages"] == 22
    server = {(ph, d): n for (party, ph, d), n in report.bytes.items() if party == ledger.SERVER}
    assert server["pretrain", "in"] == saved("pretrain") == 2 * enc  # SimMIM + MT-NXent encoders
    assert server["finetune", "in"] == saved("finetune") == 4 * mdl  # simmim, mtnxent, lower, upper
    assert server["finetune", "out"] == 2 * enc  # the two encoders go to the source
    # four models to each of two sites' test frames + the fused pair to the source's validation
    assert server["evaluate", "out"] == (2 * 4 + 2) * mdl
    assert server["evaluate", "in"] == server["discover", "in"] == server["pretrain", "out"] == 0
    assert report.model_bytes == {"encoder": enc, "model": mdl}
    # every site logged the bytes it sent; they add up to what the server received
    sent = sum(
        n for (party, _, d), n in report.bytes.items() if party.startswith("site:") and d == "out"
    )
    assert sent == server["pretrain", "in"] + server["finetune", "in"]


def test_audit_command_passes_on_the_clean_run(clean_run):
    run, _, _ = clean_run
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_OK, result.output
    assert "PASS" in result.output and "model sizes" in result.output
    # a site can audit its own ledger alone
    site = _audit_cli("--site", str(run / "sites" / "telemed"))
    assert site.exit_code == audit.EXIT_OK and "PASS" in site.output, site.output


def test_each_site_reads_only_its_own_data_folder(clean_run, sites_root):
    run, grid, reads = clean_run
    root = str(sites_root.resolve())
    own = {
        node: str((sites_root / known_site(ctx).name).resolve())
        for node, ctx in grid.contexts.items()
    }
    under_root = [
        (node, path) for node, path in reads if path == root or path.startswith(root + os.sep)
    ]
    # something was read, only by the site it belongs to, never by the server
    assert {node for node, _ in under_root} == set(own)
    strays = [
        (node, path)
        for node, path in under_root
        if node is None or not (path == own[node] or path.startswith(own[node] + os.sep))
    ]
    assert strays == []


# ------------------------------------------------------------------ tampering
def _tamper(lines: list[str], how: str, k: int) -> list[str]:
    if how == "edit":
        entry = json.loads(lines[k - 1])
        entry["time"] = "2000-01-01T00:00:00.000Z"
        lines[k - 1] = ledger.canonical(entry)
    elif how == "delete":
        del lines[k - 1]
    elif how == "reorder":
        lines[k - 1], lines[k] = lines[k], lines[k - 1]
    elif how == "insert":
        lines.insert(k - 1, lines[k])
    return lines


@pytest.mark.parametrize("ledger", ["ledger.jsonl", "sites/lumify/ledger.jsonl"])
@pytest.mark.parametrize("how", ["edit", "delete", "reorder", "insert"])
def test_a_changed_ledger_line_fails_the_audit_naming_the_line(clean_run, tmp_path, how, ledger):
    run = _copy(clean_run[0], tmp_path)
    path = run / ledger
    lines = _tamper(path.read_text().splitlines(), how, 4)
    path.write_text("\n".join(lines) + "\n")
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_CHAIN, result.output
    assert f"{path}:4:" in result.output and "CHAIN BROKEN" in result.output


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda e: e.update(records=float("inf")), id="Infinity"),
        pytest.param(lambda e: e.pop("direction"), id="missing-direction"),
        pytest.param(lambda e: e.update(records=[{"type": "ArrayRecord"}]), id="nameless-record"),
        pytest.param(lambda e: e.update(src_node="7"), id="node-as-string"),
    ],
)
def test_a_malformed_ledger_line_is_an_edit_not_a_crash(clean_run, tmp_path, how):
    run = _copy(clean_run[0], tmp_path)
    path = run / "sites" / "telemed" / "ledger.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    how(entry)
    entry["hash"] = ledger.entry_hash({k: v for k, v in entry.items() if k != "records"})
    lines[2] = json.dumps(entry)  # json.dumps writes inf as Infinity, as an attacker could
    path.write_text("\n".join(lines) + "\n")
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_CHAIN, result.output
    assert f"{path}:3: not a valid entry" in result.output


def test_a_torn_last_line_is_a_crash_and_the_next_append_repairs_it(clean_run, tmp_path):
    run = _copy(clean_run[0], tmp_path)
    path = run / "sites" / "lumify" / "ledger.jsonl"
    data = path.read_bytes()
    n_lines = data.count(b"\n")
    path.write_bytes(data + b'{"event": "message", "time": "20')  # killed mid-write
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_TORN, result.output
    assert f"{path}:{n_lines + 1}: the last line" in result.output
    assert "CHAIN BROKEN" not in result.output
    written = ledger.Ledger(path).append({"event": "note", "n": 1})
    lf = ledger.read_ledger(path)
    assert lf.chain_error == "" and lf.torn == ""
    assert [e["event"] for _, e in lf.entries[-2:]] == ["repair", "note"]
    assert lf.entries[-1][1] == written
    assert path.with_name("ledger.jsonl.torn").read_bytes().startswith(b'{"event": "message"')
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_OK, result.output
    assert "repaired after a crash" in result.output


def test_a_message_a_crashed_site_never_logged_is_an_incomplete_exchange(clean_run, tmp_path):
    run = _copy(clean_run[0], tmp_path)
    server = run / "ledger.jsonl"
    entries = [json.loads(line) for line in server.read_text().splitlines()]
    sent = next(e for e in entries if e.get("message_type") == contract.EVALUATE_SEGMENT)
    lost = {
        **{k: v for k, v in sent.items() if k not in ("seq", "prev", "hash")},
        "group_id": "evaluate/telemed/telemed/r9",
        "message_id": "lost-in-a-crash",
    }
    ledger.Ledger(server).append(lost)
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_OK, result.output
    assert "INCOMPLETE exchange" in result.output and "r9" in result.output
    assert "MISMATCH" not in result.output


@pytest.mark.parametrize("site_logged_the_request", [True, False])
def test_an_error_reply_flower_sent_for_a_killed_clientapp_is_an_incomplete_exchange(
    clean_run, tmp_path, site_logged_the_request
):
    # SIGTERM mid-job: the site's ClientApp dies inside the handler, Flower's runtime answers the
    # server with an error reply in the node's name, and the site's guard never logs a reply
    run = _copy(clean_run[0], tmp_path)
    server, site = run / "ledger.jsonl", run / "sites" / "telemed" / "ledger.jsonl"
    strip = lambda e: {k: v for k, v in e.items() if k not in ("seq", "prev", "hash")}  # noqa: E731
    request = next(
        strip(json.loads(line))
        for line in server.read_text().splitlines()
        if '"train.finetune"' in line and '"direction":"out"' in line and "telemed" in line
    )
    request.update(group_id="finetune/upper/telemed/r9", message_id="killed-mid-job")
    reason = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly'>"
    reply = {
        **request,
        "direction": "in",
        "src_node": request["dst_node"],
        "dst_node": request["src_node"],
        "message_id": "runtime-error",
        "reply_to": "killed-mid-job",
        "records": [],
        "error": reason,
    }
    ledger.Ledger(server).append(request)
    ledger.Ledger(server).append(reply)
    if site_logged_the_request:
        ledger.Ledger(site).append({**request, "party": "site", "direction": "in"})
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_OK, result.output
    assert "MISMATCH" not in result.output
    assert "an error reply to train.finetune (finetune/upper/telemed/r9)" in result.output
    assert "ActorDiedError" in result.output


def test_an_unlogged_reply_with_weights_is_a_mismatch_even_beside_an_error(clean_run, tmp_path):
    run = _copy(clean_run[0], tmp_path)
    server = run / "ledger.jsonl"
    lines = server.read_text().splitlines()
    reply = next(
        json.loads(line)
        for line in lines
        if '"train.finetune"' in line and '"direction":"in"' in line and "lumify" in line
    )
    ghost = {k: v for k, v in reply.items() if k not in ("seq", "prev", "hash")}
    ghost.update(group_id="finetune/ghost/lumify/r9", reply_to="ghost", error="also an error")
    ledger.Ledger(server).append(ghost)  # records (weights) no site logged sending
    result = _audit_cli(str(run))
    assert result.exit_code != audit.EXIT_OK, result.output
    ghost_line = "received train.finetune (finetune/ghost/lumify/r9) that site 'lumify''s ledger"
    assert f"MISMATCH site vs server: {server}:{len(lines) + 1}: the server {ghost_line}" in (
        result.output
    )
    assert "INCOMPLETE" not in result.output


def test_a_reply_the_server_hides_while_it_goes_on_is_a_mismatch(clean_run, tmp_path):
    run = _copy(clean_run[0], tmp_path)
    server = run / "ledger.jsonl"
    entries = [json.loads(line) for line in server.read_text().splitlines()]
    hidden = next(
        i
        for i, e in enumerate(entries)
        if e.get("direction") == "in" and e.get("message_type") == contract.TRAIN_FINETUNE
    )
    server.unlink()
    rebuilt = ledger.Ledger(server)
    for i, e in enumerate(entries):
        if i != hidden:
            rebuilt.append({k: v for k, v in e.items() if k not in ("seq", "prev", "hash")})
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_MISMATCH, result.output
    assert "that the server's ledger does not show it received" in result.output


def test_a_rebuilt_site_ledger_disagrees_with_the_server(clean_run, tmp_path):
    # a site rewrites its ledger to claim other weights, re-chaining every line
    run = _copy(clean_run[0], tmp_path)
    path = run / "sites" / "telemed" / "ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    forged = ledger.Ledger(path)
    for e in entries:
        for rec in e["records"]:
            for a in rec.get("arrays", []):
                a["sha256"] = "0" * 64
        forged.append({k: v for k, v in e.items() if k not in ("seq", "prev", "hash")})
    result = _audit_cli(str(run))
    # the chain is intact, but the server's ledger tells another story
    assert result.exit_code == audit.EXIT_MISMATCH, result.output
    assert "differs between server and site" in result.output


# ------------------------------------------------------------------ smuggling, refused on the site
def _honest_pretrain(cfg, branch, data, out_dir, init_encoder=None, progress=True, name=None):
    """Stand-in for stages.pretrain: a fresh model's encoder weights, no training (fast)."""
    from common.models import build_transunet, encoder_state_dict
    from common.stages import StageResult

    state = {k: v.clone() for k, v in encoder_state_dict(build_transunet(cfg.model)).items()}
    return StageResult(state, {"train_loss": 0.5}, num_examples=len(data.rows))


def _frame() -> torch.Tensor:
    return torch.rand(1, 64, 64)  # one tiny-config image


def _extra_record(monkeypatch):
    import clients.app

    honest = messages.pack_weights_reply

    def leaky(record, state, metrics, n, wire_dtype="float32"):
        rd = honest(record, state, metrics, n, wire_dtype)
        rd["frames"] = ArrayRecord({"f": _frame()})
        return rd

    monkeypatch.setattr(clients.app.messages, "pack_weights_reply", leaky)


def _smuggle_state(change):
    def pretrain(*args, **kwargs):
        res = _honest_pretrain(*args, **kwargs)
        change(res.state)
        return res

    return pretrain


SMUGGLERS = {
    "extra record": (_extra_record, "record 'frames' is not allowed"),
    "extra array": (
        lambda mp: mp.setattr(
            "common.stages.pretrain", _smuggle_state(lambda s: s.update(frame=_frame()))
        ),
        "array 'frame' [1, 64, 64] float32 in 'encoder' is not a model parameter",
    ),
    "parameter name, frame shape": (
        lambda mp: mp.setattr(
            "common.stages.pretrain", _smuggle_state(lambda s: s.update(pos_embed=_frame()))
        ),
        "array 'pos_embed' in 'encoder' is [1, 64, 64] float32, the model parameter is",
    ),
    # not a frame, but weights a source would fine-tune from and be blamed for
    "diverged weights": (
        lambda mp: mp.setattr(
            "common.stages.pretrain",
            _smuggle_state(lambda s: next(iter(s.values())).view(-1)[:3].fill_(float("nan"))),
        ),
        "holds 3 non-finite value(s)",
    ),
}


@pytest.mark.parametrize("how", list(SMUGGLERS))
def test_a_smuggled_frame_is_refused_on_the_site(
    tmp_path, sites_root, flower_identity, monkeypatch, how
):
    # the target's pretraining handler result carries a frame
    import common.stages

    monkeypatch.setattr(common.stages, "pretrain", _honest_pretrain)
    smuggle, reason = SMUGGLERS[how]
    smuggle(monkeypatch)
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "smuggle"), run, sites_root)
    with pytest.raises(WorkflowError) as err:
        run_server(server_app, grid)
    # the run ends naming site, phase and violation; nothing of the reply was uploaded
    msg = str(err.value)
    assert "site 'telemed'" in msg and "phase 'pretrain'" in msg and reason in msg, msg
    pre = [s for s in grid.log if s.message_type == contract.TRAIN_PRETRAIN]
    assert pre and all(s.error and s.records_in == () for s in pre)
    assert reason in json.loads((run / "FAILED.json").read_text())["error"]
    # the site's ledger keeps the refusal; the audit passes (nothing crossed) and reports it
    site = [
        json.loads(x) for x in (run / "sites" / "telemed" / "ledger.jsonl").read_text().splitlines()
    ]
    assert [e for e in site if e.get("refused") and reason in e["refused"] and e["records"] == []]
    report = audit.audit_run(run)
    assert report.ok, report.render()
    assert any("refused a reply" in n and "nothing was sent" in n for n in report.notes)


def _evaluate_again(clean_run, tmp_path) -> Path:
    """A copy of the clean run (pretrain and finetune done) whose evaluate phase runs again."""
    run = tmp_path / "run"
    shutil.copytree(clean_run[0], run)
    index = json.loads((run / "phases.json").read_text())
    index["completed"] = [c for c in index["completed"] if c["phase"] != "evaluate"]
    (run / "phases.json").write_text(json.dumps(index))
    return run


def test_a_frame_as_a_score_list_is_refused(
    clean_run, tmp_path, sites_root, flower_identity, monkeypatch
):
    # resume the clean run (pretrain/finetune done); evaluation adds a 4096-long "score"
    import common.stages

    run = _evaluate_again(clean_run, tmp_path)
    real = common.stages.evaluate

    def leaky(*args, **kwargs):  # under a name the server asked for, so only the length refuses it
        res = real(*args, **kwargs)
        res.per_image["lower/dice"] = _frame().flatten().tolist()
        return res

    monkeypatch.setattr(common.stages, "evaluate", leaky)
    grid = _grid(run / "config.yaml", run, sites_root)
    with pytest.raises(WorkflowError) as err:
        run_server(server_app, grid)
    msg = str(err.value)
    assert "phase 'evaluate'" in msg and "'lower/dice'" in msg and "list of 4096 numbers" in msg, (
        msg
    )
    evaluate = [s for s in grid.log if s.message_type == contract.EVALUATE_SEGMENT]
    assert evaluate and all(s.records_in == () for s in evaluate)


def test_the_server_refuses_what_a_guardless_site_sends(tmp_path, sites_root, flower_identity):
    # a site whose app has no guard (the reply is changed after the ClientApp ran)
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "guardless"), run, sites_root)
    handle = grid._handle

    def modified_app(msg):
        reply = handle(msg)
        reply.content["frames"] = ArrayRecord({"f": _frame()})
        return sign_as_site(grid, msg, reply)  # the site holds its key: the signature verifies

    grid._handle = modified_app
    with pytest.raises(
        WorkflowError, match=r"phase 'discover'.*refused reply.*'frames' is not allowed"
    ):
        run_server(server_app, grid)
    # the server logged what it received and refused; the audit calls it a violation
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_CONTRACT, result.output
    assert "the server received a reply outside the contract" in result.output


def test_an_exception_message_cannot_carry_a_frame(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    import base64

    import common.stages

    payload = base64.b64encode(_frame().numpy().tobytes() * 16).decode()  # ~87 KB of "frame"

    def leaky(*args, **kwargs):
        raise RuntimeError(f"failed\n{payload}")

    monkeypatch.setattr(common.stages, "pretrain", leaky)
    run = tmp_path / "run"
    with pytest.raises(WorkflowError) as err:
        run_server(server_app, _grid(_experiment(tmp_path, "leaky-error"), run, sites_root))
    assert "RuntimeError: failed" in str(err.value) and payload[:40] not in str(err.value)
    failed = (run / "FAILED.json").read_text()
    assert "RuntimeError: failed" in failed and len(failed) < 2 * contract.MAX_REASON + 400
    assert payload[:40] not in (run / "ledger.jsonl").read_text()
    site = run / "sites" / "telemed"
    assert payload[:40] not in (site / "ledger.jsonl").read_text()
    assert payload in (site / "errors.log").read_text()  # the whole traceback stays at the site


def test_the_server_bounds_the_reason_of_a_guardless_sites_error(
    tmp_path, sites_root, flower_identity
):
    from flwr.app import Error, Message

    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "guardless-error"), run, sites_root)
    handle = grid._handle

    def modified_app(msg):
        if msg.metadata.message_type != contract.TRAIN_PRETRAIN:
            return handle(msg)
        return Message(Error(code=1, reason="x" * 100_000), reply_to=msg)

    grid._handle = modified_app
    with pytest.raises(WorkflowError) as err:
        run_server(server_app, grid)
    assert len(str(err.value)) < contract.MAX_REASON + 200
    assert "x" * (contract.MAX_REASON + 1) not in (run / "ledger.jsonl").read_text()


@pytest.mark.parametrize("path", ["/etc/hostname", "/no/such/file.pth"])
def test_a_server_cannot_make_a_site_open_a_path(tmp_path, sites_root, flower_identity, path):
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "probe"), run, sites_root)
    push = grid.push_messages

    def hostile(messages):  # a server that names a file on the site's disk, past its own check
        for msg in messages:
            if contract.EXPERIMENT in msg.content:
                msg.content.config_records[contract.EXPERIMENT]["model.checkpoint"] = path
        return push(messages)

    grid.push_messages = hostile
    _record_reads(grid)
    _Reads.seen, _Reads.active = [], True
    try:
        with pytest.raises(WorkflowError) as err:
            run_server(server_app, grid)
    finally:
        _Reads.active = False
    msg = str(err.value)
    assert "model.checkpoint names a file on the site's disk" in msg and path not in msg
    assert not [p for node, p in _Reads.seen if node is not None and p == path]


def test_a_site_uses_its_own_checkpoint(tmp_path, sites_root, flower_identity, monkeypatch):
    import common.stages

    seen = {}
    real = common.stages.finetune

    def spy(cfg, site, out_dir, encoder, arm, **kw):
        seen[arm] = cfg.model.checkpoint
        return real(
            cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": None})}),
            site,
            out_dir,
            encoder,
            arm,
            **kw,
        )

    monkeypatch.setattr(common.stages, "finetune", spy)
    exp = _experiment(tmp_path, "own-checkpoint")
    cfg = load_experiment(exp)
    model = cfg.model.model_copy(update={"checkpoint": str(tmp_path / "backbone.pth")})
    exp.write_text(dump_experiment(cfg.model_copy(update={"model": model})))
    run_server(server_app, _grid(exp, tmp_path / "run", sites_root))
    assert seen and set(seen.values()) == {str(tmp_path / "backbone.pth")}
    assert '"model.checkpoint"' not in (tmp_path / "run" / "ledger.jsonl").read_text()


# ------------------------------------------------------------------ who sent it: signatures
def test_every_reply_of_the_clean_run_is_signed_and_verifies_offline(clean_run):
    run, _, _ = clean_run
    report = audit.audit_run(run)
    server = [e for _, e in ledger.read_ledger(run / "ledger.jsonl").entries]
    replies = [e for e in server if e.get("event") == "message" and e["direction"] == "in"]
    assert len(replies) == 11 and report.checked["signatures"] == 11, report.render()
    assert all(len(bytes.fromhex(e["signature"])) == 96 for e in replies)
    assert all(e["key"].startswith("SHA256:") for e in replies)
    # the site logged the very signature the server verified
    site_sigs = {
        e["signature"]
        for lf in (run / "sites").glob("*/ledger.jsonl")
        for _, e in ledger.read_ledger(lf).entries
        if e.get("direction") == "out"
    }
    assert {e["signature"] for e in replies} == site_sigs
    # the non-weight capacity of every reply, from its request: used <= allowed
    assert report.capacity and all(u <= c for u, c in report.capacity.values())
    assert "non-weight bytes per reply" in report.render()


def _drop_signature(grid, msg, reply, state):
    del reply.content[contract.SIGNATURE]
    return reply


def _change_a_score(grid, msg, reply, state):  # in flight, after the site signed
    scores = reply.content.metric_records[contract.SCORES]
    key = next(iter(scores))
    scores[key] = [v / 2 for v in scores[key]]
    return reply


def _sign_with_another_sites_key(grid, msg, reply, state):
    other = "lumify" if msg.metadata.dst_node_id == 101 else "telemed"
    return sign_as_site(grid, msg, reply, key_of=other)


def _replay_the_first_reply(grid, msg, reply, state):  # a valid reply to another message
    from flwr.app import Message

    first = state.setdefault("first", reply)
    return reply if first is reply else Message(first.content, reply_to=msg)


FORGERIES = {
    "unsigned": (_drop_signature, "is not signed"),
    "changed on the way": (_change_a_score, "does not verify"),
    "another site's key": (_sign_with_another_sites_key, "does not verify"),
    "replayed": (_replay_the_first_reply, "does not verify"),
}


@pytest.mark.parametrize("how", list(FORGERIES))
def test_a_reply_its_site_did_not_sign_is_refused_and_the_audit_names_it(
    clean_run, tmp_path, sites_root, flower_identity, how
):
    forge, says = FORGERIES[how]
    run = _evaluate_again(clean_run, tmp_path)
    grid = _grid(run / "config.yaml", run, sites_root)
    handle, state = grid._handle, {}

    def forging(msg):
        if msg.metadata.message_type != contract.EVALUATE_SEGMENT:
            return handle(msg)
        return forge(grid, msg, handle(msg), state)

    grid._handle = forging
    with pytest.raises(WorkflowError, match=f"phase 'evaluate'.*refused reply.*{says}"):
        run_server(server_app, grid)
    assert "evaluate" not in {c["phase"] for c in json.loads((run / "phases.json").read_text())[
        "completed"]}  # fmt: skip
    result = _audit_cli(str(run))
    assert result.exit_code == audit.EXIT_SIGNATURE, result.output
    assert "SIGNATURE:" in result.output and says in result.output


def test_a_forged_reply_that_arrives_before_the_real_one_is_refused(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    # another node answers the target's pretrain message first, claiming to be the target
    monkeypatch.setattr("common.stages.pretrain", _honest_pretrain)
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "forged-first"), run, sites_root)
    pull = grid.pull_messages

    def forged_first(ids):
        replies = pull(ids)
        if replies and replies[0].metadata.message_type == contract.TRAIN_PRETRAIN:
            replies.insert(0, _forged_copy(grid, replies[0]))
        return replies

    grid.pull_messages = forged_first
    with pytest.raises(WorkflowError, match=r"site 'telemed'.*does not verify"):
        run_server(server_app, grid)


def _forged_copy(grid, genuine):
    """A copy of ``genuine`` (same source node, same reply-to id) signed with the source site's
    key: what a SuperNode that pushes a reply in the target's name can make."""
    from flwr.app import Message

    md = genuine.metadata
    request = Message(RecordDict(), dst_node_id=md.src_node_id, message_type=md.message_type)
    request.metadata.__dict__["_message_id"] = genuine.metadata.reply_to_message_id
    request.metadata.__dict__["_group_id"] = genuine.metadata.group_id
    forged = Message(genuine.content.copy(), reply_to=request)
    return sign_as_site(grid, request, forged, key_of="lumify")


def test_a_reply_to_another_nodes_message_is_refused(tmp_path, sites_root, flower_identity):
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "other-node"), run, sites_root)
    handle = grid._handle

    def from_another_node(msg):
        reply = handle(msg)
        reply.metadata.__dict__["_src_node_id"] = 999
        return reply

    grid._handle = from_another_node
    with pytest.raises(WorkflowError, match="node 999 answered a message sent to node 10"):
        run_server(server_app, grid)


def test_a_site_without_a_signing_key_sends_nothing_but_an_error(
    tmp_path, sites_root, flower_identity
):
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "no-key"), run, sites_root)
    grid.contexts[100].node_config = {  # a deployed SuperNode started without signing-key
        "site": "telemed",
        "role": "target",
        "data-dir": str(sites_root / "telemed"),
        "out-dir": str(tmp_path / "out"),
    }
    with pytest.raises(WorkflowError, match="SigningKeyError: this site cannot sign its reply"):
        run_server(server_app, grid)
    assert "--node-config signing-key" in next((tmp_path / "out").glob("*/errors.log")).read_text()


def test_a_site_without_a_registered_key_is_refused(tmp_path, sites_root, flower_identity):
    run = tmp_path / "run"
    grid = _grid(_experiment(tmp_path, "unregistered"), run, sites_root)
    (run / "keys" / "lumify.pub").unlink()
    with pytest.raises(WorkflowError, match="site 'lumify' has no registered public key"):
        run_server(server_app, grid)


# ------------------------------------------------------------------ bounds the server chose
def test_score_vectors_are_bounded_by_what_the_server_asked_not_by_the_site(
    clean_run, tmp_path, sites_root, flower_identity
):
    # a guard-less site inflates its card and its example count, then sends a 4096-long "score"
    run = _evaluate_again(clean_run, tmp_path)
    grid = _grid(run / "config.yaml", run, sites_root, **{"max-eval-frames": 40})
    handle = grid._handle

    def inflating(msg):
        reply = handle(msg)
        if msg.metadata.message_type == contract.QUERY_SITE:
            card = reply.content.config_records[contract.SITE_CARD]
            for key in [k for k in card if k.endswith(".labeled")]:
                card[key] = 5000
            return sign_as_site(grid, msg, reply)
        if msg.metadata.message_type == contract.EVALUATE_SEGMENT:
            reply.content.metric_records[contract.METRICS][contract.NUM_EXAMPLES] = 5000
            scores = reply.content.metric_records[contract.SCORES]
            scores[next(iter(scores))] = _frame().flatten().tolist()
            return sign_as_site(grid, msg, reply)
        return reply

    grid._handle = inflating
    with pytest.raises(WorkflowError, match="list of 4096 numbers, more than the 40 frame"):
        run_server(server_app, grid)
    sent = [
        r["config"]
        for _, e in ledger.read_ledger(run / "ledger.jsonl").entries
        if e.get("message_type") == contract.EVALUATE_SEGMENT and e["direction"] == "out"
        for r in e["records"]
        if r["name"] == contract.STAGE
    ]
    assert sent[-1][contract.K_MAX_FRAMES] == 40  # the server's own number, on the wire


def test_a_site_with_more_labeled_frames_than_asked_refuses_to_score(
    clean_run, tmp_path, sites_root, flower_identity
):
    run = _evaluate_again(clean_run, tmp_path)
    grid = _grid(run / "config.yaml", run, sites_root, **{"max-eval-frames": 1})
    with pytest.raises(WorkflowError, match="the server asked to score at most 1"):
        run_server(server_app, grid)


def test_a_score_outside_0_1_is_refused_on_the_site(
    clean_run, tmp_path, sites_root, flower_identity, monkeypatch
):
    import common.stages

    run = _evaluate_again(clean_run, tmp_path)
    real = common.stages.evaluate

    def out_of_range(*args, **kwargs):  # 8 bytes of anything per value, unless values are scores
        res = real(*args, **kwargs)
        key = next(iter(res.per_image))
        res.per_image[key] = [1e300] * len(res.per_image[key])
        return res

    monkeypatch.setattr(common.stages, "evaluate", out_of_range)
    with pytest.raises(WorkflowError, match=r"has values outside \[0, 1\]"):
        run_server(server_app, _grid(run / "config.yaml", run, sites_root))


# ------------------------------------------------------------------ the check itself
def _reply(**records) -> list[dict]:
    """A described reply from a site that evaluated or trained on 3 images, plus ``records``."""
    return describe(
        RecordDict({contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: 3}), **records})
    )


def _metrics_reply(metrics: dict) -> list[dict]:
    return describe(
        RecordDict({contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: 3, **metrics})})
    )


SCORES_OF_3 = MetricRecord({"a/dice": [0.5, 0.6, 0.7]})


def _asked(models=("a",), fusions=(), modes=("entropy",), max_frames=100) -> list[dict]:
    """The described request a reply answers: which models and fused pairs were sent, and how
    many frames the site was asked to score at most."""
    stage = {
        "models": list(models),
        "fusions": [f"{x}+{y}" for x, y in fusions],
        contract.K_MAX_FRAMES: max_frames,
    }
    return [
        {"name": contract.STAGE, "type": contract.CONFIG, "config": stage},
        {
            "name": contract.EXPERIMENT,
            "type": contract.CONFIG,
            "config": {"fusion.modes": list(modes)},
        },
    ]


def test_check_passes_honest_replies_and_refuses_payloads_that_could_carry_a_frame():
    cfg = load_experiment("configs/tiny.yaml")
    encoder = schema.model_schema(cfg, contract.ENCODER)
    name, (shape, dtype) = next(iter(encoder.items()))
    honest = {k: torch.zeros(s, dtype=getattr(torch, d)) for k, (s, d) in encoder.items()}
    contract.check(
        "reply",
        contract.TRAIN_PRETRAIN,
        contract.TARGET,
        _reply(encoder=ArrayRecord(honest)),
        cfg,
        request=_asked(),
    )
    contract.check(
        "reply",
        contract.EVALUATE_SEGMENT,
        contract.SOURCE,
        _reply(scores=SCORES_OF_3),
        cfg,
        request=_asked(),
    )
    # declared shape/dtype say "parameter", the .npy payload is a frame
    forged = ArrayRecord(honest)
    big = Array.from_numpy_ndarray(np.random.rand(64, 64).astype(np.float32))
    forged[name] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=big.data)
    with pytest.raises(contract.ContractViolation, match=f"array '{name}'.*payload"):
        contract.check(
            "reply",
            contract.TRAIN_PRETRAIN,
            contract.TARGET,
            _reply(encoder=forged),
            cfg,
            request=_asked(),
        )
    with pytest.raises(contract.ContractViolation, match="lacks 1 parameter"):
        partial = ArrayRecord({k: v for k, v in honest.items() if k != name})
        contract.check(
            "reply",
            contract.TRAIN_PRETRAIN,
            contract.TARGET,
            _reply(encoder=partial),
            cfg,
            request=_asked(),
        )


# (message type, site role, described reply, max_list, what the refusal says)
REFUSED_REPLIES = {
    # score vectors are bounded by the evaluated images, and by the server's own count
    "scores-over-images": (
        contract.EVALUATE_SEGMENT,
        contract.SOURCE,
        _reply(scores=MetricRecord({"a/dice": [0.1] * 4})),
        None,
        "list of 4 numbers, more than the 3",
    ),
    "scores-over-max-list": (
        contract.EVALUATE_SEGMENT,
        contract.SOURCE,
        _reply(scores=SCORES_OF_3),
        2,
        "more than the 2",
    ),
    # per-patient means (a study's per-patient test) obey the same bound
    "patient-scores-over-images": (
        contract.EVALUATE_SEGMENT,
        contract.TARGET,
        _reply(**{"patient-scores": MetricRecord({"a/dice": [0.5] * 4})}),
        None,
        "'patient-scores' is a list of 4",
    ),
    # lists only in score records
    "list-in-metrics": (
        contract.EVALUATE_SEGMENT,
        contract.SOURCE,
        _metrics_reply({"a/dice": [0.0, 1.0]}),
        None,
        "only score vectors",
    ),
    # names: only those the request asked for (a model the server did not send, a new key)
    "score-of-a-model-not-sent": (
        contract.EVALUATE_SEGMENT,
        contract.TARGET,
        _reply(scores=MetricRecord({"b/dice": [0.5, 0.5, 0.5]})),
        None,
        "'b/dice', a name the request did not ask for",
    ),
    "frame-in-46-metric-names": (
        contract.TRAIN_FINETUNE,
        contract.SOURCE,
        _metrics_reply({f"{i:02d}" + "x" * 89: 0.0 for i in range(46)}),
        None,
        "a name the request did not ask for",
    ),
    "unknown-card-key": (
        contract.QUERY_SITE,
        contract.TARGET,
        describe(RecordDict({contract.SITE_CARD: ConfigRecord({"name": "x", "note": "hi"})})),
        None,
        "'note', a name the request did not ask for",
    ),
    # a frame spelled out in metric names
    "frame-as-metric-name": (
        contract.TRAIN_PRETRAIN,
        contract.TARGET,
        _metrics_reply({"f" * 4096: 1.0}),
        None,
        "4096 characters",
    ),
    "bytes-in-site-card": (
        contract.QUERY_SITE,
        contract.TARGET,
        describe(
            RecordDict({contract.SITE_CARD: ConfigRecord({"name": "x", "device": b"\0" * 4096})})
        ),
        None,
        "'device' is not a short scalar",
    ),
}


@pytest.mark.parametrize(
    ("message_type", "role", "records", "max_list", "match"),
    list(REFUSED_REPLIES.values()),
    ids=list(REFUSED_REPLIES),
)
def test_check_refuses_metrics_and_cards_that_could_carry_a_frame(
    message_type, role, records, max_list, match
):
    cfg = load_experiment("configs/tiny.yaml")
    with pytest.raises(contract.ContractViolation, match=match):
        contract.check(
            "reply", message_type, role, records, cfg, max_list=max_list, request=_asked()
        )


def test_ledger_chains_each_entry_to_the_previous_one(tmp_path):
    book = ledger.Ledger(tmp_path / "l.jsonl")
    a = book.append({"event": "x", "n": 1})
    b = book.append({"event": "x", "n": 2})
    assert a["prev"] == ledger.GENESIS and b["prev"] == a["hash"] == ledger.entry_hash(a)
    assert (a["seq"], b["seq"]) == (1, 2)
    lf = ledger.read_ledger(tmp_path / "l.jsonl")
    assert lf.chain_error == "" and lf.head == b["hash"]
