"""``crossprobe audit``, offline: proof that only weights and bounded scalars crossed.

:func:`audit_run` reads the server's and the sites' hash-chained ledgers (``common/fl/ledger.py``),
verifies every chain, re-applies the contract check (``common/fl/contract.py``) to every logged
message, verifies the site's signature of every reply the server accepted against that site's
public key (``common/fl/signing.py``), and matches what each site sent with what the server
received (and the other way round) by record and array hash. docs/audit.md explains the findings
and exit codes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.common.constant import SUPERLINK_NODE_ID

from common.fl import signing
from common.fl.contract import (
    ENCODER,
    MODEL,
    QUERY_SITE,
    SIGNATURE,
    ContractViolation,
    check,
    non_weight_bytes,
    reply_capacity,
)
from common.fl.describe import array_bytes
from common.fl.ledger import LEDGER_NAME, SERVER, SITE, LedgerFile, canonical, read_ledger
from common.fl.schema import experiment_of, model_schema, schema_bytes

# `crossprobe audit` exit codes (the first that applies, in the order of AuditReport.exit_code).
EXIT_OK, EXIT_NO_LEDGER, EXIT_TORN, EXIT_CHAIN, EXIT_CONTRACT, EXIT_MISMATCH = 0, 1, 2, 3, 4, 5
EXIT_SIGNATURE = 6


@dataclass
class AuditReport:
    ledgers: list[LedgerFile] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    contract: list[str] = field(default_factory=list)
    mismatch: list[str] = field(default_factory=list)
    signature: list[str] = field(default_factory=list)  # unsigned, forged or unverifiable replies
    torn: list[str] = field(default_factory=list)  # a last line cut short by a crash
    incomplete: list[str] = field(default_factory=list)  # sent, never logged nor answered
    notes: list[str] = field(default_factory=list)
    bytes: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: defaultdict(int)
    )  # (party, phase, dir)
    model_bytes: dict[str, int] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (message type, site) -> (most non-weight bytes a reply used, most its request allowed)
    capacity: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if not self.ledgers:
            return EXIT_NO_LEDGER
        for code, errs in (
            (EXIT_CHAIN, self.chain),
            (EXIT_CONTRACT, self.contract),
            (EXIT_SIGNATURE, self.signature),  # proves what a mismatch suggests, server-side alone
            (EXIT_MISMATCH, self.mismatch),
            (EXIT_TORN, self.torn),
        ):
            if errs:
                return code
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def render(self) -> str:
        mb = lambda n: f"{n / 2**20:10.3f} MB"  # noqa: E731
        lines = ["ledgers:"]
        for lf in self.ledgers:
            lines.append(f"  {lf.path}  {len(lf.entries)} entries  head {lf.head[:16]}")
        if self.model_bytes:
            lines.append(
                "model sizes: "
                + ", ".join(f"{k} {mb(v).strip()} ({v} B)" for k, v in self.model_bytes.items())
            )
        if self.bytes:
            lines.append("array bytes per phase and direction (as each party logged them):")
            lines.append(f"  {'party':<22}{'phase':<10}{'dir':<5}{'bytes':>14}{'':>14}")
            for (party, phase, d), n in sorted(self.bytes.items()):
                lines.append(f"  {party:<22}{phase or '-':<10}{d:<5}{n:>14}{mb(n):>14}")
        if self.capacity:
            lines.append("non-weight bytes per reply (the most used / the most its request allows)")
            for (mtype, site), (used, cap) in sorted(self.capacity.items()):
                lines.append(f"  {mtype:<18}{site:<20}{used:>10} B /{cap:>10} B")
        lines.append("checked: " + ", ".join(f"{v} {k}" for k, v in sorted(self.checked.items())))
        for title, errs in (
            ("CHAIN BROKEN", self.chain),
            ("CONTRACT VIOLATION", self.contract),
            ("MISMATCH site vs server", self.mismatch),
            ("SIGNATURE", self.signature),
            ("TORN (a crash cut the last line; the next run repairs it)", self.torn),
            (
                "INCOMPLETE exchange (a crash or timeout: never logged, never answered)",
                self.incomplete,
            ),
            ("note", self.notes),
        ):
            lines += [f"{title}: {e}" for e in errs[:50]]
            if len(errs) > 50:
                lines.append(f"{title}: … {len(errs) - 50} more")
        verdict = {
            EXIT_OK: "PASS: only declared model weights and bounded scalars crossed; ledgers agree",
            EXIT_NO_LEDGER: "FAIL: no ledger found",
            EXIT_CHAIN: "FAIL: a ledger chain is broken",
            EXIT_CONTRACT: "FAIL: something outside the contract crossed",
            EXIT_MISMATCH: "FAIL: site and server ledgers disagree",
            EXIT_SIGNATURE: "FAIL: a reply is unsigned, forged, or its signature cannot be checked",
            EXIT_TORN: "FAIL: a ledger ends in a line cut short by a crash (not an edit)",
        }[self.exit_code]
        lines.append(verdict)
        return "\n".join(lines)


def _find_site_ledgers(site_dir: Path) -> list[Path]:
    site_dir = Path(site_dir)
    if site_dir.is_file():
        return [site_dir]
    if (site_dir / LEDGER_NAME).is_file():
        return [site_dir / LEDGER_NAME]
    return sorted(site_dir.glob(f"*/{LEDGER_NAME}"))  # deployment: <out-dir>/run-<id>/ledger.jsonl


def _is_request(e: dict) -> bool:
    """A request as its party saw it: the server sending, or a site receiving."""
    party = e.get("party")
    return (party == SERVER and e["direction"] == "out") or (
        party == SITE and e["direction"] == "in"
    )


def _request_key(e: dict) -> tuple:
    """What pairs a reply with its request when the ledger has no message ids: at the server the
    node (a discovery request goes out before the node's site is known), at a site its name."""
    if e.get("party") == SERVER:
        node = e["dst_node"] if _is_request(e) else e["src_node"]
        return (None, e.get("group_id"), e.get("message_type"), node)
    return (e.get("site"), e.get("group_id"), e.get("message_type"), None)


def _party_label(e: dict) -> str:
    return f"{e.get('party')}:{e.get('site')}" if e.get("party") == SITE else SERVER


def _check_request(e: dict, rep: AuditReport) -> None:
    records = e.get("records", [])
    cfg = experiment_of(records)
    if cfg is not None and not rep.model_bytes:
        rep.model_bytes = {
            "encoder": schema_bytes(model_schema(cfg, ENCODER)),
            "model": schema_bytes(model_schema(cfg, MODEL)),
        }
    if e["message_type"] != QUERY_SITE:
        check("request", e["message_type"], e.get("role", ""), records, cfg)
    rep.checked["requests"] += 1


def _check_reply(e: dict, request: dict | None, where: str, rep: AuditReport) -> None:
    cfg = experiment_of(request.get("records", [])) if request else None
    rep.checked["replies"] += 1
    if e.get("refused") and e.get("party") == SITE:
        rep.notes.append(
            f"{where}: {_party_label(e)} refused a reply ({e['refused']}); nothing was sent"
        )
    elif e.get("refused"):
        rep.contract.append(
            f"{where}: the server received a reply outside the contract "
            f"(and refused it): {e['refused']}"
        )
        return
    if e.get("records"):
        if request is None:
            raise ContractViolation("a reply to no request in this ledger")
        mtype, role, asked = e["message_type"], e.get("role", ""), request.get("records", [])
        check("reply", mtype, role, e["records"], cfg, request=asked)
        if e.get("party") == SERVER:
            key = (mtype, str(e.get("site", "")))
            used, cap = rep.capacity.get(key, (0, 0))
            rep.capacity[key] = (
                max(used, non_weight_bytes(e["records"])),
                max(cap, reply_capacity(mtype, asked)),
            )


def _check_ledger(lf: LedgerFile, rep: AuditReport) -> None:
    """Re-apply the contract check to every message in one ledger; collect bytes per phase."""
    requests: dict[Any, dict] = {}  # message_id or (site, group, type, node) -> request entry
    for no, e in lf.entries:
        if e.get("event") != "message":
            continue
        where = f"{lf.path}:{no}"
        records = e.get("records", [])
        rep.bytes[(_party_label(e), e.get("phase", ""), e["direction"])] += array_bytes(records)
        try:
            if _is_request(e):
                requests[_request_key(e)] = e
                if e.get("message_id"):
                    requests[e["message_id"]] = e
                _check_request(e, rep)
            else:
                req = requests.get(e.get("reply_to")) or requests.get(_request_key(e))
                _check_reply(e, req, where, rep)
        except (ContractViolation, ValueError) as err:
            rep.contract.append(f"{where}: {err}")
        except (KeyError, TypeError, AttributeError) as err:  # a described record out of shape
            rep.contract.append(f"{where}: malformed record ({type(err).__name__}: {err})")


def _digest(e: dict) -> list:
    """What must agree between the two ends of one message: records and array hashes."""
    return sorted(
        (
            r["name"],
            r["type"],
            tuple(sorted((a["name"], a["sha256"]) for a in r.get("arrays", ()))),
            canonical(r.get("metrics", r.get("config", {}))) if r["type"] != "ArrayRecord" else "",
        )
        for r in e.get("records", [])
    )


_FLIP = {"in": "out", "out": "in"}
SiteIndex = dict[tuple, list[tuple[Path, int, dict]]]  # message key -> (ledger, line, entry)


def _message_key(e: dict, node: int, direction: str) -> tuple:
    return (e.get("run_id"), node, e.get("group_id"), e.get("message_type"), direction)


def _index_sites(sites: list[LedgerFile]) -> tuple[SiteIndex, set[str]]:
    """Every site-side message by key, and the names of the sites whose ledgers were given."""
    index: SiteIndex = defaultdict(list)
    names: set[str] = set()
    for lf in sites:
        for no, e in lf.entries:
            if e.get("event") == "message":
                node = e["dst_node"] if e["direction"] == "in" else e["src_node"]
                index[_message_key(e, node, e["direction"])].append((lf.path, no, e))
                names.add(e.get("site", ""))
    return index, names


def _server_messages(server: LedgerFile):
    """(line, entry, node, site name) of every message the server logged."""
    names = {
        e["src_node"]: e["site"]
        for _, e in server.entries
        if e.get("event") == "message" and e["direction"] == "in" and e.get("site")
    }
    for no, e in server.entries:
        if e.get("event") == "message" and not _from_superlink(e):
            node = e["dst_node"] if e["direction"] == "out" else e["src_node"]
            yield no, e, node, e.get("site") or names.get(node, "")


def _from_superlink(e: dict) -> bool:
    """An error reply the SuperLink wrote itself (e.g. the node missed its heartbeats): no site
    sent it, so no site ledger shows it."""
    by_superlink = e.get("src_node") == SUPERLINK_NODE_ID
    return e["direction"] == "in" and by_superlink and bool(e.get("error"))


def _runtime_error_reply(e: dict) -> bool:
    """An error reply with nothing else in it: what Flower's runtime sends for a node whose
    ClientApp died mid-job (killed, out of memory) before the site's guard could log a reply. It
    carries only a reason, which the server bounds and logs in full, so no site data rides it."""
    return e["direction"] == "in" and bool(e.get("error")) and not e.get("records")


def _abandoned(server: LedgerFile) -> dict[str, dict]:
    """Message id -> the server's note that it stopped waiting for that message (its node lost
    it) and sent the job again."""
    return {
        str(e.get("message_id")): e
        for _, e in server.entries
        if e.get("event") == "abandoned" and e.get("message_id")
    }


def _answer(server: LedgerFile, sent: dict, node: int) -> dict | None:
    """The reply (or error) the server logged for this message it sent, if any."""
    key = (sent.get("run_id"), node, sent.get("group_id"), sent.get("message_type"))
    return next(
        (
            e
            for _, e in server.entries
            if e.get("event") == "message"
            and e.get("direction") == "in"
            and (e.get("run_id"), e.get("src_node"), e.get("group_id"), e.get("message_type"))
            == key
        ),
        None,
    )


def _match_one(
    server: LedgerFile,
    no: int,
    e: dict,
    node: int,
    name: str,
    index: SiteIndex,
    used: set[int],
    abandoned: dict[str, dict],
    rep: AuditReport,
) -> None:
    """Find the site's side of one server message and compare the two."""
    cands = [
        c
        for c in index.get(_message_key(e, node, _FLIP[e["direction"]]), [])
        if id(c[2]) not in used
    ]
    # a job sent twice has two messages under one key: pair them by message id where both
    # ledgers logged it
    same = "reply_to" if e["direction"] == "in" else "message_id"
    if e.get(same):
        cands = [c for c in cands if c[2].get(same) in (None, "", e[same])]
    if not cands and e["direction"] == "out" and e.get("message_id") in abandoned:
        rep.checked["messages lost and sent again"] += 1  # its node never got it
        return
    answer = _answer(server, e, node) if not cands and e["direction"] == "out" else None
    if not cands and e["direction"] == "out" and (answer is None or _runtime_error_reply(answer)):
        by_flower = "" if answer is None else " (Flower's runtime sent an error in its name)"
        rep.incomplete.append(
            f"{server.path}:{no}: the server sent {e['message_type']} ({e.get('group_id')}) to "
            f"site {name!r}, which neither logged nor answered it{by_flower}"
        )
        return
    if not cands and _runtime_error_reply(e):
        rep.incomplete.append(
            f"{server.path}:{no}: the server received an error reply to {e['message_type']} "
            f"({e.get('group_id')}) that site {name!r}'s ledger does not show: its ClientApp "
            f"stopped before its guard logged a reply, and Flower answered for it ({e['error']})"
        )
        return
    if not cands:
        did = "sent" if e["direction"] == "out" else "received"
        rep.mismatch.append(
            f"{server.path}:{no}: the server {did} {e['message_type']} ({e.get('group_id')}) "
            f"that site {name!r}'s ledger does not show"
        )
        return
    path, sno, se = cands[0]
    used.add(id(se))
    if e["direction"] == "in" and e.get("error") and se.get("refused") is not None:
        return  # refused at the site: the server got the error reply, nothing else
    if _digest(e) != _digest(se):
        rep.mismatch.append(
            f"{server.path}:{no} vs {path}:{sno}: {e['message_type']} ({e.get('group_id')}) "
            "differs between server and site (records or array hashes)"
        )
    rep.checked["matched messages"] += 1


def _failed(e: dict) -> bool:
    return bool(e.get("error") or e.get("refused") or e.get("unverified"))


def _server_stopped_waiting(server: LedgerFile, reply: dict) -> bool:
    """Did the server's run end while it waited for ``reply``? True when the server logged the
    request and, in that run afterwards, received nothing at all (its process died or timed out)
    or nothing after a reply that ended the run (an error or a refusal: the server reads no
    more); a server that went on receiving other replies but not this one is a mismatch."""
    key = (reply.get("run_id"), reply["src_node"], reply.get("group_id"), reply["message_type"])
    sent_at = next(
        (
            i
            for i, (_, e) in enumerate(server.entries)
            if e.get("event") == "message"
            and e["direction"] == "out"
            and (e.get("run_id"), e["dst_node"], e.get("group_id"), e["message_type"]) == key
        ),
        None,
    )
    if sent_at is None:
        return False
    later = [
        e
        for _, e in server.entries[sent_at + 1 :]
        if e.get("event") == "message" and e["direction"] == "in" and e.get("run_id") == key[0]
    ]
    return not later or _failed(later[-1])


def _unreceived_sends(
    server: LedgerFile,
    index: SiteIndex,
    used: set[int],
    sites: set[str],
    abandoned: dict[str, dict],
    rep: AuditReport,
) -> None:
    """Replies a site logged as sent, in a run the server logged, that the server never shows."""
    runs = {e.get("run_id") for _, e in server.entries}
    for items in index.values():
        for path, sno, se in items:
            if id(se) in used or se.get("site") not in sites or se.get("run_id") not in runs:
                continue
            if se["direction"] != "out" or not se.get("records"):
                continue
            what = f"{path}:{sno}: the site sent {se['message_type']} ({se.get('group_id')})"
            gave_up = abandoned.get(str(se.get("reply_to", "")))
            if gave_up is not None:
                rep.notes.append(
                    f"{what} after the server had stopped waiting for it ({gave_up['reason']}) "
                    "and sent the job again"
                )
            elif _server_stopped_waiting(server, se):
                rep.incomplete.append(f"{what}; the server's run ended before it arrived")
            else:
                rep.mismatch.append(f"{what} that the server's ledger does not show it received")


def _cross_check(
    server: LedgerFile, sites: list[LedgerFile], rep: AuditReport, expect: set[str]
) -> None:
    """Every message the server logged must appear in that site's ledger with the same hashes,
    and every reply a site sent must appear in the server's."""
    index, given = _index_sites(sites)
    abandoned = _abandoned(server)
    seen: set[str] = set()
    used: set[int] = set()
    for no, e, node, name in _server_messages(server):
        if name in given:
            seen.add(name)
            _match_one(server, no, e, node, name, index, used, abandoned, rep)
        elif name in expect:
            rep.mismatch.append(
                f"{server.path}:{no}: no ledger for site {name!r} (expected under its folder)"
            )
            expect.discard(name)
    _unreceived_sends(server, index, used, seen, abandoned, rep)


def _signature_problem(e: dict, request: dict | None, keys: Path | None) -> str:
    """Why the site's signature of a reply the server accepted does not hold ("" = it does)."""
    if e.get("unverified"):
        return f"the server refused a reply as {e['unverified']}"
    if not e.get("signature"):
        return "the server accepted a reply that carries no signature"
    if request is None:
        return "a signed reply to no request in the server ledger"
    site = str(e.get("site", ""))
    if keys is None:
        return f"no public keys to check site {site!r}'s signature against (pass --keys DIR)"
    path = signing.public_key_path(keys, site)
    try:
        key = signing.load_public_key(str(path))
        sig = bytes.fromhex(e["signature"])
    except (signing.SigningKeyError, ValueError, TypeError) as err:
        return f"site {site!r}'s signature cannot be checked: {err}"
    if e.get("key") and e["key"] != signing.fingerprint(key):
        return f"the server verified site {site!r} with another key than {path}"
    stmt = signing.statement(
        run_id=e.get("run_id"),
        node=e["src_node"],
        site=site,
        message_type=e["message_type"],
        group_id=str(e.get("group_id", "")),
        request_id=str(e.get("reply_to", "")),
        request=signing.digest(request.get("records", [])),
        reply=signing.digest(e["records"], skip=SIGNATURE),
    )
    return "" if signing.verify(key, stmt, sig) else f"site {site!r}'s signature does not verify"


def _check_signatures(server: LedgerFile, keys: Path | None, rep: AuditReport) -> None:
    """Every reply the server took in must carry its site's valid signature of exactly that reply
    to exactly the request the server logged sending."""
    sent: dict[Any, dict] = {}  # (run, group, type, node) and message id -> request
    for no, e in server.entries:
        if e.get("event") != "message":
            continue
        key = (e.get("run_id"), e.get("group_id"), e.get("message_type"))
        if e["direction"] == "out":
            sent[(*key, e["dst_node"])] = e
            if e.get("message_id"):
                sent[e["message_id"]] = e
            continue
        if e.get("error") or not (e.get("records") or e.get("unverified")):
            continue  # an error reply carries nothing to sign
        request = sent.get(e.get("reply_to")) or sent.get((*key, e["src_node"]))
        try:
            problem = _signature_problem(e, request, keys)
        except (KeyError, TypeError, AttributeError) as err:  # a described record out of shape
            problem = f"malformed entry ({type(err).__name__}: {err})"
        if problem:
            rep.signature.append(f"{server.path}:{no}: {problem}")
        else:
            rep.checked["signatures"] += 1


def audit_run(
    run_dir: Path | None = None, site_dirs: Iterable[Path] = (), keys: Path | None = None
) -> AuditReport:
    """Audit a run folder (server ledger + ``sites/*/ledger.jsonl``) and/or site folders;
    ``keys`` holds each site's public key ``<site>.pub`` (default: the run folder's ``keys``)."""
    rep = AuditReport()
    server: LedgerFile | None = None
    site_paths: list[Path] = []
    expect: set[str] = set()
    if run_dir is not None:
        run_dir = Path(run_dir)
        if keys is None and (run_dir / "keys").is_dir():
            keys = run_dir / "keys"  # a simulated run's site keys
        if (run_dir / LEDGER_NAME).is_file():
            server = read_ledger(run_dir / LEDGER_NAME)
        else:
            rep.notes.append(f"{run_dir}: no server ledger ({LEDGER_NAME})")
        for d in sorted((run_dir / "sites").glob("*")) if (run_dir / "sites").is_dir() else []:
            found = _find_site_ledgers(d)
            site_paths += found
            if d.is_dir():
                expect.add(d.name)
    for d in site_dirs:
        found = _find_site_ledgers(d)
        if not found:
            rep.notes.append(f"{d}: no {LEDGER_NAME} here")
        site_paths += found
    sites = [read_ledger(pth) for pth in dict.fromkeys(site_paths)]
    rep.ledgers = ([server] if server else []) + sites
    for lf in rep.ledgers:
        if lf.chain_error:
            rep.chain.append(lf.chain_error)
        if lf.torn:
            rep.torn.append(lf.torn)
        rep.notes += [
            f"{lf.path}:{no}: repaired after a crash ({e.get('torn_bytes')} bytes of a cut line "
            "removed, kept in the .torn file)"
            for no, e in lf.entries
            if e.get("event") == "repair"
        ]
        _check_ledger(lf, rep)
    if server is not None:
        if not sites:
            rep.notes.append(
                "no site ledgers given: server-side checks only (add --site DIR to cross-check)"
            )
        _cross_check(server, sites, rep, expect)
        _check_signatures(server, keys, rep)
        for _, e in server.entries:
            if e.get("event") == "run" and e.get("fab_hash"):
                rep.notes.append(f"run {e.get('run_id')}: FAB hash {e['fab_hash']}")
    return rep
