"""The wire contract: every message type, record name and who may send what, named once.

Server and sites import these names; no handler spells a wire name as a literal. The tables
``ALLOWED_REQUEST_RECORDS`` / ``ALLOWED_REPLY_RECORDS`` are data so the audit guard
(``common/fl/audit.py``) can enforce the same allow-list fail-closed; ``check_reply`` is the
minimal version of that check used on both sides today.

What crosses (architecture.md, "The wire contract"):

| message type       | request                                   | reply                        |
|--------------------|-------------------------------------------|------------------------------|
| query.site         | federation table (simulation only)        | site card                    |
| train.pretrain     | experiment + stage config, [encoder]      | encoder weights + metrics    |
| train.finetune     | experiment + stage config, [encoder|model]| model weights + metrics      |
| evaluate.segment   | experiment + stage config, models         | metrics + per-image scores   |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.config import unflatten_dict

from common.config import ExperimentConfig, parse_experiment

# --- roles -----------------------------------------------------------------------------------
SOURCE = "source"
TARGET = "target"
ROLES = (SOURCE, TARGET)

# --- message types (Flower 1.42: "<train|evaluate|query>.<action>") --------------------------
QUERY_SITE = "query.site"
TRAIN_PRETRAIN = "train.pretrain"
TRAIN_FINETUNE = "train.finetune"
EVALUATE_SEGMENT = "evaluate.segment"
MESSAGE_TYPES = (QUERY_SITE, TRAIN_PRETRAIN, TRAIN_FINETUNE, EVALUATE_SEGMENT)


def action(message_type: str) -> str:
    """The ClientApp action of a message type: ``action("train.pretrain") == "pretrain"``."""
    return message_type.split(".", 1)[1]


# --- record names ----------------------------------------------------------------------------
FEDERATION = "federation"  # ConfigRecord: simulation table partition-id -> site (query only)
EXPERIMENT = "experiment"  # ConfigRecord: the flat experiment config the site runs with
STAGE = "stage"  # ConfigRecord: what to do (branch / arm / round / models / fusions)
ENCODER = "encoder"  # ArrayRecord: encoder-only state dict
MODEL = "model"  # ArrayRecord: full TransUNet state dict (finetune reply / next-round init)
MODEL_PREFIX = "model."  # ArrayRecords "model.<arm>" in an evaluate request
SITE_CARD = "site"  # ConfigRecord: name, role, counts.<split>.<videos|frames|labeled>
METRICS = "metrics"  # MetricRecord: scalars, always including NUM_EXAMPLES
SCORES = "scores"  # MetricRecord: per-image score vectors "<method>/<dice|iou>"
VIDEO_SCORES = "video-scores"  # MetricRecord: per-video mean score vectors, same keys
PATIENT_SCORES = "patient-scores"  # MetricRecord: per-patient mean score vectors, same keys

NUM_EXAMPLES = "num-examples"  # the weighting key for federated averaging

# Keys of the STAGE record.
K_PHASE = "phase"
K_ROUND = "round"
K_BRANCH = "branch"
K_ARM = "arm"
K_MODELS = "models"
K_FUSIONS = "fusions"
K_SPLIT = "split"
# Keys of the FEDERATION record (parallel lists, index = partition-id).
K_NAMES = "names"
K_ROLES = "roles"
K_DATA_DIRS = "data-dirs"
K_OUT_DIRS = "out-dirs"
# Keys of the SITE_CARD record.
K_NAME = "name"
K_ROLE = "role"

# Pretraining branches and fine-tuning arms (the names the report uses).
SIMMIM = "simmim"
CONTRASTIVE = "contrastive"  # MT-NXent, min_frame_gap from the experiment
SIMCLR = "simclr"  # contrastive with min_frame_gap = 0
BRANCHES = (SIMMIM, CONTRASTIVE, SIMCLR)
ARM_OF_BRANCH = {SIMMIM: "simmim", CONTRASTIVE: "mtnxent", SIMCLR: "simclr"}
LOWER = "lower"
UPPER = "upper"
FUSION_PAIR = (ARM_OF_BRANCH[SIMMIM], ARM_OF_BRANCH[CONTRASTIVE])

_CONFIG, _ARRAY, _METRIC = ConfigRecord, ArrayRecord, MetricRecord

# Record name -> the one record type it may have.
RECORD_TYPES: dict[str, type] = {
    FEDERATION: _CONFIG,
    EXPERIMENT: _CONFIG,
    STAGE: _CONFIG,
    ENCODER: _ARRAY,
    MODEL: _ARRAY,
    SITE_CARD: _CONFIG,
    METRICS: _METRIC,
    SCORES: _METRIC,
    VIDEO_SCORES: _METRIC,
    PATIENT_SCORES: _METRIC,
}

# (message type, addressee role) -> record names the request may carry. ``MODEL_PREFIX`` stands for
# any "model.<arm>" record. Query requests go to every node before its role is known: role "*".
ANY_ROLE = "*"
ALLOWED_REQUEST_RECORDS: dict[tuple[str, str], frozenset[str]] = {
    (QUERY_SITE, ANY_ROLE): frozenset({FEDERATION}),
    (TRAIN_PRETRAIN, TARGET): frozenset({EXPERIMENT, STAGE, ENCODER}),
    (TRAIN_FINETUNE, SOURCE): frozenset({EXPERIMENT, STAGE, ENCODER, MODEL}),
    (TRAIN_FINETUNE, TARGET): frozenset({EXPERIMENT, STAGE, MODEL}),  # upper bound: no encoder
    (EVALUATE_SEGMENT, SOURCE): frozenset({EXPERIMENT, STAGE, MODEL_PREFIX}),
    (EVALUATE_SEGMENT, TARGET): frozenset({EXPERIMENT, STAGE, MODEL_PREFIX}),
}

# (message type, sender role) -> record names the reply may carry. Nothing else crosses.
ALLOWED_REPLY_RECORDS: dict[tuple[str, str], frozenset[str]] = {
    (QUERY_SITE, SOURCE): frozenset({SITE_CARD}),
    (QUERY_SITE, TARGET): frozenset({SITE_CARD}),
    (TRAIN_PRETRAIN, TARGET): frozenset({ENCODER, METRICS}),
    (TRAIN_FINETUNE, SOURCE): frozenset({MODEL, METRICS}),
    (TRAIN_FINETUNE, TARGET): frozenset({MODEL, METRICS}),
    (EVALUATE_SEGMENT, SOURCE): frozenset({METRICS, SCORES, VIDEO_SCORES, PATIENT_SCORES}),
    (EVALUATE_SEGMENT, TARGET): frozenset({METRICS, SCORES, VIDEO_SCORES, PATIENT_SCORES}),
}


class ProtocolError(RuntimeError):
    """A message carries something the wire contract does not allow (fail closed)."""


def _record_type(name: str) -> type | None:
    if name.startswith(MODEL_PREFIX):
        return _ARRAY
    return RECORD_TYPES.get(name)


def _check(content: RecordDict, allowed: frozenset[str], what: str) -> None:
    for name, record in content.items():
        key = MODEL_PREFIX if name.startswith(MODEL_PREFIX) else name
        if key not in allowed:
            raise ProtocolError(
                f"{what}: record {name!r} is not allowed (allowed: {sorted(allowed)})"
            )
        expected = _record_type(name)
        if expected is None or not isinstance(record, expected):
            raise ProtocolError(
                f"{what}: record {name!r} must be a {getattr(expected, '__name__', '?')}"
            )


def check_request(message_type: str, role: str, content: RecordDict) -> None:
    """Raise ProtocolError unless ``content`` is allowed for a ``message_type`` request to ``role``."""
    key = (
        (message_type, ANY_ROLE)
        if (message_type, ANY_ROLE) in ALLOWED_REQUEST_RECORDS
        else (message_type, role)
    )
    if key not in ALLOWED_REQUEST_RECORDS:
        raise ProtocolError(f"no {message_type!r} request may go to a {role!r} site")
    _check(content, ALLOWED_REQUEST_RECORDS[key], f"{message_type} request to {role}")


def check_reply(message_type: str, role: str, content: RecordDict) -> None:
    """Raise ProtocolError unless ``content`` is allowed in a ``message_type`` reply from ``role``."""
    if (message_type, role) not in ALLOWED_REPLY_RECORDS:
        raise ProtocolError(f"a {role!r} site may not reply to {message_type!r}")
    _check(
        content, ALLOWED_REPLY_RECORDS[(message_type, role)], f"{message_type} reply from {role}"
    )


# --- the experiment as a flat ConfigRecord -----------------------------------------------------
def _to_wire(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys; lists stay values (Flower's own version refuses lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, key))
        else:
            out[key] = v
    return out


def flatten_experiment(cfg: ExperimentConfig) -> ConfigRecord:
    """The experiment as dotted keys (``simmim.optim.lr``), without the federation's ``sites`` and
    the server-side ``study`` (a variant arm is sent as its own, already-applied experiment).

    ``None`` values are left out (ConfigRecord has no null; every optional key defaults to None).
    """
    data = cfg.model_dump(mode="json", exclude={"sites", "study"})
    flat = flatten_dict(data)
    return ConfigRecord({k: _to_wire(v) for k, v in flat.items() if v is not None})


def unflatten_experiment(record: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild the typed experiment a site runs with. Raises ConfigError naming the bad key."""
    return parse_experiment(unflatten_dict(dict(record)), source="experiment config on the wire")


# --- requests ------------------------------------------------------------------------------------
@dataclass
class StageRequest:
    """A training or evaluation request as the site sees it (unpacked)."""

    cfg: ExperimentConfig
    phase: str
    round: int
    branch: str = ""
    arm: str = ""
    split: str = "test"
    encoder: dict[str, torch.Tensor] | None = None
    model: dict[str, torch.Tensor] | None = None
    models: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    fusions: list[tuple[str, str]] = field(default_factory=list)


def _arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    # keep_input=False: no second copy of a large model; contiguous CPU tensors as ArrayRecord wants
    sd = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return ArrayRecord(sd, keep_input=False)


def _state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def pack_query(table: list[tuple[str, str, str, str]]) -> RecordDict:
    """query.site request: the simulation's partition table, one (name, role, data dir, output dir)
    per partition-id. Deployed SuperNodes ignore it (their site comes from ``--node-config``)."""
    cols = list(zip(*table, strict=True)) if table else [(), (), (), ()]
    keys = (K_NAMES, K_ROLES, K_DATA_DIRS, K_OUT_DIRS)
    return RecordDict(
        {FEDERATION: ConfigRecord({k: list(c) for k, c in zip(keys, cols, strict=True)})}
    )


def unpack_federation(content: RecordDict) -> list[tuple[str, str, str, str]]:
    """(name, role, data dir, output dir) per partition-id from a query.site request."""
    rec = content.config_records.get(FEDERATION) if FEDERATION in content else None
    if rec is None:
        return []
    keys = (K_NAMES, K_ROLES, K_DATA_DIRS, K_OUT_DIRS)
    return list(zip(*(rec[k] for k in keys), strict=True))


def pack_request(
    cfg: ExperimentConfig,
    phase: str,
    round: int,
    *,
    branch: str = "",
    arm: str = "",
    split: str = "test",
    encoder: Mapping[str, torch.Tensor] | ArrayRecord | None = None,
    model: Mapping[str, torch.Tensor] | ArrayRecord | None = None,
    models: Mapping[str, Mapping[str, torch.Tensor] | ArrayRecord] | None = None,
    fusions: list[tuple[str, str]] | None = None,
) -> RecordDict:
    """Build a train.pretrain / train.finetune / evaluate.segment request."""
    stage = ConfigRecord(
        {
            K_PHASE: phase,
            K_ROUND: int(round),
            K_BRANCH: branch,
            K_ARM: arm,
            K_SPLIT: split,
            K_MODELS: sorted(models or {}),
            K_FUSIONS: [f"{a}+{b}" for a, b in (fusions or [])],
        }
    )
    rd = RecordDict({EXPERIMENT: flatten_experiment(cfg), STAGE: stage})
    if encoder is not None:
        rd[ENCODER] = encoder if isinstance(encoder, ArrayRecord) else _arrays(encoder)
    if model is not None:
        rd[MODEL] = model if isinstance(model, ArrayRecord) else _arrays(model)
    for name, m in (models or {}).items():
        rd[MODEL_PREFIX + name] = m if isinstance(m, ArrayRecord) else _arrays(m)
    return rd


def unpack_request(content: RecordDict) -> StageRequest:
    """The site's view of a stage request: typed config, tensors, names."""
    stage = content.config_records[STAGE]
    models = {
        name[len(MODEL_PREFIX) :]: _state(rec)
        for name, rec in content.array_records.items()
        if name.startswith(MODEL_PREFIX)
    }
    return StageRequest(
        cfg=unflatten_experiment(content.config_records[EXPERIMENT]),
        phase=str(stage[K_PHASE]),
        round=int(stage[K_ROUND]),
        branch=str(stage[K_BRANCH]),
        arm=str(stage[K_ARM]),
        split=str(stage[K_SPLIT]),
        encoder=_state(content.array_records[ENCODER])
        if ENCODER in content.array_records
        else None,
        model=_state(content.array_records[MODEL]) if MODEL in content.array_records else None,
        models=models,
        fusions=[tuple(f.split("+", 1)) for f in stage[K_FUSIONS]],  # type: ignore[misc]
    )


# --- replies -------------------------------------------------------------------------------------
def _flat_scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_dict(dict(d))
    return {
        k: _to_wire(v)
        for k, v in flat.items()
        if isinstance(v, str | int | float | bool | list | tuple)
    }


def pack_site_card(card: Mapping[str, Any]) -> RecordDict:
    """query.site reply: the site card, nested dicts flattened to dotted keys (scalars only)."""
    return RecordDict({SITE_CARD: ConfigRecord(_flat_scalars(card))})


def unpack_site_card(content: RecordDict) -> dict[str, Any]:
    return unflatten_dict(dict(content.config_records[SITE_CARD]))


def _metric_record(metrics: Mapping[str, Any], num_examples: int | None = None) -> MetricRecord:
    """Numbers only (anything else is not a metric and does not cross)."""
    rec: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        rec[k] = float(v)
    if num_examples is not None:
        rec[NUM_EXAMPLES] = int(num_examples)
    return MetricRecord(rec)


def pack_weights_reply(
    record: str, state: Mapping[str, torch.Tensor], metrics: Mapping[str, float], num_examples: int
) -> RecordDict:
    """Pretrain (record=ENCODER) or finetune (record=MODEL) reply. METRICS comes first because
    Flower's ``aggregate_arrayrecords`` weights by the first MetricRecord."""
    return RecordDict({METRICS: _metric_record(metrics, num_examples), record: _arrays(state)})


def pack_eval_reply(
    metrics: Mapping[str, float],
    per_image: Mapping[str, list[float]],
    per_video: Mapping[str, list[float]],
    num_examples: int,
    per_patient: Mapping[str, list[float]] | None = None,
) -> RecordDict:
    """evaluate.segment reply: scalars and score vectors only (per image, video and patient)."""
    rd = RecordDict(
        {
            METRICS: _metric_record(metrics, num_examples),
            SCORES: MetricRecord({k: [float(x) for x in v] for k, v in per_image.items()}),
            VIDEO_SCORES: MetricRecord({k: [float(x) for x in v] for k, v in per_video.items()}),
        }
    )
    if per_patient:
        rd[PATIENT_SCORES] = MetricRecord(
            {k: [float(x) for x in v] for k, v in per_patient.items()}
        )
    return rd


def _config_bytes(rec: ConfigRecord) -> int:
    # ConfigRecord.count_bytes (1.42) raises on "" and on empty lists; same rule, without that bug.
    def one(v: Any) -> int:
        return len(v) if isinstance(v, str | bytes) else 1 if isinstance(v, bool) else 8

    return sum(
        len(k) + (sum(one(x) for x in v) if isinstance(v, list) else one(v)) for k, v in rec.items()
    )


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message's records (what the report calls bytes exchanged)."""
    return sum(
        _config_bytes(r) if isinstance(r, ConfigRecord) else int(r.count_bytes())
        for r in content.values()
    )
