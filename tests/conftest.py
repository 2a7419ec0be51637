"""Shared fixtures: the Flower task identity for in-process messages; test process settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.compose import engine, wheels_url  # noqa: F401  (fixtures of the container tests)

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # tests name configs/*.yaml relative to the repository root
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one torch thread per xdist worker: no oversubscription on 2 cores


@pytest.fixture
def flower_identity():
    """``Message(...)`` outside a Flower runtime needs ``TaskIdentity`` (internal API); it is set in
    one place, ``tests.fl_harness.task_identity``, for the duration of one test here."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.fl_harness import task_identity

    with task_identity():
        yield TaskIdentity
