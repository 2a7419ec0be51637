"""Shared fixtures: the Flower task identity for in-process messages."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_identity():
    """``Message(...)`` outside a Flower runtime needs ``TaskIdentity`` (internal API): set it here,
    and only here, for the duration of one test."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from tests.fl_harness import RUN_ID

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

