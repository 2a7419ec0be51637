"""Which site this node is, where its data lives, where its local outputs go.

Facts about a site come from that site: in deployment from the SuperNode's ``--node-config``
(``site``, ``role``, ``data-dir``, optional ``out-dir`` — default
``$FLWR_HOME/crossprobe-outputs/<site>`` — optional ``checkpoint``, a local backbone file, and
``signing-key``, the private key the site signs its replies with: its SuperNode key); in
simulation, where ``node_config`` is only ``{partition-id, num-partitions}``, from the
experiment's ``sites`` table that the simulator sends with ``query.site`` (index =
partition-id). The answer is kept in ``context.state`` (node-local, never sent), so later
messages of the run know it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from common.fl.contract import ROLES

_STATE = "crossprobe-site"  # node-local state record (context.state never leaves the node)


class SiteSetupError(RuntimeError):
    """This node cannot tell which site it is or where its data is."""


@dataclass(frozen=True)
class LocalSite:
    name: str
    role: str
    data_dir: Path
    out_dir: Path  # site-local artifacts: checkpoints, weight maps, overlays
    checkpoint: str = ""  # this site's own local backbone checkpoint ("" = none)
    signing_key: str = ""  # this site's private key file ("" = none: it cannot reply)


def resolve_site(context: Context, federation: list[tuple[str, ...]] | None = None) -> LocalSite:
    """Resolve (and remember in ``context.state``) this node's site.

    Raises:
        SiteSetupError: no ``data-dir`` in node_config and no usable simulation table.
    """
    nc = context.node_config
    if "data-dir" in nc:  # deployment: the operator's --node-config
        data_dir = Path(str(nc["data-dir"]))
        name = str(nc.get("site", data_dir.name))
        role = str(nc.get("role", ""))
        # default beside FLWR_HOME (writable by the node), never beside the data: that is often
        # mounted read-only
        default_out = (
            Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser() / "crossprobe-outputs"
        )
        out = Path(str(nc.get("out-dir", default_out / name))) / f"run-{context.run_id}"
        checkpoint = str(nc.get("checkpoint", ""))
        signing_key = str(nc.get("signing-key", ""))
    elif "partition-id" in nc and federation:  # simulation: the experiment's sites[partition-id]
        pid = int(nc["partition-id"])
        if pid >= len(federation):
            raise SiteSetupError(
                f"partition-id {pid} has no site: the experiment lists {len(federation)} site(s); "
                "run the simulation with num-supernodes equal to the number of sites"
            )
        name, role, dd, od, checkpoint, signing_key = federation[pid]
        data_dir, out = Path(dd), Path(od)
    elif _STATE in context.state.config_records:
        rec = context.state.config_records[_STATE]
        name, role = str(rec["name"]), str(rec["role"])
        data_dir, out = Path(str(rec["data-dir"])), Path(str(rec["out-dir"]))
        checkpoint, signing_key = str(rec["checkpoint"]), str(rec["signing-key"])
    else:
        raise SiteSetupError(
            "this SuperNode does not know its site: start it with "
            '--node-config \'site="NAME" role="source|target" data-dir="/path"\''
        )
    if role not in ROLES:
        raise SiteSetupError(f"site {name!r}: role must be one of {ROLES} (got {role!r})")
    context.state[_STATE] = ConfigRecord(
        {
            "name": name,
            "role": role,
            "data-dir": str(data_dir),
            "out-dir": str(out),
            "checkpoint": str(checkpoint),
            "signing-key": str(signing_key),
        }
    )
    return LocalSite(name, role, data_dir, out, str(checkpoint), str(signing_key))


def known_site(context: Context):
    """The site this node already knows it is (``common.fl.guard.SiteInfo``), or None before its
    first ``query.site`` in simulation. For the guard and the site's ledger."""
    from common.fl.guard import SiteInfo

    try:
        site = resolve_site(context)
    except SiteSetupError:
        return None
    return SiteInfo(site.name, site.role, site.out_dir, site.signing_key)


def load_data(site: LocalSite):
    """The site's canonical data folder (``common.data.manifest.load_site``)."""
    from common.data.manifest import load_site

    return load_site(site.data_dir)


def site_card(site: LocalSite) -> dict[str, Any]:
    """What the site tells the server about itself: name, role and counts (no frames)."""
    card = dict(load_data(site).card())
    card["name"], card["role"] = site.name, site.role  # the node's own config is authoritative
    return card
