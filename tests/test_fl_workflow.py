"""The federated workflow, in process: the real ServerApp main and ClientApp, Flower serialisation,
no Ray (tests/fl_harness.py). Tiny config with 2 steps per stage: seconds per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from clients.app import app as client_app
from common import arms
from common.config import (
    ExperimentConfig,
    SiteConfig,
    SynthConfig,
    dump_experiment,
    load_experiment,
    parse_experiment,
)
from common.fl import contract, messages
from server.app import app as server_app
from server.app import default_run_config, settings_from
from server.report import method_order
from server.rounds import PhaseLog, Site, average_weights
from server.store import RunDirError
from server.workflow import Workflow, WorkflowError
from tests.fl_harness import InProcessGrid, run_server, site_grid

STEPS = {f"{s}.optim.max_steps": 2 for s in ("simmim", "contrastive", "finetune")}
TARGET2 = SiteConfig(
    name="telemed2",
    role="target",
    synth=SynthConfig(
        preset="target", patients=6, videos_per_patient=1, frames_per_video=8, seed=3
    ),
)


def _experiment(
    tmp: Path, name: str, rounds: int = 1, extra_target: bool = False
) -> tuple[Path, ExperimentConfig]:
    cfg = load_experiment("configs/tiny.yaml", overrides=STEPS)
    sites = (*cfg.sites, TARGET2) if extra_target else cfg.sites
    cfg = cfg.model_copy(update={"name": name, "rounds": rounds, "sites": sites})
    path = tmp / f"{name}.yaml"
    path.write_text(dump_experiment(cfg))
    return path, cfg


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory) -> Path:
    """Each simulated site's data in its own folder (made once for the module)."""
    from simulations.sites import ensure_site

    root = tmp_path_factory.mktemp("sites")
    cfg = load_experiment("configs/tiny.yaml")
    for site in (*cfg.sites, TARGET2):
        ensure_site(site, cfg.model.img_size, root, progress=False)
    return root


def _grid(exp: Path, run_dir: Path, sites_root: Path, n: int = 2, **rc) -> InProcessGrid:
    return site_grid(client_app, exp, run_dir, sites_root, n, **rc)


def _types(grid: InProcessGrid) -> list[str]:
    return [s.message_type for s in grid.log]


def test_one_source_one_target_is_the_paper(tmp_path, sites_root, flower_identity):
    exp, cfg = _experiment(tmp_path, "pair")
    grid = _grid(exp, tmp_path / "run", sites_root, 2)
    run_server(server_app, grid)
    # the phases sent exactly the paper's messages
    types = _types(grid)
    assert types.count(contract.QUERY_SITE) == 2
    assert types.count(contract.TRAIN_PRETRAIN) == 2  # SimMIM + MT-NXent at the one target
    assert (
        types.count(contract.TRAIN_FINETUNE) == 4
    )  # simmim, mtnxent, lower at the source; upper at the target
    # both sites' labeled test frames + the source's validation frames (fusion-mode selection)
    assert types.count(contract.EVALUATE_SEGMENT) == 3
    assert not [s.error for s in grid.log if s.error]
    # nothing but weights, scalars and score vectors came back
    allowed = set().union(*contract.ALLOWED_REPLY_RECORDS.values())
    assert all(set(s.records_in) <= allowed for s in grid.log)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    methods = method_order(cfg)
    assert methods
    for method in methods:
        assert results["labels"][method] in report
        assert method in results["tables"]["telemed"] and method in results["tables"]["lumify"]
    assert "Target test set" in report and "Source test set" in report and "gap closed" in report
    # Table 7: the fusion mode is chosen on source validation, and its test scores are reported
    sel = results["fusion_selection"]
    assert sel["val_sites"] == ["lumify"] and sel["selected"] in cfg.fusion.modes
    assert sel["val_images"] == results["evaluation"]["lumify:val"]["num_examples"] > 0
    assert set(sel["test_dice"]) == {"lumify", "telemed"} and "Table 7" in report
    # per-patient vectors come back too, one value per test patient
    ev = results["evaluation"]["telemed"]
    n_pat = int(ev["metrics"]["n_patients"])
    assert n_pat >= 1 and ev["per_patient"]
    assert all(len(v) == n_pat for v in ev["per_patient"].values())
    assert [ph["phase"] for ph in results["phases"]] == [
        "discover",
        "pretrain",
        "finetune",
        "evaluate",
    ]
    assert all(ph["bytes_received"] > 0 for ph in results["phases"])
    # site-local artifacts stay in each site's own folder
    assert any((tmp_path / "run" / "sites" / "telemed").glob("pretrain-simmim-r1/*"))
    assert any((tmp_path / "run" / "sites" / "lumify").glob("finetune-lower-r1/*"))


def test_two_targets_average_each_round(tmp_path, sites_root, flower_identity):
    # two target sites, one source, two rounds per phase
    exp, cfg = _experiment(tmp_path, "three", rounds=2, extra_target=True)
    grid = _grid(exp, tmp_path / "run", sites_root, 3)
    run_server(server_app, grid)
    types = _types(grid)
    assert types.count(contract.TRAIN_PRETRAIN) == 2 * 2 * 2  # rounds × branches × targets
    assert types.count(contract.TRAIN_FINETUNE) == 2 * (
        3 + 2
    )  # rounds × (3 arms at the source + upper at 2 targets)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = {ph["phase"]: ph["rounds"] for ph in results["phases"]}
    pre = [r for r in rounds["pretrain"] if r["averaged"]]
    assert {(r["key"], r["round"]) for r in pre} == {
        (b, k) for b in ("simmim", "contrastive") for k in (1, 2)
    }
    assert all(sorted(r["sites"]) == ["telemed", "telemed2"] for r in pre)
    upper = [r for r in rounds["finetune"] if r["key"] == arms.UPPER]
    assert [r["averaged"] for r in upper] == [True, True]
    # one source site: nothing else to average its arms with
    assert not any(r["averaged"] for r in rounds["finetune"] if r["key"] != arms.UPPER)
    assert set(results["tables"]) == {"lumify", "telemed", "telemed2"}
    assert "Federated averaging" in (tmp_path / "run" / "report.md").read_text()


def _weights_reply(value: float, n: int, count: int = 4) -> RecordDict:
    """A fine-tune reply with one float and one integer tensor, from a site with ``n`` examples."""
    return RecordDict(
        {
            contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: n}),
            contract.MODEL: ArrayRecord({"w": torch.full((2,), value), "n": torch.tensor(count)}),
        }
    )


def test_average_is_weighted_by_example_count():
    site = Site(1, "x", "target", {})
    avg = average_weights(
        [(site, _weights_reply(1.0, 1, 4)), (site, _weights_reply(5.0, 3, 8))], contract.MODEL
    )
    np.testing.assert_allclose(avg["w"].numpy(), [4.0, 4.0])  # (1·1 + 5·3) / 4
    assert avg["n"].numpy().dtype == np.int64  # buffers keep their dtype


def test_phase_log_notes_each_sites_example_count(tmp_path):
    cfg = load_experiment("configs/tiny.yaml")
    settings = settings_from({**default_run_config(), "run-dir": str(tmp_path)}, cfg)
    wf = Workflow(grid=None, cfg=cfg, settings=settings, log=lambda _: None)
    wf.phase_logs["finetune"] = PhaseLog()
    replies = [
        (Site(1, "a", "source", {}), _weights_reply(1.0, 1)),
        (Site(2, "b", "source", {}), _weights_reply(5.0, 3)),
    ]
    wf._average("finetune", 1, "lower", replies, contract.MODEL)
    assert wf.phase_logs["finetune"].rounds[0]["num_examples"] == [1, 3]


def test_failing_site_ends_the_run_naming_site_and_phase(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    # the target's pretraining raises
    import common.stages

    def boom(*args, **kwargs):
        raise ValueError("disk on fire")

    monkeypatch.setattr(common.stages, "pretrain", boom)
    exp, _ = _experiment(tmp_path, "fail")
    grid = _grid(exp, tmp_path / "run", sites_root, 2)
    with pytest.raises(WorkflowError) as err:
        run_server(server_app, grid)
    msg = str(err.value)
    assert "'telemed'" in msg and "'pretrain'" in msg and "disk on fire" in msg
    assert (
        not (tmp_path / "run" / "results.json").exists()
        and not (tmp_path / "run" / "report.md").exists()
    )
    assert "disk on fire" in json.loads((tmp_path / "run" / "FAILED.json").read_text())["error"]


def test_silent_site_times_out_with_its_name(tmp_path, sites_root, flower_identity):
    exp, _ = _experiment(tmp_path, "silent")
    grid = _grid(exp, tmp_path / "run", sites_root, 2, **{"timeout-train": 2})
    # discover first, then let node 101 (partition 1 = telemed) go quiet
    original = grid.pull_messages

    def pull(ids):
        if any(s.message_type != contract.QUERY_SITE for s in grid.log):
            grid.silent = {101}
        return original(ids)

    grid.pull_messages = pull
    with pytest.raises(WorkflowError, match=r"no reply within .* 'telemed'"):
        run_server(server_app, grid)


def test_a_site_that_never_connects_is_named_by_the_name_its_key_was_registered_as(
    tmp_path, sites_root, flower_identity
):
    exp, _ = _experiment(tmp_path, "absent")
    grid = _grid(exp, tmp_path / "run", sites_root, 1, **{"node-wait": 0.2})
    grid.names = {100: "lumify"}
    with pytest.raises(WorkflowError, match=r"1 node\(s\) connected .* not connected: 'telemed'"):
        run_server(server_app, grid)
    assert "not connected: 'telemed'" in (tmp_path / "run" / "FAILED.json").read_text()


def test_rerun_resumes_after_the_last_completed_phase(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    # a first attempt that fails in the evaluate phase
    import common.stages

    real_evaluate = common.stages.evaluate
    monkeypatch.setattr(
        common.stages, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("GPU lost"))
    )
    exp, _ = _experiment(tmp_path, "resume")
    first = _grid(exp, tmp_path / "run", sites_root, 2)
    with pytest.raises(WorkflowError, match="evaluate"):
        run_server(server_app, first)
    done = [
        c["phase"] for c in json.loads((tmp_path / "run" / "phases.json").read_text())["completed"]
    ]
    assert done == ["pretrain", "finetune"]
    # the same run again, evaluation healthy
    monkeypatch.setattr(common.stages, "evaluate", real_evaluate)
    second = _grid(exp, tmp_path / "run", sites_root, 2)
    run_server(server_app, second)
    # no training message was sent again, and the report is complete
    assert set(_types(second)) == {contract.QUERY_SITE, contract.EVALUATE_SEGMENT}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [ph["phase"] for ph in results["phases"] if ph["resumed"]] == ["pretrain", "finetune"]
    assert not (tmp_path / "run" / "FAILED.json").exists()


def test_a_resume_never_reuses_a_phase_computed_on_other_data_or_settings(
    tmp_path, sites_root, flower_identity
):
    from simulations.sites import ensure_site

    exp, cfg = _experiment(tmp_path, "inputs")
    run_server(server_app, _grid(exp, tmp_path / "run", sites_root, 2))
    unchanged = _grid(exp, tmp_path / "run", sites_root, 2)
    run_server(server_app, unchanged)
    assert set(_types(unchanged)) == {contract.QUERY_SITE}

    # another fusion setting: only the evaluation depends on it
    fused = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"eps": 1e-5})})
    exp.write_text(dump_experiment(fused))
    evaluate_only = _grid(exp, tmp_path / "run", sites_root, 2)
    run_server(server_app, evaluate_only)
    assert set(_types(evaluate_only)) == {contract.QUERY_SITE, contract.EVALUATE_SEGMENT}

    # the target's data regenerated from another seed: every phase used it
    other = tmp_path / "other-data"
    target = cfg.sites[1].model_copy(
        update={"synth": cfg.sites[1].synth.model_copy(update={"seed": 99})}
    )
    for site in (cfg.sites[0], target):
        ensure_site(site, cfg.model.img_size, other, progress=False)
    everything = _grid(exp, tmp_path / "run", other, 2)
    run_server(server_app, everything)
    assert contract.TRAIN_PRETRAIN in _types(everything)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not any(ph["resumed"] for ph in results["phases"])


def test_run_folder_of_another_experiment_is_refused(tmp_path, sites_root, flower_identity):
    exp, _ = _experiment(tmp_path, "other")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "phases.json").write_text(json.dumps({"fingerprint": "x", "completed": []}))
    with pytest.raises(RunDirError, match="different experiment"):
        run_server(server_app, _grid(exp, tmp_path / "run", sites_root, 2))


def test_deployed_nodes_take_their_site_from_node_config(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    # node_config as `flower-supernode --node-config` gives it; stop after discovery
    import common.stages

    monkeypatch.setattr(
        common.stages, "pretrain", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop"))
    )
    exp, _ = _experiment(tmp_path, "deploy")
    grid = _grid(exp, tmp_path / "run", sites_root, 2)
    keys = tmp_path / "run" / "keys"  # each site's own key (deployment: its SuperNode key)
    grid.contexts[100].node_config = {
        "site": "telemed",
        "role": "target",
        "data-dir": str(sites_root / "telemed"),
        "signing-key": str(keys / "telemed.key"),
    }
    grid.contexts[101].node_config = {
        "site": "lumify",
        "role": "source",
        "data-dir": str(sites_root / "lumify"),
        "signing-key": str(keys / "lumify.key"),
    }
    with pytest.raises(WorkflowError, match="stop"):
        run_server(server_app, grid)
    # the pretrain messages went to node 100, the deployed target
    assert {s.dst_node_id for s in grid.log if s.message_type == contract.TRAIN_PRETRAIN} == {100}


def test_reply_guard_blocks_a_site_that_would_send_more(
    tmp_path, sites_root, flower_identity, monkeypatch
):
    # a site card that tries to carry an array
    import clients.app

    honest = messages.pack_site_card

    def leaky_card(card):
        rd = honest(card)
        rd["frames"] = ArrayRecord({"f": torch.zeros(4)})
        return rd

    monkeypatch.setattr(clients.app.messages, "pack_site_card", leaky_card)
    exp, _ = _experiment(tmp_path, "leak")
    grid = _grid(exp, tmp_path / "run", sites_root, 2)
    # refused on the site, before anything is uploaded
    with pytest.raises(WorkflowError, match="'frames' is not allowed"):
        run_server(server_app, grid)
    assert all(s.records_in == () for s in grid.log)


def test_study_variants_and_pairs_run_as_extra_arms(tmp_path, sites_root, flower_identity):
    # a temperature variant, a second SimMIM (other seed), the augmented source-only
    # baseline, and a homogeneous pair (paper Table 8)
    _, base = _experiment(tmp_path, "study")
    study = {
        "variants": [
            {"name": "tau0.1", "branch": "contrastive", "set": {"contrastive.temperature": 0.1}},
            {"name": "simmim-b", "branch": "simmim", "set": {"seed": 7}},
            {"name": "lower-aug", "branch": "lower", "set": {"finetune.augment": True}},
        ],
        "pairs": [["simmim", "simmim-b"], ["simmim", "tau0.1"]],
    }
    data = base.model_dump(mode="json")
    data["study"] = study
    cfg = parse_experiment(data)
    exp = tmp_path / "study.yaml"
    exp.write_text(dump_experiment(cfg))
    grid = _grid(exp, tmp_path / "run", sites_root, 2)
    run_server(server_app, grid)
    # each variant is one more pretraining (if any) and fine-tuning job
    types = _types(grid)
    assert types.count(contract.TRAIN_PRETRAIN) == 2 + 2
    assert types.count(contract.TRAIN_FINETUNE) == 3 + 3 + 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    table = results["tables"]["telemed"]
    for m in (
        "tau0.1",
        "simmim-b",
        "lower-aug",
        "fusion-entropy[simmim+simmim-b]",
        "fusion-mean[simmim+tau0.1]",
        "fusion-entropy",
    ):
        assert m in table and 0.0 <= table[m]["dice"] <= 1.0, m
        assert m in results["methods"]
    assert "temperature = 0.1" in results["labels"]["tau0.1"]
    # the variant trained with its own settings: the site's ledger shows what it was sent
    ledger = (tmp_path / "run" / "sites" / "telemed" / "ledger.jsonl").read_text()
    assert '"contrastive.temperature":0.1' in ledger.replace(" ", "")
    assert any((tmp_path / "run" / "sites" / "telemed").glob("pretrain-tau0.1-r1/*"))
    assert any((tmp_path / "run" / "sites" / "lumify").glob("finetune-lower-aug-r1/*"))
    # different settings, different weights: the second SimMIM is not a copy of the first
    from safetensors.torch import load_file  # noqa: PLC0415

    phase = tmp_path / "run" / "phases" / "pretrain"
    a, b = (load_file(phase / f"{k}.safetensors") for k in ("simmim", "simmim-b"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def _after_discovery(grid: InProcessGrid, message_type: str, **faults: dict[int, int]) -> None:
    """Arm ``faults`` (InProcessGrid's outage / restarts) once the first ``message_type`` message
    was sent, so discovery is not what they hit."""
    original, armed = grid.pull_messages, []

    def pull(ids):
        if not armed and any(s.message_type == message_type for s in grid.log):
            armed.append(True)
            for name, nodes in faults.items():
                setattr(grid, name, dict(nodes))
        return original(ids)

    grid.pull_messages = pull


def _dice(run: Path) -> dict:
    tables = json.loads((run / "results.json").read_text())["tables"]
    return {site: {m: row["dice"] for m, row in table.items()} for site, table in tables.items()}


def test_a_job_a_site_lost_is_sent_again_and_the_run_ends_as_if_nothing_happened(
    tmp_path, sites_root, flower_identity
):
    from common.fl.audit import audit_run
    from common.fl.ledger import read_ledger

    exp, _ = _experiment(tmp_path, "faults")
    run_server(server_app, _grid(exp, tmp_path / "calm", sites_root, 2))
    grid = _grid(exp, tmp_path / "rough", sites_root, 2)
    # telemed (node 101) drops off the network with its first pretraining job (the SuperLink
    # reports it unavailable); lumify's SuperNode (node 100) restarts holding a fine-tuning job
    _after_discovery(grid, contract.TRAIN_PRETRAIN, outage={101: 1})
    original = grid.pull_messages

    def pull(ids):
        if not grid.restarts and sum(s.message_type == contract.TRAIN_FINETUNE for s in grid.log):
            grid.restarts = {100: 1}
        return original(ids)

    grid.pull_messages = pull
    run_server(server_app, grid)
    sent = _types(grid)
    assert sent.count(contract.TRAIN_PRETRAIN) == 3 and sent.count(contract.TRAIN_FINETUNE) == 5
    assert _dice(tmp_path / "rough") == _dice(tmp_path / "calm")  # the same study, resent jobs
    entries = [e for _, e in read_ledger(tmp_path / "rough" / "ledger.jsonl").entries]
    abandoned = [e for e in entries if e.get("event") == "abandoned"]
    assert [(e["site"], e["phase"]) for e in abandoned] == [
        ("telemed", "pretrain"),
        ("lumify", "finetune"),
    ]
    assert "unavailable" in abandoned[0]["reason"] and "activated" in abandoned[1]["reason"]
    # the sites ran the lost jobs too: their replies, never received, are explained, not a mismatch
    report = audit_run(tmp_path / "rough")
    assert report.ok, report.render()
    assert sum("stopped waiting" in line for line in report.notes) == 2, report.notes
