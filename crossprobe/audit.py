"""`crossprobe audit`: check, after the fact, that only declared model weights and bounded scalars
crossed — from the hash-chained ledgers the server and every site wrote (``common/fl/audit.py``).

    crossprobe audit runs/tiny                server ledger + the simulated sites' ledgers
    crossprobe audit --site /data/out/site-a  one site's own ledger(s), independently of the server
    crossprobe audit RUN_DIR --site DIR ...   a deployed run's server ledger against site ledgers

Exit codes (the first that applies, in the order 3, 4, 6, 5, 2): 0 pass, 1 no ledger found, 2 a
ledger ends in a line cut short by a crash (the next run repairs it), 3 a chain is broken (a line
edited, deleted, inserted or reordered), 4 something outside the contract crossed, 5 site and
server ledgers disagree, 6 a reply the server took in is unsigned, its signature does not verify
against the site's public key, or there is no key to check it with. A message the server sent that
a crashed site never logged nor answered is reported as an incomplete exchange, not a failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer


def audit_command(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="Run folder: <run-dir>/ledger.jsonl and sites/<site>/ledger.jsonl."),
    ] = None,
    site: Annotated[
        list[Path] | None,
        typer.Option(
            "--site",
            help="A site's output folder or ledger file (repeatable); alone: audit that site only.",
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            help="Folder of each site's public key <site>.pub (deployed: certs/superlink/"
            "supernodes); default: the run folder's keys/ (simulation).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Verify the ledgers' hash chains, the wire contract, the model schema of every array, and that
    what each site sent is what the server received (and the other way round)."""
    from common.fl.audit import audit_run

    if run_dir is None and not site:
        raise typer.BadParameter("give a run folder, or --site DIR", param_hint="RUN_DIR")
    t = time.monotonic()
    report = audit_run(run_dir, site or [], keys)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "exit_code": report.exit_code,
                    "ledgers": [
                        {"path": str(lf.path), "entries": len(lf.entries), "head": lf.head}
                        for lf in report.ledgers
                    ],
                    "chain": report.chain,
                    "contract": report.contract,
                    "mismatch": report.mismatch,
                    "signature": report.signature,
                    "torn": report.torn,
                    "incomplete": report.incomplete,
                    "notes": report.notes,
                    "bytes": [
                        {"party": a, "phase": b, "direction": c, "bytes": n}
                        for (a, b, c), n in sorted(report.bytes.items())
                    ],
                    "model_bytes": report.model_bytes,
                    "capacity": [
                        {"message_type": m, "site": s, "used": u, "allowed": c}
                        for (m, s), (u, c) in sorted(report.capacity.items())
                    ],
                },
                indent=2,
            )
        )
    else:
        typer.echo(report.render())
        typer.echo(f"audited in {time.monotonic() - t:.2f} s")
    raise typer.Exit(report.exit_code)
