"""An in-process Flower runtime for fast workflow tests: the real ServerApp ``main`` and the real
ClientApp in one process, every message passed through Flower's own serialisation
(deflate → bytes → inflate, as the SuperLink stores them), no Ray, no SuperLink.

Leans on Flower internals (``TaskIdentity``, ``inflate_object_from_contents``); the
``flower_identity`` fixture in ``tests/conftest.py`` is the one place that sets the task identity.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run

from server.app import default_run_config

RUN_ID = 4242


def wire(msg: Message) -> tuple[Message, int]:
    """Serialise ``msg`` the way the runtime does and rebuild it.

    Returns:
        (copy, bytes on the wire).
    """
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    size = sum(len(c) for c in contents.values())
    out = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(out, Message)
    out.metadata.__dict__["_message_id"] = msg.metadata.message_id  # not part of the payload
    return out, size


@dataclass
class Sent:
    """What the harness saw cross: message type, destination, group, bytes each way."""

    message_type: str
    dst_node_id: int
    group_id: str
    bytes_out: int
    bytes_in: int = 0
    error: str = ""
    records_in: tuple[str, ...] = ()


@dataclass
class InProcessGrid(Grid):
    """A Grid whose nodes run ``client_app`` synchronously in this process.

    ``node_configs`` gives each node its ``node_config`` (simulation: partition-id; deployment:
    site/role/data-dir). Nodes listed in ``silent`` never answer (a timeout, as the server sees it).
    A node in ``outage`` (node -> how many of its next messages) loses its reply to the network
    and the SuperLink answers ``NODE_UNAVAILABLE`` instead; one in ``restarts`` loses it to a
    SuperNode restart (no reply, a new activation). Either way the site ran the job.
    """

    client_app: ClientApp
    node_configs: list[dict[str, Any]]
    run_config: dict[str, Any] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    outage: dict[int, int] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    log: list[Sent] = field(default_factory=list)
    pull_interval: float = 0.01  # seconds the server waits between pulls (Flower's grids: 3)
    names: dict[int, str] = field(default_factory=dict)  # the names node keys were registered as
    # each request as it arrived (a site takes the weights out of the message it handles)
    requests: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._run = Run.create_empty(RUN_ID)
        self.contexts = {
            100 + i: Context(RUN_ID, 100 + i, dict(nc), RecordDict(), dict(self.run_config))
            for i, nc in enumerate(self.node_configs)
        }
        self._inbox: dict[str, Message] = {}
        self.activations = dict.fromkeys(self.contexts, 1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [
            NodeInfo(
                node_id=n,
                last_activated_at=f"activation-{self.activations[n]}",
                name=self.names.get(n, ""),
            )
            for n in self.contexts
        ]

    def _loses(self, faults: dict[int, int], node: int) -> bool:
        if faults.get(node, 0) <= 0:
            return False
        faults[node] -= 1
        return True

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            copy, size = wire(msg)
            self._inbox[msg.metadata.message_id] = copy
            self.log.append(
                Sent(
                    msg.metadata.message_type, msg.metadata.dst_node_id, msg.metadata.group_id, size
                )
            )
            ids.append(msg.metadata.message_id)
        return ids

    def _handle(self, msg: Message) -> Message:
        ctx = self.contexts[msg.metadata.dst_node_id]
        from common.fl.describe import describe

        self.requests[msg.metadata.message_id] = describe(msg.content) if msg.has_content() else []
        try:
            return self.client_app(msg, ctx)
        except Exception as ex:  # as the runtime does: an exception becomes an error reply
            traceback.print_exc()
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            msg = self._inbox.pop(mid, None)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            node = msg.metadata.dst_node_id
            reply = self._handle(msg)
            if self._loses(self.restarts, node):
                self.activations[node] += 1
                continue
            if self._loses(self.outage, node):
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "no heartbeat"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            copy, size = wire(reply)
            sent = next(
                s
                for s in reversed(self.log)
                if s.group_id == msg.metadata.group_id and s.dst_node_id == msg.metadata.dst_node_id
            )
            sent.bytes_in = size
            sent.error = reply.error.reason if reply.has_error() else ""
            sent.records_in = tuple(reply.content.keys()) if reply.has_content() else ()
            replies.append(copy)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def sign_as_site(
    grid: InProcessGrid, request: Message, reply: Message, key_of: str = ""
) -> Message:
    """Sign ``reply`` the way the guard does, with the key of the site that node is (or of site
    ``key_of``): what a hostile site that runs without the guard but holds its own key can send
    (or one that forges another site's reply with its own key)."""
    from flwr.app import ConfigRecord

    from common.fl import signing
    from common.fl.contract import K_ALG, K_VALUE, SIGNATURE
    from common.fl.describe import describe

    md = request.metadata
    site = grid.contexts[md.dst_node_id].state.config_records["crossprobe-site"]
    if SIGNATURE in reply.content:
        del reply.content[SIGNATURE]
    stmt = signing.reply_statement(
        md,
        run_id=RUN_ID,
        site=str(site["name"]),
        request=signing.digest(grid.requests.get(md.message_id) or describe(request.content)),
        reply=signing.digest(describe(reply.content)),
    )
    key_file = Path(str(site["signing-key"]))
    if key_of:
        key_file = key_file.with_name(f"{key_of}{signing.PRIVATE_SUFFIX}")
    key = signing.load_private_key(str(key_file))
    reply.content[SIGNATURE] = ConfigRecord({K_ALG: signing.ALG, K_VALUE: signing.sign(key, stmt)})
    return reply


def run_server(server_app: ServerApp, grid: InProcessGrid) -> None:
    """Run the ServerApp's ``main`` against ``grid`` (the run config is the grid's)."""
    server_app(grid, Context(RUN_ID, 0, {}, RecordDict(), dict(grid.run_config)))


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """The Flower task identity ``Message(...)`` needs outside a runtime (internal API), set for the
    block; the ``flower_identity`` fixture in ``tests/conftest.py`` uses it for one test."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def site_grid(client_app: ClientApp, exp, run_dir, sites_root, n: int = 2, **rc) -> InProcessGrid:
    """An in-process grid of ``n`` simulated nodes running ``client_app`` for experiment ``exp``,
    with short timeouts; ``rc`` overrides run-config keys."""
    run_config = {
        **default_run_config(),
        "experiment": str(exp),
        "run-dir": str(run_dir),
        "sites-root": str(sites_root),
        "timeout-query": 10,
        "timeout-train": 60,
        "timeout-evaluate": 60,
        "node-wait": 1,
        "min-nodes": 0,
        **rc,
    }
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    simulated_keys(exp, run_dir)
    return InProcessGrid(client_app, nodes, run_config)


def materialise(cfg, folder: Path, name: str = "experiment") -> tuple[Path, Path]:
    """Experiment ``cfg`` written to ``folder/<name>.yaml`` and each of its sites made under
    ``folder/sites``: (experiment file, sites root) for :func:`site_grid`."""
    from common.config import dump_experiment
    from simulations.sites import ensure_site

    exp = folder / f"{name}.yaml"
    exp.write_text(dump_experiment(cfg))
    sites_root = folder / "sites"
    for site in cfg.sites:
        ensure_site(site, cfg.model.img_size, sites_root, progress=False)
    return exp, sites_root


def simulated_keys(exp, run_dir) -> dict:
    """Each site of experiment ``exp`` gets its key pair in ``<run_dir>/keys``, as the simulator
    does (``common.fl.signing.ensure_site_keys``)."""
    from common.config import load_experiment
    from common.fl.signing import ensure_site_keys

    names = [s.name for s in load_experiment(exp).sites]
    return ensure_site_keys(Path(run_dir) / "keys", names)
