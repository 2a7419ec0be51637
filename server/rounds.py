"""The server's side of the wire: a round of messages to sites, every message checked against the
contract and logged in the server's hash-chained ledger, and the example-weighted average of
same-role sites' weights.

The workflow (``server/workflow.py``) says *what* each phase sends; this module is *how* it crosses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import ExperimentConfig
from common.fl import messages, signing
from common.fl.contract import (
    EVALUATE_SEGMENT,
    K_NAME,
    K_ROLE,
    K_VALUE,
    METRICS,
    NUM_EXAMPLES,
    SIGNATURE,
    SITE_CARD,
    ContractViolation,
    bounded_reason,
    check,
)
from common.fl.describe import describe
from common.fl.ledger import SERVER, Ledger, message_entry


class WorkflowError(RuntimeError):
    """The run cannot go on; the message names the phase and, where one is to blame, the site."""


class Unverified(Exception):
    """A reply whose signature is missing or does not verify against the site's registered key."""


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
class Sent:
    """A message as it went out: the job, its description, and the digest its reply signs."""

    msg: Message
    job: Job
    records: list[dict]
    digest: str


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
        site_keys: Path,
    ):
        self.grid, self.cfg, self.ledger, self.run_id, self.log = grid, cfg, ledger, run_id, log
        self.site_keys = Path(site_keys)
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

    def _outgoing(self, phase: str, rnd: int, job: Job, timeout: float) -> Sent:
        """The message of one job, checked against the contract and logged before it is sent."""
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
        return Sent(msg, job, records, signing.digest(records))

    def _verify(self, sent: Sent, reply: Message, site: Site, records: list[dict]) -> dict:
        """Check the site's signature of ``reply`` (answering ``sent``) against its registered key.

        Returns:
            What the ledger records of it: the signature and the key's fingerprint.

        Raises:
            Unverified: no registered key for the site, no signature, or one that does not verify.
        """
        path = signing.public_key_path(self.site_keys, site.name or "?")
        try:
            key = signing.load_public_key(str(path))
        except signing.SigningKeyError:
            raise Unverified(f"site {site.name!r} has no registered public key ({path})") from None
        rec = reply.content.config_records.get(SIGNATURE) if reply.has_content() else None
        value = rec.get(K_VALUE) if rec is not None else None
        stmt = signing.reply_statement(
            sent.msg.metadata,
            run_id=self.run_id,
            site=site.name,
            request=sent.digest,
            reply=signing.digest(records, skip=SIGNATURE),
        )
        if not isinstance(value, bytes) or not signing.verify(key, stmt, value):
            what = "is not signed" if value is None else "has a signature that does not verify"
            raise Unverified(f"the reply {what} with site {site.name!r}'s key ({path})")
        return {"signature": value.hex(), "key": signing.fingerprint(key)}

    def _receive(self, phase: str, where: str, reply: Message, site: Site, sent: Sent, bound):
        """Verify a reply's signature, apply the same contract check as the site's guard, and log
        it in the server ledger — before anything of it is used.

        Raises:
            WorkflowError: an error reply, an unverified reply, or one the contract does not allow.
        """
        records = describe(reply.content) if reply.has_content() else []
        if reply.has_error():  # bounded here too: a site without the guard may send anything
            reason = bounded_reason(reply.error.reason)
            self.log_message(phase, "in", reply, site, records, error=reason)
            raise WorkflowError(f"{where}: {reason}")
        try:
            signed = self._verify(sent, reply, site, records)
        except Unverified as err:
            self.log_message(phase, "in", reply, site, records, unverified=str(err))
            raise WorkflowError(f"{where}: refused reply: {err}") from None
        try:
            mtype = reply.metadata.message_type
            check("reply", mtype, site.role, records, self.cfg, bound, request=sent.records)
        except ContractViolation as err:
            self.log_message(phase, "in", reply, site, records, refused=str(err), **signed)
            raise WorkflowError(f"{where}: refused reply: {err}") from None
        self.log_message(phase, "in", reply, site, records, **signed)

    def _accept(self, phase: str, rnd: int, sent: Sent, reply: Message) -> Site:
        """Check one reply; returns the site it came from (for discovery: the one it claims)."""
        job = sent.job
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
        self._receive(phase, where, reply, site, sent, bound)
        return site

    def _match(self, reply: Message, pending: dict[str, Sent]) -> Sent | None:
        """The message ``reply`` answers — by the id the grid gave it when it was pushed, and only
        from the node it was sent to; None for a stray reply (e.g. to an earlier attempt).

        Raises:
            WorkflowError: a reply to one of this round's messages from another node.
        """
        sent = pending.get(reply.metadata.reply_to_message_id)
        if sent is None:
            return None
        if reply.metadata.src_node_id != sent.msg.metadata.dst_node_id:
            raise WorkflowError(
                f"node {reply.metadata.src_node_id} answered a message sent to node "
                f"{sent.msg.metadata.dst_node_id} ({sent.msg.metadata.group_id}): refused"
            )
        return pending.pop(reply.metadata.reply_to_message_id)

    def round(
        self, phase: str, rnd: int, rounds: int, jobs: list[Job], timeout: float
    ) -> dict[str, list[tuple[Site, RecordDict]]]:
        """Send all jobs in one ``send_and_receive``; return replies grouped by job key.

        Raises:
            WorkflowError: a site replied with an error, sent something not allowed or not signed
                by it, or did not answer within ``timeout`` seconds.
        """
        plog = self.phase_logs.setdefault(phase, PhaseLog())
        sent = [self._outgoing(phase, rnd, job, timeout) for job in jobs]
        plog.bytes_sent += sum(messages.record_bytes(job.content) for job in jobs)
        names = ", ".join(sorted({f"{j.site.name if j.site else j.node_id}:{j.key}" for j in jobs}))
        self.log(f"{phase} round {rnd}/{rounds}: {len(sent)} message(s) → {names}")
        t = time.monotonic()
        out: dict[str, list[tuple[Site, RecordDict]]] = {}
        pending: dict[str, Sent] | None = None
        for reply in self.grid.send_and_receive([s.msg for s in sent], timeout=timeout):
            if pending is None:  # the grid has given every pushed message its id by now
                pending = {s.msg.metadata.message_id: s for s in sent}
            match = self._match(reply, pending)
            if match is None:
                self.log(f"{phase}: ignored a reply from node {reply.metadata.src_node_id} "
                         "to no message of this round")  # fmt: skip
                continue
            site = self._accept(phase, rnd, match, reply)
            plog.bytes_received += messages.record_bytes(reply.content)
            out.setdefault(match.job.key, []).append((site, reply.content))
        left = sent if pending is None else list(pending.values())
        if left:
            who = [(s.job.site.name if s.job.site else s.job.node_id, s.job.key) for s in left]
            missing = ", ".join(sorted(f"{name!r} ({key})" for name, key in who))
            raise WorkflowError(
                f"phase {phase!r} round {rnd}: no reply within {timeout:.0f} s from site(s) "
                f"{missing}"
            )
        plog.messages += len(sent)
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
