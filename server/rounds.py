"""The server's side of the wire: a round of messages to sites, every message checked against the
contract and logged in the server's hash-chained ledger, and the example-weighted average of
same-role sites' weights.

A round survives a site that drops off the network or restarts: when the SuperLink reports the
node unavailable (it missed its heartbeats) or the node comes back with a new activation, the
message it held is lost; the server notes it as abandoned in its ledger and sends the same job
again once the node is online, all within the round's timeout. The jobs are deterministic, so the
result is the one an uninterrupted round gives.

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
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
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
from common.fl.ledger import SERVER, Ledger, message_entry, now


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
    """A message as it went out: the job, its description, the digest its reply signs, and when
    its node was last activated as the SuperLink saw it then ("" = not known)."""

    msg: Message
    job: Job
    records: list[dict]
    digest: str
    phase: str
    activated: str = ""

    def lost_by(self, online: dict[int, str]) -> bool:
        """Did the node come back (restart, or offline and online again) since it was sent? Its
        SuperNode then no longer holds the message."""
        now_activated = online.get(self.job.node_id, "")
        return bool(self.activated and now_activated and now_activated != self.activated)


def unavailable_notice(reply: Message) -> bool:
    """The SuperLink's own error reply for a message whose node missed its heartbeats."""
    return (
        reply.metadata.src_node_id == SUPERLINK_NODE_ID
        and reply.has_error()
        and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    )


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
        self.poll = float(getattr(grid, "pull_interval", 3.0))  # seconds between pulls
        self.registered: dict[int, str] = {}  # node id -> name its key was registered under

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
        """The message of one job, checked against the contract (it is logged once pushed)."""
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
        return Sent(msg, job, records, signing.digest(records), phase)

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
            where = f"{self.who(job)} failed in phase {phase!r} ({job.message_type})"
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
        from_superlink = reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error()
        if reply.metadata.src_node_id != sent.msg.metadata.dst_node_id and not from_superlink:
            raise WorkflowError(
                f"node {reply.metadata.src_node_id} answered a message sent to node "
                f"{sent.msg.metadata.dst_node_id} ({sent.msg.metadata.group_id}): refused"
            )
        return pending.pop(reply.metadata.reply_to_message_id)

    def online(self) -> dict[int, str]:
        """Node id -> when the SuperLink last activated it, for every node online now (and the
        name each was registered under, for messages about nodes not yet discovered)."""
        nodes = list(self.grid.get_nodes())
        self.registered.update({int(n.node_id): str(n.name) for n in nodes if n.name})
        return {int(n.node_id): str(n.last_activated_at) for n in nodes}

    def who(self, job: Job) -> str:
        """A job's site by name, or its node and the name the node was registered under."""
        if job.site is not None:
            return repr(job.site.name)
        name = self.registered.get(job.node_id)
        return f"node {job.node_id}" + (f" (registered as {name!r})" if name else "")

    def _push(self, sent: list[Sent], online: dict[int, str]) -> dict[str, Sent]:
        """Push messages and log each with the id the grid gave it; id -> what was sent.

        Raises:
            WorkflowError: the SuperLink did not take a message (too large, or malformed).
        """
        ids = list(self.grid.push_messages([s.msg for s in sent]))
        if len(ids) != len(sent) or None in ids:
            groups = ", ".join(s.msg.metadata.group_id for s in sent)
            raise WorkflowError(f"the SuperLink did not take message(s) {groups} (too large?)")
        for mid, s in zip(ids, sent, strict=True):
            s.msg.metadata.__dict__["_message_id"] = mid  # as the grid set it, for the ledger
            s.activated = online.get(s.job.node_id, "")
            self.log_message(s.phase, "out", s.msg, s.job.site, s.records)
        return dict(zip(ids, sent, strict=True))

    def _abandon(self, sent: Sent, reason: str) -> Job:
        """Note in the ledger that the server stopped waiting for ``sent`` (its node lost it)."""
        site = sent.job.site
        md = sent.msg.metadata
        name = self.who(sent.job)
        self.ledger.append(
            {
                "event": "abandoned",
                "time": now(),
                "run_id": self.run_id,
                "party": SERVER,
                "site": site.name if site else "",
                "phase": sent.phase,
                "message_type": md.message_type,
                "group_id": md.group_id,
                "message_id": md.message_id,
                "dst_node": sent.job.node_id,
                "reason": reason,
            }
        )
        self.log(f"{sent.phase}: {name} lost {md.group_id} ({reason}); sent again when online")
        return sent.job

    def round(
        self, phase: str, rnd: int, rounds: int, jobs: list[Job], timeout: float
    ) -> dict[str, list[tuple[Site, RecordDict]]]:
        """Send all jobs, pull their replies until all are in; return them grouped by job key.

        A job whose node lost its message (the SuperLink reports the node unavailable, or the node
        was activated again since) is sent again once the node is online, within ``timeout``.

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
        deadline = t + timeout
        out: dict[str, list[tuple[Site, RecordDict]]] = {}
        pending = self._push(sent, self.online())
        lost: list[Job] = []  # sent again once their node is back online
        while True:
            for reply in self.grid.pull_messages(list(pending)):
                match = self._match(reply, pending)
                if match is None:
                    self.log(f"{phase}: ignored a reply from node {reply.metadata.src_node_id} "
                             "to no message of this round")  # fmt: skip
                elif unavailable_notice(reply):
                    reason = "the SuperLink reports the node unavailable: no heartbeat"
                    lost.append(self._abandon(match, reason))
                else:
                    site = self._accept(phase, rnd, match, reply)
                    plog.bytes_received += messages.record_bytes(reply.content)
                    out.setdefault(match.job.key, []).append((site, reply.content))
            online = self.online()
            for mid, s in list(pending.items()):
                if s.lost_by(online):
                    del pending[mid]
                    lost.append(self._abandon(s, "the node was activated again"))
            back = [job for job in lost if job.node_id in online]
            left_s = deadline - time.monotonic()
            if back and left_s > 0:
                lost = [job for job in lost if job.node_id not in online]
                again = [self._outgoing(phase, rnd, job, left_s) for job in back]
                plog.bytes_sent += sum(messages.record_bytes(job.content) for job in back)
                pending.update(self._push(again, online))
            if (not pending and not lost) or left_s <= 0:
                break
            time.sleep(min(self.poll, left_s))
        left = [s.job for s in pending.values()] + lost
        if left:
            missing = ", ".join(sorted(f"{self.who(job)} ({job.key})" for job in left))
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
