"""The study as federated phases: discover → pretrain → finetune → evaluate → report.

The server only ever holds weights and scalars (+ per-image score vectors); frames, masks, features
and predictions stay at the sites. Each phase with several same-role sites runs ``cfg.rounds``
rounds and averages their weights by example count (Flower's ``aggregate_arrayrecords``); one target
and one source site with ``rounds: 1`` is exactly the paper. Completed phases are persisted in the
run folder (``server/store.py``) so a rerun continues after the last completed phase.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import ExperimentConfig, dump_experiment, variant_config
from common.fl import audit
from common.fl import protocol as p
from server import report
from server.store import RunStore, atomic_write_json, atomic_write_text, fingerprint

DISCOVER, PRETRAIN, FINETUNE, EVALUATE, REPORT = (
    "discover",
    "pretrain",
    "finetune",
    "evaluate",
    "report",
)
PHASES = (DISCOVER, PRETRAIN, FINETUNE, EVALUATE, REPORT)


class WorkflowError(RuntimeError):
    """The run cannot go on; the message names the phase and, where one is to blame, the site."""


@dataclass(frozen=True)
class Settings:
    """How this run executes (``[tool.flwr.app.config]``, overridable with ``--run-config``)."""

    run_dir: Path
    sites_root: Path
    timeout_query: float = 120.0
    timeout_train: float = 43_200.0
    timeout_evaluate: float = 3_600.0
    node_wait: float = 120.0
    min_nodes: int = 0  # 0 = the number of sites the experiment lists


@dataclass
class Site:
    node_id: int
    name: str
    role: str
    card: dict[str, Any]

    def labeled(self, split: str) -> int:
        """Labeled frames in ``split`` according to the site's card (0 when not reported)."""
        counts = self.card.get("counts", {})
        node = counts.get(split, {}) if isinstance(counts, dict) else {}
        if isinstance(node, dict):
            return int(node.get("labeled", 0))
        return 0


@dataclass
class Job:
    """One message of a round: who gets what, and under which key (branch / arm / site) it comes back."""

    site: Site
    message_type: str
    key: str
    content: RecordDict
    max_list: int | None = None  # bound on score-vector lengths in the reply (evaluate)


@dataclass
class PhaseLog:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


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
        self.store = RunStore(settings.run_dir, self._fingerprint())
        self.sites: dict[str, Site] = {}
        self.phase_logs: dict[str, PhaseLog] = {}
        # what crossed, hash-chained (common/fl/audit.py); the sites keep their own
        self.ledger = audit.Ledger(settings.run_dir / audit.LEDGER_NAME)
        run = getattr(grid, "run", None) if grid is not None else None
        self.run_id = getattr(run, "run_id", None)

    # ---------------------------------------------------------------- helpers
    def log(self, text: str) -> None:
        self._log(f"[crossprobe {time.monotonic() - self.t0:7.1f}s] {text}")

    def _fingerprint(self) -> str:
        sites = json.dumps([[s.name, s.role] for s in self.cfg.sites])
        exp = json.dumps(dict(p.flatten_experiment(self.cfg)), sort_keys=True)
        study = self.cfg.study
        if study.variants or study.pairs:  # extra arms change what a run computes; seeds do not
            exp += study.model_dump_json(include={"variants", "pairs", "select_on_source_val"})
        return fingerprint(exp, sites)

    @property
    def branches(self) -> list[str]:
        return [p.SIMMIM, p.CONTRASTIVE] + ([p.SIMCLR] if self.cfg.contrastive.simclr_arm else [])

    def pretrain_arms(self) -> list[tuple[str, str, ExperimentConfig]]:
        """(key, branch, experiment) of every pretraining job: the built-in branches (key = branch),
        then each study variant of a pretraining branch (key = variant name, its own settings)."""
        out = [(b, b, self.cfg) for b in self.branches]
        out += [
            (v.name, v.branch, variant_config(self.cfg, v))
            for v in self.cfg.study.variants
            if v.branch != p.LOWER
        ]
        return out

    def finetune_arms(self) -> list[tuple[str, str, str, ExperimentConfig]]:
        """(arm, encoder key or "" for none, branch, experiment) of every source fine-tuning job."""
        out = [(p.ARM_OF_BRANCH[b], b, b, self.cfg) for b in self.branches]
        out.append((p.LOWER, "", p.LOWER, self.cfg))
        for v in self.cfg.study.variants:
            enc = "" if v.branch == p.LOWER else v.name
            out.append((v.name, enc, v.branch, variant_config(self.cfg, v)))
        return out

    def fusion_pairs(self, models: dict[str, Any]) -> list[tuple[str, str]]:
        """The main pair (ours) first, then the study's extra pairs whose models exist."""
        pairs = [p.FUSION_PAIR, *self.cfg.study.pairs]
        return [tuple(x) for x in dict.fromkeys(pairs) if all(a in models for a in x)]  # type: ignore[misc]

    def by_role(self, role: str) -> list[Site]:
        return [s for s in self.sites.values() if s.role == role]

    def _log_message(
        self, phase: str, direction: str, msg: Message, site: Site | None, records, **extra
    ) -> None:
        self.ledger.append(
            audit.message_entry(
                audit.SERVER,
                direction,
                msg,
                records,
                run_id=self.run_id,
                site=site.name if site else "",
                role=site.role if site else "",
                phase=phase,
                **extra,
            )
        )

    def _receive(
        self, phase: str, where: str, reply: Message, site: Site, max_list: int | None = None
    ) -> None:
        """Log a reply in the server ledger and apply the same contract check as the site's guard.

        Raises:
            WorkflowError: an error reply, or a reply the contract does not allow (refused).
        """
        records = audit.describe(reply.content) if reply.has_content() else []
        if reply.has_error():
            self._log_message(phase, "in", reply, site, records, error=reply.error.reason)
            raise WorkflowError(f"{where}: {reply.error.reason}")
        try:
            audit.check(
                "reply", reply.metadata.message_type, site.role, records, self.cfg, max_list
            )
        except audit.ContractViolation as err:
            self._log_message(phase, "in", reply, site, records, refused=str(err))
            raise WorkflowError(f"{where}: refused reply: {err}") from None
        self._log_message(phase, "in", reply, site, records)

    def _round(
        self, phase: str, rnd: int, jobs: list[Job], timeout: float
    ) -> dict[str, list[tuple[Site, RecordDict]]]:
        """Send all jobs in one ``send_and_receive``; return replies grouped by job key.

        Raises:
            WorkflowError: a site replied with an error, sent something not allowed, or did not
                answer within ``timeout`` seconds.
        """
        plog = self.phase_logs.setdefault(phase, PhaseLog())
        groups = {}
        messages = []
        for job in jobs:
            p.check_request(job.message_type, job.site.role, job.content)
            group = f"{phase}/{job.key}/{job.site.name}/r{rnd}"
            groups[(job.site.node_id, group)] = job
            plog.bytes_sent += p.record_bytes(job.content)
            msg = Message(
                job.content,
                dst_node_id=job.site.node_id,
                message_type=job.message_type,
                group_id=group,
                ttl=timeout + 60,
            )
            self._log_message(phase, "out", msg, job.site, audit.describe(job.content))
            messages.append(msg)
        names = ", ".join(sorted({f"{j.site.name}:{j.key}" for j in jobs}))
        self.log(f"{phase} round {rnd}/{self._rounds(phase)}: {len(messages)} message(s) → {names}")
        t = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        out: dict[str, list[tuple[Site, RecordDict]]] = {}
        for reply in replies:
            job = groups.pop((reply.metadata.src_node_id, reply.metadata.group_id), None)
            if job is None:
                continue  # a stray reply (e.g. from an earlier attempt): ignore
            where = f"site {job.site.name!r} ({job.site.role}) failed in phase {phase!r} ({job.message_type} {job.key}, round {rnd})"
            bound = job.max_list
            if bound is None and job.message_type == p.EVALUATE_SEGMENT:
                bound = job.site.labeled("test")
            self._receive(phase, where, reply, job.site, bound)
            plog.bytes_received += p.record_bytes(reply.content)
            out.setdefault(job.key, []).append((job.site, reply.content))
        if groups:
            missing = ", ".join(sorted(f"{j.site.name!r} ({j.key})" for j in groups.values()))
            raise WorkflowError(
                f"phase {phase!r} round {rnd}: no reply within {timeout:.0f} s from site(s) {missing}"
            )
        dt = time.monotonic() - t
        plog.messages += len(messages)
        self.log(
            f"{phase} round {rnd} done in {dt:.1f} s (sent {_mb(plog.bytes_sent)}, received {_mb(plog.bytes_received)} so far)"
        )
        return out

    def _rounds(self, phase: str) -> int:
        return self.cfg.rounds if phase in (PRETRAIN, FINETUNE) else 1

    def _average(
        self, phase: str, rnd: int, key: str, replies: list[tuple[Site, RecordDict]], record: str
    ) -> ArrayRecord:
        """Example-weighted average of same-role sites' weights (identity for one site)."""
        # each reply was checked against the model's own schema when it arrived (_receive)
        counts = [int(c.metric_records[p.METRICS][p.NUM_EXAMPLES]) for _, c in replies]
        info = {
            "key": key,
            "round": rnd,
            "sites": [s.name for s, _ in replies],
            "num_examples": counts,
            "averaged": len(replies) > 1,
        }
        self.phase_logs[phase].rounds.append(info)
        if len(replies) == 1:
            return replies[0][1].array_records[record]
        if sum(counts) <= 0:
            raise WorkflowError(f"phase {phase!r} ({key}, round {rnd}): sites reported 0 examples")
        only = [
            RecordDict({p.METRICS: c.metric_records[p.METRICS], record: c.array_records[record]})
            for _, c in replies
        ]
        avg = aggregate_arrayrecords(only, p.NUM_EXAMPLES)
        first = replies[0][1].array_records[record]
        # Keep each tensor's dtype (integer buffers such as BatchNorm's counters come back as floats).
        fixed = {k: Array(np.asarray(avg[k].numpy()).astype(first[k].numpy().dtype)) for k in first}
        self.log(f"{phase} {key}: averaged {len(replies)} sites by example count {counts}")
        return ArrayRecord(fixed)

    # ---------------------------------------------------------------- phases
    def discover(self) -> None:
        """Wait for the nodes, ask each who it is (query.site), check roles."""
        expected = self.s.min_nodes or len(self.cfg.sites)
        deadline = time.monotonic() + self.s.node_wait
        nodes: list[int] = []
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if nodes and len(nodes) >= expected:
                break
            if time.monotonic() > deadline:
                raise WorkflowError(
                    f"phase 'discover': {len(nodes)} node(s) connected after {self.s.node_wait:.0f} s, "
                    f"expected {max(expected, 1)} (one per site)"
                )
            time.sleep(0.5)
        self.log(f"discover: {len(nodes)} node(s)")
        table = [
            (s.name, s.role, str(self._data_dir(s)), str(self.s.run_dir / "sites" / s.name))
            for s in self.cfg.sites
        ]
        content = p.pack_query(table)
        plog = self.phase_logs.setdefault(DISCOVER, PhaseLog())
        t = time.monotonic()
        msgs = [
            Message(
                RecordDict(dict(content)),
                dst_node_id=n,
                message_type=p.QUERY_SITE,
                group_id=DISCOVER,
            )
            for n in nodes
        ]
        for msg in msgs:
            self._log_message(DISCOVER, "out", msg, None, audit.describe(msg.content))
        plog.bytes_sent += p.record_bytes(content) * len(nodes)
        plog.messages += len(msgs)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.s.timeout_query))
        answered = {r.metadata.src_node_id for r in replies}
        for r in replies:
            card = (
                p.unpack_site_card(r.content)
                if r.has_content() and p.SITE_CARD in r.content
                else {}
            )
            site = Site(
                r.metadata.src_node_id,
                str(card.get(p.K_NAME, "")),
                str(card.get(p.K_ROLE, "")),
                card,
            )
            where = f"node {r.metadata.src_node_id} failed in phase 'discover' (query.site)"
            self._receive(DISCOVER, where, r, site)
            plog.bytes_received += p.record_bytes(r.content)
            if site.name in self.sites:
                raise WorkflowError(f"phase 'discover': two nodes claim to be site {site.name!r}")
            self.sites[site.name] = site
        if silent := sorted(set(nodes) - answered):
            raise WorkflowError(
                f"phase 'discover': node(s) {silent} did not answer query.site within {self.s.timeout_query:.0f} s"
            )
        configured = {s.name: s.role for s in self.cfg.sites}
        for site in self.sites.values():
            if configured and configured.get(site.name, site.role) != site.role:
                raise WorkflowError(
                    f"site {site.name!r} says role {site.role!r}, the experiment says {configured[site.name]!r}"
                )
            self.log(
                f"discover: site {site.name!r} role {site.role} (node {site.node_id}), counts {site.card.get('counts', {})}"
            )
        if not self.by_role(p.TARGET):
            raise WorkflowError("phase 'discover': no target site connected")
        if not any(s.labeled("train") for s in self.by_role(p.SOURCE)):
            raise WorkflowError(
                "phase 'discover': no source site with labeled train frames connected"
            )
        plog.seconds = time.monotonic() - t

    def _data_dir(self, site_cfg) -> Path:
        return Path(site_cfg.data_dir) if site_cfg.data_dir else self.s.sites_root / site_cfg.name

    def pretrain(self) -> dict[str, ArrayRecord]:
        """Both (or all three) branches, and any study variants, at every target site: one message
        per branch (or variant) and site."""
        encoders: dict[str, ArrayRecord] = {}
        targets = self.by_role(p.TARGET)
        arms = self.pretrain_arms()
        for rnd in range(1, self.cfg.rounds + 1):
            jobs = [
                Job(
                    site,
                    p.TRAIN_PRETRAIN,
                    key,
                    p.pack_request(
                        cfg,
                        PRETRAIN,
                        rnd,
                        branch=branch,
                        arm="" if key == branch else key,
                        encoder=encoders.get(key),
                    ),
                )
                for key, branch, cfg in arms
                for site in targets
            ]
            replies = self._round(PRETRAIN, rnd, jobs, self.s.timeout_train)
            self._collect_metrics(PRETRAIN, rnd, replies)
            encoders = {
                key: self._average(PRETRAIN, rnd, key, replies[key], p.ENCODER)
                for key, _, _ in arms
            }
        return encoders

    def finetune(self, encoders: dict[str, ArrayRecord]) -> dict[str, ArrayRecord]:
        """A TransUNet per encoder + the lower bound at every labeled source site; the upper bound at
        every target site with labeled train frames."""
        sources = [s for s in self.by_role(p.SOURCE) if s.labeled("train")]
        uppers = [s for s in self.by_role(p.TARGET) if s.labeled("train")]
        models: dict[str, ArrayRecord] = {}
        for rnd in range(1, self.cfg.rounds + 1):
            jobs = []
            for arm, enc_key, branch, cfg in self.finetune_arms():
                for site in sources:
                    init = models.get(arm)
                    enc = encoders[enc_key] if enc_key else None
                    jobs.append(
                        Job(
                            site,
                            p.TRAIN_FINETUNE,
                            arm,
                            p.pack_request(
                                cfg,
                                FINETUNE,
                                rnd,
                                arm=arm,
                                branch=branch,
                                encoder=enc if init is None else None,
                                model=init,
                            ),
                        )
                    )
            for site in uppers:
                jobs.append(
                    Job(
                        site,
                        p.TRAIN_FINETUNE,
                        p.UPPER,
                        p.pack_request(
                            self.cfg, FINETUNE, rnd, arm=p.UPPER, model=models.get(p.UPPER)
                        ),
                    )
                )
            replies = self._round(FINETUNE, rnd, jobs, self.s.timeout_train)
            self._collect_metrics(FINETUNE, rnd, replies)
            models = {
                arm: self._average(FINETUNE, rnd, arm, reps, p.MODEL)
                for arm, reps in replies.items()
            }
        return models

    def evaluate(self, models: dict[str, ArrayRecord]) -> dict[str, Any]:
        """Every model and each fusion pair (each mode of cfg.fusion.modes) at every site with
        labeled test frames; and, to choose the fusion mode without looking at any test set (paper
        Table 7), the main pair's fusions on each source site's labeled validation frames.

        Returns per site (val entries keyed "<site>:val"): role, split, scalar metrics, and score
        vectors per image, per video and per patient."""
        fusions = self.fusion_pairs(models)
        sites = [s for s in self.sites.values() if s.labeled("test")]
        if not sites:
            raise WorkflowError("phase 'evaluate': no site has labeled test frames")
        jobs = [
            Job(
                site,
                p.EVALUATE_SEGMENT,
                site.name,
                p.pack_request(self.cfg, EVALUATE, 1, split="test", models=models, fusions=fusions),
                max_list=site.labeled("test"),
            )
            for site in sites
        ]
        if self.cfg.study.select_on_source_val and fusions and fusions[0] == p.FUSION_PAIR:
            pair = {a: models[a] for a in p.FUSION_PAIR}
            jobs += [
                Job(
                    site,
                    p.EVALUATE_SEGMENT,
                    f"{site.name}:val",
                    p.pack_request(
                        self.cfg, EVALUATE, 1, split="val", models=pair, fusions=[p.FUSION_PAIR]
                    ),
                    max_list=site.labeled("val"),
                )
                for site in self.by_role(p.SOURCE)
                if site.labeled("val")
            ]
        replies = self._round(EVALUATE, 1, jobs, self.s.timeout_evaluate)
        out = {}
        for key, [(site, content)] in replies.items():
            metrics = dict(content.metric_records[p.METRICS])
            records = content.metric_records

            def vectors(name: str, records=records) -> dict[str, list[float]]:
                return {k: list(v) for k, v in records[name].items()} if name in records else {}

            out[key] = {
                "role": site.role,
                "site": site.name,
                "split": "val" if key.endswith(":val") else "test",
                "num_examples": int(metrics.pop(p.NUM_EXAMPLES)),
                "metrics": metrics,
                "per_image": vectors(p.SCORES),
                "per_video": vectors(p.VIDEO_SCORES),
                "per_patient": vectors(p.PATIENT_SCORES),
            }
        return out

    def _collect_metrics(
        self, phase: str, rnd: int, replies: dict[str, list[tuple[Site, RecordDict]]]
    ) -> None:
        bucket = self._metrics.setdefault(phase, {})
        for key, reps in replies.items():
            for site, content in reps:
                bucket.setdefault(key, {}).setdefault(f"round-{rnd}", {})[site.name] = dict(
                    content.metric_records[p.METRICS]
                )

    # ---------------------------------------------------------------- driver
    def _run_phase(
        self, phase: str, fn: Callable[[], Any], weights_of: Callable[[Any], dict] | None
    ) -> Any:
        """Run ``fn`` unless the store has the phase; persist its outputs when it completes."""
        if self.store.is_done(phase):
            self.log(f"{phase}: already completed in {self.s.run_dir} — reusing its outputs")
            self.resumed.add(phase)
            rec = self.store.record(phase)
            self.phase_logs[phase] = PhaseLog(
                rec["seconds"],
                rec["bytes_sent"],
                rec["bytes_received"],
                rec["messages"],
                rec["rounds"],
            )
            self._metrics[phase] = self.store.load_metrics(phase).get("sites", {})
            if weights_of is None:
                return self.store.load_metrics(phase)["result"]
            return {k: ArrayRecord(v) for k, v in self.store.load_weights(phase).items()}
        self.log(f"phase {phase}: start")
        t = time.monotonic()
        result = fn()
        plog = self.phase_logs.setdefault(phase, PhaseLog())
        plog.seconds = time.monotonic() - t
        weights = {
            k: dict(v.to_torch_state_dict())
            for k, v in (weights_of(result) if weights_of else {}).items()
        }
        metrics = {"sites": self._metrics.get(phase, {})}
        if weights_of is None:
            metrics["result"] = result
        self.store.save_phase(
            phase,
            weights,
            metrics,
            {
                "seconds": plog.seconds,
                "bytes_sent": plog.bytes_sent,
                "bytes_received": plog.bytes_received,
                "messages": plog.messages,
                "rounds": plog.rounds,
            },
        )
        self.log(
            f"phase {phase}: done in {plog.seconds:.1f} s "
            f"(sent {_mb(plog.bytes_sent)}, received {_mb(plog.bytes_received)})"
        )
        return result

    def run(self) -> dict[str, Any]:
        """All phases; returns the results written to ``results.json``.

        Raises:
            WorkflowError: a site failed or timed out (the message names site and phase); the
                reason is also written to ``FAILED.json`` and no results are written.
        """
        self._metrics: dict[str, Any] = {}
        self.resumed: set[str] = set()
        run_dir = self.s.run_dir
        atomic_write_text(run_dir / "config.yaml", dump_experiment(self.cfg))
        run = getattr(self.grid, "run", None)
        self.ledger.append(
            {
                "event": "run",
                "time": audit.now(),
                "run_id": self.run_id,
                "party": audit.SERVER,
                "experiment": self.cfg.name,
                "fab_id": getattr(run, "fab_id", ""),
                "fab_version": getattr(run, "fab_version", ""),
                "fab_hash": getattr(run, "fab_hash", ""),
                "code": audit.code_digest(),
            }
        )
        done = self.store.completed()
        if done:
            self.log(f"resuming {run_dir}: completed phases {done}")
        try:
            t = time.monotonic()
            self.discover()
            self.phase_logs[DISCOVER].seconds = time.monotonic() - t
            encoders = self._run_phase(PRETRAIN, self.pretrain, lambda r: r)
            models = self._run_phase(FINETUNE, lambda: self.finetune(encoders), lambda r: r)
            evaluation = self._run_phase(EVALUATE, lambda: self.evaluate(models), None)
            self.log("phase report: start")
            results = report.build_results(
                self.cfg, self.sites_summary(), evaluation, self.phase_summary(), self._metrics
            )
            atomic_write_json(run_dir / "results.json", results)
            atomic_write_text(run_dir / "report.md", report.render_markdown(results))
            (run_dir / "FAILED.json").unlink(missing_ok=True)
            self.log(f"report: {run_dir / 'report.md'}")
            return results
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
