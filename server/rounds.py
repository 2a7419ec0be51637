"""The server's side of the wire: a round of messages to sites, every message checked against the
contract and logged in the server's hash-chained ledger, and the example-weighted average of
same-role sites' weights.

The workflow (``server/workflow.py``) says *what* each phase sends; this module is *how* it crosses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import ExperimentConfig
from common.fl import messages
from common.fl.contract import (
    EVALUATE_SEGMENT,
    K_NAME,
    K_ROLE,
    METRICS,
    NUM_EXAMPLES,
    SITE_CARD,
    ContractViolation,
    bounded_reason,
    check,
)
from common.fl.describe import describe
from common.fl.ledger import SERVER, Ledger, message_entry


class WorkflowError(RuntimeError):
    """The run cannot go on; the message names the phase and, where one is to blame, the site."""


@dataclass
class Site:
    node_id: int
    name: str
    role: str
    card: dict[str, Any]

    @classmethod
    def from_card(cls, node_id: int, content: RecordDict | None) -> Site:
        """The site a node says it is in its ``query.site`` reply (empty when it sent no card)."""
        card = {}
        if content is not None and SITE_CARD in content:
            card = messages.unpack_site_card(content)
        return cls(node_id, str(card.get(K_NAME, "")), str(card.get(K_ROLE, "")), card)

    def labeled(self, split: str) -> int:
        """Labeled frames in ``split`` according to the site's card (0 when not reported)."""
        counts = self.card.get("counts", {})
        node = counts.get(split, {}) if isinstance(counts, dict) else {}
        return int(node.get("labeled", 0)) if isinstance(node, dict) else 0


@dataclass
class Job:
    """One message of a round: which node gets what, and under which key (branch / arm / site) its
    reply comes back. ``site`` is None while the node's site is not known yet (discovery)."""

    node_id: int
    message_type: str
    key: str
    content: RecordDict
    site: Site | None = None
    max_list: int | None = None  # outside bound on score-vector lengths in the reply (evaluate)

    @classmethod
    def to(cls, site: Site, message_type: str, key: str, content: RecordDict, **kw) -> Job:
        return cls(site.node_id, message_type, key, content, site=site, **kw)


@dataclass
class PhaseLog:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


class Exchange:
    """Sends rounds of jobs through a Flower ``Grid``; checks and logs every message both ways."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        ledger: Ledger,
        run_id: int | None,
        log: Callable[[str], None],
    ):
        self.grid, self.cfg, self.ledger, self.run_id, self.log = grid, cfg, ledger, run_id, log
        self.phase_logs: dict[str, PhaseLog] = {}

    def log_message(
        self, phase: str, direction: str, msg: Message, site: Site | None, records, **extra
    ) -> None:
        self.ledger.append(
            message_entry(
                SERVER,
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

    def _outgoing(self, phase: str, rnd: int, job: Job, timeout: float) -> tuple[Message, list]:
        """The message of one job, checked against the contract and logged before it is sent;
        with its description (what the reply is checked against)."""
        role = job.site.role if job.site else ""
        records = describe(job.content)
        check("request", job.message_type, role, records, self.cfg)
        name = job.site.name if job.site else f"node-{job.node_id}"
        msg = Message(
            job.content,
            dst_node_id=job.node_id,
            message_type=job.message_type,
            group_id=f"{phase}/{job.key}/{name}/r{rnd}",
            ttl=timeout + 60,
        )
        self.log_message(phase, "out", msg, job.site, records)
        return msg, records

    def _receive(
        self, phase: str, where: str, reply: Message, site: Site, max_list, request: list[dict]
    ) -> None:
        """Log a reply in the server ledger and apply the same contract check as the site's guard.

        Raises:
            WorkflowError: an error reply, or a reply the contract does not allow (refused).
        """
        records = describe(reply.content) if reply.has_content() else []
        if reply.has_error():  # bounded here too: a site without the guard may send anything
            reason = bounded_reason(reply.error.reason)
            self.log_message(phase, "in", reply, site, records, error=reason)
            raise WorkflowError(f"{where}: {reason}")
        try:
            mtype = reply.metadata.message_type
            check("reply", mtype, site.role, records, self.cfg, max_list, request=request)
        except ContractViolation as err:
            self.log_message(phase, "in", reply, site, records, refused=str(err))
            raise WorkflowError(f"{where}: refused reply: {err}") from None
        self.log_message(phase, "in", reply, site, records)

    def _accept(self, phase: str, rnd: int, job: Job, reply: Message, request: list) -> Site:
        """Check one reply; returns the site it came from (for discovery: the one it claims)."""
        site = job.site or Site.from_card(
            job.node_id, reply.content if reply.has_content() else None
        )
        if job.site is None:
            where = f"node {job.node_id} failed in phase {phase!r} ({job.message_type})"
        else:
            where = (
                f"site {site.name!r} ({site.role}) failed in phase {phase!r} "
                f"({job.message_type} {job.key}, round {rnd})"
            )
        bound = job.max_list
        if bound is None and job.message_type == EVALUATE_SEGMENT:
            bound = site.labeled("test")
        self._receive(phase, where, reply, site, bound, request)
        return site

    def round(
        self, phase: str, rnd: int, rounds: int, jobs: list[Job], timeout: float
    ) -> dict[str, list[tuple[Site, RecordDict]]]:
        """Send all jobs in one ``send_and_receive``; return replies grouped by job key.

        Raises:
            WorkflowError: a site replied with an error, sent something not allowed, or did not
                answer within ``timeout`` seconds.
        """
        plog = self.phase_logs.setdefault(phase, PhaseLog())
        pending: dict[tuple[int, str], tuple[Job, list[dict]]] = {}
        outgoing = []
        for job in jobs:
            msg, described = self._outgoing(phase, rnd, job, timeout)
            pending[(job.node_id, msg.metadata.group_id)] = (job, described)
            plog.bytes_sent += messages.record_bytes(job.content)
            outgoing.append(msg)
        names = ", ".join(sorted({f"{j.site.name if j.site else j.node_id}:{j.key}" for j in jobs}))
        self.log(f"{phase} round {rnd}/{rounds}: {len(outgoing)} message(s) → {names}")
        t = time.monotonic()
        out: dict[str, list[tuple[Site, RecordDict]]] = {}
        for reply in self.grid.send_and_receive(outgoing, timeout=timeout):
            sent = pending.pop((reply.metadata.src_node_id, reply.metadata.group_id), None)
            if sent is None:
                continue  # a stray reply (e.g. from an earlier attempt): ignore
            job, request = sent
            site = self._accept(phase, rnd, job, reply, request)
            plog.bytes_received += messages.record_bytes(reply.content)
            out.setdefault(job.key, []).append((site, reply.content))
        if pending:
            who = [(j.site.name if j.site else j.node_id, j.key) for j, _ in pending.values()]
            missing = ", ".join(sorted(f"{name!r} ({key})" for name, key in who))
            raise WorkflowError(
                f"phase {phase!r} round {rnd}: no reply within {timeout:.0f} s from site(s) "
                f"{missing}"
            )
        plog.messages += len(outgoing)
        self.log(
            f"{phase} round {rnd} done in {time.monotonic() - t:.1f} s "
            f"(sent {mb(plog.bytes_sent)}, received {mb(plog.bytes_received)} so far)"
        )
        return out


def average_weights(replies: list[tuple[Site, RecordDict]], record: str) -> ArrayRecord:
    """Example-weighted average of same-role sites' weights in ``record`` (identity for one site).

    Each reply was checked against the model's own schema when it arrived.

    Raises:
        WorkflowError: the sites reported 0 examples in all.
    """
    if len(replies) == 1:
        return replies[0][1].array_records[record]
    counts = [int(c.metric_records[METRICS][NUM_EXAMPLES]) for _, c in replies]
    if sum(counts) <= 0:
        raise WorkflowError(f"sites {[s.name for s, _ in replies]} reported 0 examples")
    only = [
        RecordDict({METRICS: c.metric_records[METRICS], record: c.array_records[record]})
        for _, c in replies
    ]
    avg = aggregate_arrayrecords(only, NUM_EXAMPLES)
    first = replies[0][1].array_records[record]
    # Keep each tensor's dtype (integer buffers such as BatchNorm's counters come back as floats).
    fixed = {k: Array(np.asarray(avg[k].numpy()).astype(first[k].numpy().dtype)) for k in first}
    return ArrayRecord(fixed)
