"""The study as federated phases: discover → pretrain → finetune → [adapt] → evaluate → report.

The server only ever holds weights and scalars (+ per-image score vectors); frames, masks, features
and predictions stay at the sites. Each phase with several same-role sites runs ``cfg.rounds``
rounds and averages their weights by example count (Flower's ``aggregate_arrayrecords``); one target
and one source site with ``rounds: 1`` is exactly the paper; ``adapt`` (``adapt.method``, off by
default) goes beyond it: each target adapts the main pair to its own frames and keeps it, and only
scalars come back. Completed phases are persisted in the
run folder (``server/store.py``) so a rerun continues after the last completed phase.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from common import arms
from common.config import ExperimentConfig, dump_experiment, variant_config
from common.fl import messages, signing
from common.fl.contract import (
    ENCODER,
    EVALUATE_SEGMENT,
    K_SPLIT,
    METRICS,
    MODEL,
    NUM_EXAMPLES,
    PATIENT_SCORES,
    QUERY_SITE,
    SCORES,
    SOURCE,
    STAGE,
    TARGET,
    TRAIN_ADAPT,
    TRAIN_FINETUNE,
    TRAIN_PRETRAIN,
    VIDEO_SCORES,
)
from common.fl.ledger import LEDGER_NAME, SERVER, Ledger, code_digest, now
from server import report
from server.rounds import Exchange, Job, PhaseLog, Site, WorkflowError, average_weights, mb
from server.store import RunStore, atomic_write_json, atomic_write_text, fingerprint

DISCOVER, PRETRAIN, FINETUNE, ADAPT, EVALUATE, REPORT = (
    "discover",
    "pretrain",
    "finetune",
    "adapt",
    "evaluate",
    "report",
)
PHASES = (DISCOVER, PRETRAIN, FINETUNE, ADAPT, EVALUATE, REPORT)
# top-level experiment keys each phase's result depends on (besides the study's arms and the data)
_TRAINING = ("seed", "rounds", "model", "simmim", "contrastive", "runtime")
PHASE_SECTIONS = {
    PRETRAIN: _TRAINING,
    FINETUNE: (*_TRAINING, "finetune"),
    ADAPT: (*_TRAINING, "finetune", "fusion", "adapt"),
    EVALUATE: (*_TRAINING, "finetune", "fusion", "adapt"),
}

__all__ = ["PHASES", "Settings", "Workflow", "WorkflowError"]


@dataclass(frozen=True)
class Settings:
    """How this run executes: ``[tool.flwr.app.config]`` in pyproject.toml (the one place their
    defaults are written), overridable with ``flwr run --run-config``; see ``server/app.py``."""

    run_dir: Path
    sites_root: Path
    timeout_query: float
    timeout_train: float
    timeout_evaluate: float
    node_wait: float
    min_nodes: int  # 0 = the number of sites the experiment lists
    site_keys: Path  # each site's registered public key, <site_keys>/<site>.pub
    max_eval_frames: int  # the most labeled frames a site is asked to score per split


def run_identity(cfg: ExperimentConfig) -> str:
    """Which experiment a run folder holds: its name and its sites (a folder of another experiment
    is refused, not mixed)."""
    sites = json.dumps([[s.name, s.role] for s in cfg.sites])
    return fingerprint(cfg.name, sites)


class Workflow:
    """Runs the phases against a Flower ``Grid``; ``log`` receives one progress line at a time."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        settings: Settings,
        log: Callable[[str], None] = print,
    ):
        self.grid, self.cfg, self.s, self._log = grid, cfg, settings, log
        self.t0 = time.monotonic()
        self.store = RunStore(settings.run_dir, self._identity())
        self.sites: dict[str, Site] = {}
        self.metrics: dict[str, Any] = {}  # phase -> key -> round -> site -> scalars
        self.resumed: set[str] = set()
        run = getattr(grid, "run", None) if grid is not None else None
        self.run_id = getattr(run, "run_id", None)
        # what crossed, hash-chained (common/fl/ledger.py); the sites keep their own
        self.ledger = Ledger(settings.run_dir / LEDGER_NAME)
        self.exchange = Exchange(grid, cfg, self.ledger, self.run_id, self.log, settings.site_keys)

    # ---------------------------------------------------------------- helpers
    def log(self, text: str) -> None:
        self._log(f"[crossprobe {time.monotonic() - self.t0:7.1f}s] {text}")

    @property
    def phase_logs(self) -> dict[str, PhaseLog]:
        return self.exchange.phase_logs

    def _identity(self) -> str:
        return run_identity(self.cfg)

    def inputs(self, phase: str) -> str:
        """Fingerprint of what determines ``phase``'s result: the config sections it uses, the
        study's arms, and the data of the sites it uses (each site's own digest of its manifest),
        chained to the phase before it. A completed phase is reused only under the same one."""
        flat = dict(messages.flatten_experiment(self.cfg))
        used = {k: v for k, v in flat.items() if k.split(".")[0] in PHASE_SECTIONS[phase]}
        study = self.cfg.study.model_dump_json(
            include={"variants", "pairs", "select_on_source_val"}
        )
        roles = (TARGET,) if phase == PRETRAIN else (TARGET, SOURCE)
        data = sorted(
            (s.name, s.role, str(s.card.get("digest", "")))
            for s in self.sites.values()
            if s.role in roles
        )
        before = self.inputs(PHASES[PHASES.index(phase) - 1]) if phase != PRETRAIN else ""
        checkpoint = self.cfg.model.checkpoint or ""  # not on the wire, but it shapes the result
        return fingerprint(
            json.dumps(used, sort_keys=True), study, json.dumps(data), before, checkpoint
        )

    def pretrain_arms(self) -> list[tuple[str, str, ExperimentConfig]]:
        """(key, branch, experiment) of every pretraining job: the built-in branches (key = branch),
        then each study variant of a pretraining branch (key = variant name, its own settings)."""
        out = [(b, b, self.cfg) for b in arms.pretrain_branches(self.cfg.contrastive.simclr_arm)]
        out += [
            (v.name, v.branch, variant_config(self.cfg, v))
            for v in self.cfg.study.variants
            if arms.branch(v.branch).pretrains
        ]
        return out

    def finetune_arms(self) -> list[tuple[str, str, str, ExperimentConfig]]:
        """(arm, encoder key or "" for none, branch, experiment) of every source fine-tuning job."""
        branches = arms.pretrain_branches(self.cfg.contrastive.simclr_arm)
        out = [(arms.BRANCHES[b].arm, b, b, self.cfg) for b in branches]
        out.append((arms.LOWER, "", arms.LOWER, self.cfg))
        for v in self.cfg.study.variants:
            enc = v.name if arms.branch(v.branch).pretrains else ""
            out.append((v.name, enc, v.branch, variant_config(self.cfg, v)))
        return out

    def fusion_pairs(self, models: dict[str, Any]) -> list[tuple[str, str]]:
        """The main pair (ours) first, then the study's extra pairs whose models exist."""
        pairs = [arms.MAIN_PAIR, *self.cfg.study.pairs]
        return [tuple(x) for x in dict.fromkeys(pairs) if all(a in models for a in x)]  # type: ignore[misc]

    def by_role(self, role: str) -> list[Site]:
        return [s for s in self.sites.values() if s.role == role]

    def _collect_metrics(
        self, phase: str, rnd: int, replies: dict[str, list[tuple[Site, RecordDict]]]
    ) -> None:
        bucket = self.metrics.setdefault(phase, {})
        for key, reps in replies.items():
            for site, content in reps:
                bucket.setdefault(key, {}).setdefault(f"round-{rnd}", {})[site.name] = dict(
                    content.metric_records[METRICS]
                )

    def _average(
        self, phase: str, rnd: int, key: str, replies: list[tuple[Site, RecordDict]], record: str
    ) -> ArrayRecord:
        """Example-weighted average of same-role sites' weights, noted in the phase log."""
        counts = [int(c.metric_records[METRICS][NUM_EXAMPLES]) for _, c in replies]
        self.phase_logs[phase].rounds.append(
            {
                "key": key,
                "round": rnd,
                "sites": [s.name for s, _ in replies],
                "num_examples": counts,
                "averaged": len(replies) > 1,
            }
        )
        try:
            avg = average_weights(replies, record)
        except WorkflowError as err:
            raise WorkflowError(f"phase {phase!r} ({key}, round {rnd}): {err}") from None
        if len(replies) > 1:
            self.log(f"{phase} {key}: averaged {len(replies)} sites by example count {counts}")
        return avg

    def _rounds(self, phase: str, rnd: int, jobs: list[Job], timeout: float):
        total = self.cfg.rounds if phase in (PRETRAIN, FINETUNE) else 1
        return self.exchange.round(phase, rnd, total, jobs, timeout)

    # ---------------------------------------------------------------- phases
    def _wait_for_nodes(self) -> list[int]:
        expected = self.s.min_nodes or len(self.cfg.sites)
        deadline = time.monotonic() + self.s.node_wait
        while True:
            nodes = sorted(self.exchange.online())
            if nodes and len(nodes) >= expected:
                return nodes
            if time.monotonic() > deadline:
                raise WorkflowError(
                    f"phase 'discover': {len(nodes)} node(s) connected after "
                    f"{self.s.node_wait:.0f} s, expected {max(expected, 1)} (one per site)"
                    + self._not_connected(nodes)
                )
            time.sleep(0.5)

    def _not_connected(self, nodes: list[int]) -> str:
        """The experiment's sites no connected node was registered as (deployment: each
        SuperNode key is registered under its site's name)."""
        names = {self.exchange.registered.get(n) for n in nodes} - {None}
        missing = [s.name for s in self.cfg.sites if s.name not in names]
        return f"; not connected: {', '.join(map(repr, missing))}" if names and missing else ""

    def _check_sites(self) -> None:
        """Roles agree with the experiment; a target and a labeled source are there."""
        configured = {s.name: s.role for s in self.cfg.sites}
        for site in self.sites.values():
            if configured and configured.get(site.name, site.role) != site.role:
                raise WorkflowError(
                    f"site {site.name!r} says role {site.role!r}, the experiment says "
                    f"{configured[site.name]!r}"
                )
            self.log(
                f"discover: site {site.name!r} role {site.role} (node {site.node_id}), "
                f"counts {site.card.get('counts', {})}"
            )
        if not self.by_role(TARGET):
            raise WorkflowError("phase 'discover': no target site connected")
        if not any(s.labeled("train") for s in self.by_role(SOURCE)):
            raise WorkflowError(
                "phase 'discover': no source site with labeled train frames connected"
            )

    def discover(self) -> None:
        """Wait for the nodes, ask each who it is (query.site), check roles."""
        t = time.monotonic()
        nodes = self._wait_for_nodes()
        self.log(f"discover: {len(nodes)} node(s)")
        checkpoint = self.cfg.model.checkpoint or ""  # simulated sites share the experiment's
        table = [
            (
                s.name,
                s.role,
                str(self._data_dir(s)),
                str(self.s.run_dir / "sites" / s.name),
                checkpoint,
                self._simulated_key(s.name),
            )
            for s in self.cfg.sites
        ]
        jobs = [Job(n, QUERY_SITE, str(n), messages.pack_query(table)) for n in nodes]
        replies = self._rounds(DISCOVER, 1, jobs, self.s.timeout_query)
        for [(site, _)] in replies.values():
            if site.name in self.sites:
                raise WorkflowError(f"phase 'discover': two nodes claim to be site {site.name!r}")
            self.sites[site.name] = site
        self._check_sites()
        self.phase_logs[DISCOVER].seconds = time.monotonic() - t

    def _simulated_key(self, site: str) -> str:
        """A simulated site's private key, beside its public key (``signing.ensure_site_keys``);
        "" where there is none (deployed sites sign with their own SuperNode key)."""
        key = self.s.site_keys / f"{site}{signing.PRIVATE_SUFFIX}"
        return str(key) if key.is_file() else ""

    def _data_dir(self, site_cfg) -> Path:
        return Path(site_cfg.data_dir) if site_cfg.data_dir else self.s.sites_root / site_cfg.name

    def pretrain(self) -> dict[str, ArrayRecord]:
        """Both (or all three) branches, and any study variants, at every target site: one message
        per branch (or variant) and site."""
        encoders: dict[str, ArrayRecord] = {}
        targets = self.by_role(TARGET)
        pretrain_arms = self.pretrain_arms()
        for rnd in range(1, self.cfg.rounds + 1):
            jobs = [
                Job.to(
                    site,
                    TRAIN_PRETRAIN,
                    key,
                    messages.pack_request(
                        cfg,
                        PRETRAIN,
                        rnd,
                        branch=branch,
                        arm="" if key == branch else key,
                        encoder=encoders.get(key),
                    ),
                )
                for key, branch, cfg in pretrain_arms
                for site in targets
            ]
            replies = self._rounds(PRETRAIN, rnd, jobs, self.s.timeout_train)
            self._collect_metrics(PRETRAIN, rnd, replies)
            encoders = {
                key: self._average(PRETRAIN, rnd, key, replies[key], ENCODER)
                for key, _, _ in pretrain_arms
            }
        return encoders

    def _finetune_jobs(
        self, rnd: int, encoders: dict[str, ArrayRecord], models: dict[str, ArrayRecord]
    ) -> list[Job]:
        """Every arm at every labeled source site (from its encoder in round 1, from the averaged
        model later), and the upper bound at every target site with labeled train frames."""
        sources = [s for s in self.by_role(SOURCE) if s.labeled("train")]
        jobs = []
        for arm, enc_key, branch, cfg in self.finetune_arms():
            init = models.get(arm)
            enc = encoders[enc_key] if enc_key and init is None else None
            jobs += [
                Job.to(
                    site,
                    TRAIN_FINETUNE,
                    arm,
                    messages.pack_request(
                        cfg, FINETUNE, rnd, arm=arm, branch=branch, encoder=enc, model=init
                    ),
                )
                for site in sources
            ]
        upper = models.get(arms.UPPER)
        jobs += [
            Job.to(
                site,
                TRAIN_FINETUNE,
                arms.UPPER,
                messages.pack_request(self.cfg, FINETUNE, rnd, arm=arms.UPPER, model=upper),
            )
            for site in self.by_role(TARGET)
            if site.labeled("train")
        ]
        return jobs

    def finetune(self, encoders: dict[str, ArrayRecord]) -> dict[str, ArrayRecord]:
        """A TransUNet per encoder + the lower bound at every labeled source site; the upper bound
        at every target site with labeled train frames."""
        models: dict[str, ArrayRecord] = {}
        for rnd in range(1, self.cfg.rounds + 1):
            jobs = self._finetune_jobs(rnd, encoders, models)
            replies = self._rounds(FINETUNE, rnd, jobs, self.s.timeout_train)
            self._collect_metrics(FINETUNE, rnd, replies)
            models = {
                arm: self._average(FINETUNE, rnd, arm, reps, MODEL) for arm, reps in replies.items()
            }
        return models

    @property
    def adapts(self) -> bool:
        return self.cfg.adapt.method != "none"

    def adapt(self, models: dict[str, ArrayRecord]) -> dict[str, Any]:
        """Each target site adapts the main pair to its own unlabeled frames and keeps it; the
        reply holds scalars only (budget, wall time, label-free signals before and after)."""
        pair = {a: models[a] for a in arms.MAIN_PAIR}
        request = messages.pack_request(self.cfg, ADAPT, 1, models=pair)
        jobs = [Job.to(site, TRAIN_ADAPT, site.name, request) for site in self.by_role(TARGET)]
        replies = self._rounds(ADAPT, 1, jobs, self.s.timeout_train)
        self._collect_metrics(ADAPT, 1, replies)
        return {
            key: dict(content.metric_records[METRICS]) for key, [(_, content)] in replies.items()
        }

    def _evaluate_jobs(self, models: dict[str, ArrayRecord]) -> list[Job]:
        """Every model and fused pair at every site with labeled test frames (at a target that
        adapted, its own adapted pair too); and, to choose the fusion mode without looking at any
        test set (paper Table 7), the main pair's fusions on each source site's labeled validation
        frames (job key "<site>:val")."""
        fusions = self.fusion_pairs(models)
        sites = [s for s in self.sites.values() if s.labeled("test")]
        if not sites:
            raise WorkflowError("phase 'evaluate': no site has labeled test frames")
        jobs = []
        for site in sites:
            own = list(arms.ADAPTED_PAIR) if self.adapts and site.role == TARGET else []
            pairs = [*fusions, arms.ADAPTED_PAIR] if own else fusions
            request = self._evaluate_request("test", models, pairs, own)
            jobs.append(
                Job.to(site, EVALUATE_SEGMENT, site.name, request, max_list=site.labeled("test"))
            )
        if self.cfg.study.select_on_source_val and fusions and fusions[0] == arms.MAIN_PAIR:
            pair = {a: models[a] for a in arms.MAIN_PAIR}
            jobs += [
                Job.to(
                    site,
                    EVALUATE_SEGMENT,
                    f"{site.name}:val",
                    self._evaluate_request("val", pair, [arms.MAIN_PAIR]),
                    max_list=site.labeled("val"),
                )
                for site in self.by_role(SOURCE)
                if site.labeled("val")
            ]
        return jobs

    def _evaluate_request(self, split: str, models, fusions, own=()) -> RecordDict:
        return messages.pack_request(
            self.cfg,
            EVALUATE,
            1,
            split=split,
            models=models,
            fusions=fusions,
            max_frames=self.s.max_eval_frames,
            local_models=list(own),
        )

    def evaluate(self, models: dict[str, ArrayRecord]) -> dict[str, Any]:
        """Score every model and fusion (each mode of cfg.fusion.modes) at the sites.

        Returns per evaluation job: site, role, split, scalar metrics, and score vectors per image,
        per video and per patient."""
        jobs = self._evaluate_jobs(models)
        replies = self._rounds(EVALUATE, 1, jobs, self.s.timeout_evaluate)
        splits = {job.key: str(job.content.config_records[STAGE][K_SPLIT]) for job in jobs}
        return {
            key: _evaluation_entry(site, splits[key], content)
            for key, [(site, content)] in replies.items()
        }

    # ---------------------------------------------------------------- driver
    def _resume_phase(self, phase: str, has_weights: bool) -> Any:
        """The outputs of a phase completed by an earlier attempt, as that attempt stored them."""
        self.log(f"{phase}: already completed in {self.s.run_dir} — reusing its outputs")
        self.resumed.add(phase)
        rec = self.store.record(phase)
        self.phase_logs[phase] = PhaseLog(
            rec["seconds"], rec["bytes_sent"], rec["bytes_received"], rec["messages"], rec["rounds"]
        )
        self.metrics[phase] = self.store.load_metrics(phase).get("sites", {})
        if not has_weights:
            return self.store.load_metrics(phase)["result"]
        return {k: ArrayRecord(v) for k, v in self.store.load_weights(phase).items()}

    def _save_phase(self, phase: str, result: Any, has_weights: bool, inputs: str) -> None:
        plog = self.phase_logs[phase]
        weights = result if has_weights else {}
        metrics = {"sites": self.metrics.get(phase, {})}
        if not has_weights:
            metrics["result"] = result
        record = {**asdict(plog), "inputs": inputs}
        self.store.save_phase(phase, weights, metrics, record)

    def _run_phase(self, phase: str, fn: Callable[[], Any], has_weights: bool) -> Any:
        """Run ``fn`` unless the store has the phase, computed on the same inputs; persist its
        outputs when it completes. ``has_weights``: the result is {key: ArrayRecord} (stored as
        safetensors), else JSON."""
        inputs = self.inputs(phase)
        if self.store.is_done(phase):
            if self.store.inputs_of(phase) == inputs:
                return self._resume_phase(phase, has_weights)
            dropped = self.store.forget_from(phase)
            self.log(
                f"{phase}: completed earlier on other inputs (config or site data changed): "
                f"running {', '.join(dropped)} again"
            )
        self.log(f"phase {phase}: start")
        t = time.monotonic()
        result = fn()
        plog = self.phase_logs.setdefault(phase, PhaseLog())
        plog.seconds = time.monotonic() - t
        self._save_phase(phase, result, has_weights, inputs)
        self.log(
            f"phase {phase}: done in {plog.seconds:.1f} s "
            f"(sent {mb(plog.bytes_sent)}, received {mb(plog.bytes_received)})"
        )
        return result

    def _log_run(self) -> None:
        run = getattr(self.grid, "run", None)
        self.ledger.append(
            {
                "event": "run",
                "time": now(),
                "run_id": self.run_id,
                "party": SERVER,
                "experiment": self.cfg.name,
                "fab_id": getattr(run, "fab_id", ""),
                "fab_version": getattr(run, "fab_version", ""),
                "fab_hash": getattr(run, "fab_hash", ""),
                "code": code_digest(),
            }
        )

    def _report(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        self.log("phase report: start")
        run_dir = self.s.run_dir
        results = report.build_results(
            self.cfg, self.sites_summary(), evaluation, self.phase_summary(), self.metrics
        )
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "report.md", report.render_markdown(results))
        (run_dir / "FAILED.json").unlink(missing_ok=True)
        self.log(f"report: {run_dir / 'report.md'}")
        return results

    def run(self) -> dict[str, Any]:
        """All phases; returns the results written to ``results.json``.

        Raises:
            WorkflowError: a site failed or timed out (the message names site and phase); the
                reason is also written to ``FAILED.json`` and no results are written.
        """
        run_dir = self.s.run_dir
        atomic_write_text(run_dir / "config.yaml", dump_experiment(self.cfg))
        self._log_run()
        if done := self.store.completed():
            self.log(f"resuming {run_dir}: completed phases {done}")
        try:
            self.discover()
            encoders = self._run_phase(PRETRAIN, self.pretrain, has_weights=True)
            models = self._run_phase(FINETUNE, partial(self.finetune, encoders), has_weights=True)
            del encoders  # in the run folder now; holding them through evaluation costs RAM
            if self.adapts:
                self._run_phase(ADAPT, lambda: self.adapt(models), has_weights=False)
            evaluation = self._run_phase(EVALUATE, lambda: self.evaluate(models), has_weights=False)
            return self._report(evaluation)
        except WorkflowError as err:
            atomic_write_json(
                run_dir / "FAILED.json", {"error": str(err), "completed": self.store.completed()}
            )
            self.log(f"FAILED: {err}")
            raise

    def sites_summary(self) -> dict[str, Any]:
        return {
            s.name: {"role": s.role, "counts": s.card.get("counts", {})}
            for s in self.sites.values()
        }

    def phase_summary(self) -> list[dict[str, Any]]:
        out = []
        for phase in PHASES[:-1]:
            if phase in self.phase_logs:
                pl = self.phase_logs[phase]
                out.append(
                    {
                        "phase": phase,
                        "seconds": round(pl.seconds, 3),
                        "bytes_sent": pl.bytes_sent,
                        "bytes_received": pl.bytes_received,
                        "messages": pl.messages,
                        "resumed": phase in self.resumed,
                        "rounds": pl.rounds,
                    }
                )
        return out


def _evaluation_entry(site: Site, split: str, content: RecordDict) -> dict[str, Any]:
    """One site's evaluation reply as results.json keeps it."""
    metrics = dict(content.metric_records[METRICS])
    records = content.metric_records

    def vectors(name: str) -> dict[str, list[float]]:
        return {k: list(v) for k, v in records[name].items()} if name in records else {}

    return {
        "role": site.role,
        "site": site.name,
        "split": split,
        "num_examples": int(metrics.pop(NUM_EXAMPLES)),
        "metrics": metrics,
        "per_image": vectors(SCORES),
        "per_video": vectors(VIDEO_SCORES),
        "per_patient": vectors(PATIENT_SCORES),
    }
