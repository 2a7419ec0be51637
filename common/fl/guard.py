"""The site's guard: a ClientApp mod that checks every request and every reply against the wire
contract (``common/fl/contract.py``) before anything runs or leaves, and logs both in the site's
hash-chained ledger (``<site out dir>/ledger.jsonl``).

A reply that fails the check raises :class:`~common.fl.contract.ContractViolation`: Flower turns it
into an error reply naming the violation, and nothing of the reply is uploaded (fail closed). The
ledger keeps what was blocked, for the site's own investigation. A reply that passes is signed with
the site's own key (``common/fl/signing.py``) before it leaves; a site without a usable key sends
nothing but an error.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message

from common.fl import signing
from common.fl.contract import (
    K_ALG,
    K_VALUE,
    QUERY_SITE,
    SIGNATURE,
    ContractViolation,
    check,
    error_reason,
)
from common.fl.describe import describe, describe_record
from common.fl.ledger import LEDGER_NAME, SITE, Ledger, code_digest, message_entry, phase_of
from common.fl.schema import experiment_of


@dataclass(frozen=True)
class SiteInfo:
    name: str
    role: str
    out_dir: Path
    signing_key: str = ""  # the site's private key file (deployment: its SuperNode key)


ERROR_LOG = "errors.log"  # full tracebacks, at the site only


class SiteFailure(RuntimeError):
    """What a failing handler becomes on the wire: a short, bounded reason (the exception's type
    and first line, ``contract.error_reason``); the traceback is in the site's ``errors.log``."""


def _log_traceback(site: SiteInfo | None, mtype: str, reason: str) -> None:
    if site is None:
        return
    site.out_dir.mkdir(parents=True, exist_ok=True)
    with open(site.out_dir / ERROR_LOG, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {mtype}: {reason}\n")
        f.write(traceback.format_exc())


def _sign(site: SiteInfo, context: Context, msg: Message, request: list, records: list) -> bytes:
    """The site's signature of its reply ``records`` to ``msg`` (``signing.statement``).

    Raises:
        SiteFailure: the site has no usable signing key (the details go to its errors.log only).
    """
    md = msg.metadata
    try:
        if not site.signing_key:
            raise signing.SigningKeyError(
                f"site {site.name!r} has no signing key: start its SuperNode with --node-config "
                "signing-key=<its supernode.key>"
            )
        key = signing.load_private_key(site.signing_key)
    except signing.SigningKeyError as err:
        _log_traceback(site, md.message_type, str(err))
        raise SiteFailure(
            "SigningKeyError: this site cannot sign its reply (its errors.log says why)"
        ) from None
    stmt = signing.reply_statement(
        md,
        run_id=context.run_id,
        site=site.name,
        request=signing.digest(request),
        reply=signing.digest(records),
    )
    return signing.sign(key, stmt)


class Guard:
    """ClientApp mod: check every request and every reply, log both in the site's ledger.

    ``site_of(context)`` returns the site this node already knows it is (or None before its first
    ``query.site`` in simulation).
    """

    def __init__(self, site_of: Callable[[Context], SiteInfo | None]):
        self.site_of = site_of

    def _log(
        self,
        site: SiteInfo | None,
        context: Context,
        direction: str,
        msg: Message,
        records,
        **extra,
    ) -> None:
        """One ledger line; ``msg`` is always the request (an "out" line is its reply)."""
        if site is None:
            return  # the node does not know its site (setup error): no folder to write to
        md, me = msg.metadata, context.node_id
        entry = message_entry(
            SITE,
            direction,
            msg,
            records,
            run_id=context.run_id,
            site=site.name,
            role=site.role,
            phase=extra.pop("phase"),
            src_node=md.src_node_id if direction == "in" else me,
            dst_node=me if direction == "in" else md.src_node_id,
            code=code_digest(),
            **extra,
        )
        if direction == "out":
            entry["message_id"], entry["reply_to"] = "", md.message_id or ""
        Ledger(site.out_dir / LEDGER_NAME).append(entry)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        mtype = msg.metadata.message_type
        site = self.site_of(context)
        if mtype != QUERY_SITE and site is None:
            raise ContractViolation(f"{mtype}: this site has not been discovered (query.site) yet")
        request = describe(msg.content) if msg.has_content() else []
        phase = phase_of(request, mtype)
        reply, cfg = self._run_checked(msg, context, call_next, site, request, phase)
        site = site or self.site_of(context)  # query.site: known only after the handler ran
        if not reply.has_content():
            reason = reply.error.reason if reply.has_error() else "no content"
            self._log(site, context, "out", msg, [], phase=phase, error=reason)
            return reply
        records = describe(reply.content)
        try:
            check("reply", mtype, site.role if site else "", records, cfg, request=request)
        except ContractViolation as err:
            # the ledger keeps the whole finding and what was blocked; the wire gets a bound
            self._log(site, context, "out", msg, [], phase=phase, refused=str(err), blocked=records)
            raise ContractViolation(error_reason(err).removeprefix("ContractViolation: ")) from None
        try:
            sig = _sign(site, context, msg, request, records)
        except SiteFailure as err:
            self._log(site, context, "out", msg, [], phase=phase, error=str(err))
            raise
        signed = ConfigRecord({K_ALG: signing.ALG, K_VALUE: sig})
        reply.content[SIGNATURE] = signed
        records = [*records, describe_record(SIGNATURE, signed)]
        self._log(site, context, "out", msg, records, phase=phase, signature=sig.hex())
        return reply

    def _run_checked(self, msg, context, call_next, site, request, phase):
        """Check the request, log it, run the handler; (reply, experiment of the request).

        The request is logged before anything runs; for ``query.site`` the site is known only
        after the handler, so its "in" line is written then. A failure is logged as an "out" line
        with the error, then re-raised (Flower sends the error reply)."""
        mtype = msg.metadata.message_type
        logged_in = False
        try:
            cfg = experiment_of(request)
            if mtype != QUERY_SITE:
                check("request", mtype, site.role, request, cfg)
            if site is not None:
                self._log(site, context, "in", msg, request, phase=phase)
                logged_in = True
            reply = call_next(msg, context)
        except Exception as err:
            site = site or self.site_of(context)
            if not logged_in:
                self._log(site, context, "in", msg, request, phase=phase)
            reason = error_reason(err)
            _log_traceback(site, mtype, reason)
            self._log(site, context, "out", msg, [], phase=phase, error=reason)
            raise SiteFailure(reason) from None
        if not logged_in:
            self._log(site or self.site_of(context), context, "in", msg, request, phase=phase)
        return reply, cfg
