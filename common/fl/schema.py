"""What weights may cross: the state-dict schema (names, shapes, dtypes) of the model an experiment
describes, built on the meta device (no memory, no checkpoint loading)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from common.config import ExperimentConfig, ModelConfig
from common.fl.contract import CONFIG, ENCODER, EXPERIMENT

Schema = dict[str, tuple[tuple[int, ...], str]]  # parameter name -> (shape, dtype name)


@lru_cache(maxsize=8)
def _schemas(model_json: str) -> tuple[Schema, Schema]:
    import torch

    from common.models import TransUNet, encoder_schema

    cfg = ModelConfig.model_validate_json(model_json)
    enc = {
        k: (tuple(s), str(d).removeprefix("torch.")) for k, (s, d) in encoder_schema(cfg).items()
    }
    with torch.device("meta"):
        model = TransUNet(cfg, num_classes=1)
    full = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
    return enc, full


def model_schema(cfg: ExperimentConfig, record: str) -> Schema:
    """The schema of the state dict that may ride in ``record`` (``encoder``, ``model.*``)."""
    enc, full = _schemas(cfg.model.model_dump_json())
    return enc if record == ENCODER else full


def schema_bytes(schema: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Bytes of a state dict with this schema (sum of nbytes)."""
    return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in schema.values())


@lru_cache(maxsize=32)
def _experiment(flat_json: str) -> ExperimentConfig:
    from common.fl.messages import unflatten_experiment

    return unflatten_experiment(json.loads(flat_json))


def experiment_of(records: list[dict]) -> ExperimentConfig | None:
    """The experiment config carried in a described request, or None (query.site)."""
    for rec in records:
        if rec["name"] == EXPERIMENT and rec["type"] == CONFIG:
            return _experiment(json.dumps(rec["config"], sort_keys=True))
    return None
