"""Building and reading the messages of the wire contract (``common/fl/contract.py``): stage
requests, weight and evaluation replies, the site card, the experiment as a flat config record.

The server packs requests and unpacks replies with these; the ClientApp handlers unpack requests
and pack replies. What is allowed to cross is decided by the contract, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.config import unflatten_dict

from common.config import ExperimentConfig, parse_experiment
from common.fl.contract import (
    ENCODER,
    EXPERIMENT,
    FEDERATION,
    K_ARM,
    K_BRANCH,
    K_CHECKPOINTS,
    K_DATA_DIRS,
    K_FUSIONS,
    K_LOCAL_MODELS,
    K_MAX_FRAMES,
    K_MODELS,
    K_NAMES,
    K_OUT_DIRS,
    K_PHASE,
    K_ROLES,
    K_ROUND,
    K_SIGNING_KEYS,
    K_SPLIT,
    METRICS,
    MODEL,
    MODEL_PREFIX,
    NUM_EXAMPLES,
    PATIENT_SCORES,
    SCORES,
    SITE_CARD,
    STAGE,
    VIDEO_SCORES,
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
    """The experiment as dotted keys (``simmim.optim.lr``), without the federation's ``sites``, the
    server-side ``study`` (a variant arm is sent as its own, already-applied experiment) and
    ``model.checkpoint`` (a path: each site uses its own, see ``contract.SITE_PATH_KEYS``).

    ``None`` values are left out (ConfigRecord has no null; every optional key defaults to None).
    """
    data = cfg.model_dump(
        mode="json", exclude={"sites": True, "study": True, "model": {"checkpoint"}}
    )
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
    max_frames: int = 0  # evaluate: the most labeled frames the server asked to be scored
    local_models: list[str] = field(default_factory=list)  # evaluate: the site's own (adapted)


def on_the_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` as it crosses: float tensors in float16 when ``dtype`` is "float16" (half the bytes),
    unless a value would not fit float16's range; everything else unchanged."""
    t = t.detach().cpu()
    if dtype == "float16" and t.is_floating_point() and t.dtype != torch.float16:
        half = t.half()
        if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(t).all()):
            t = half
    return t.contiguous()


def _arrays(state: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """The tensors of ``state`` as an ArrayRecord, taken out of ``state`` one by one as they are
    serialised, so a caller that hands over its dict never holds a big model twice."""
    arrays = ArrayRecord()
    for k in list(state):
        arrays[k] = Array.from_numpy_ndarray(on_the_wire(state.pop(k), dtype).numpy())
    return arrays


def _state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # keep_input=False: each array leaves the record as it becomes a tensor, so a big model is
    # never held twice (as the message's bytes and as tensors)
    return dict(record.to_torch_state_dict(keep_input=False))


_TABLE_KEYS = (K_NAMES, K_ROLES, K_DATA_DIRS, K_OUT_DIRS, K_CHECKPOINTS, K_SIGNING_KEYS)


def pack_query(table: list[tuple[str, ...]]) -> RecordDict:
    """query.site request: the simulation's partition table, one (name, role, data dir, output dir,
    local checkpoint or "", signing key file or "") per partition-id. Deployed SuperNodes ignore it
    (their site comes from ``--node-config``)."""
    cols = list(zip(*table, strict=True)) if table else [()] * len(_TABLE_KEYS)
    keys = _TABLE_KEYS
    return RecordDict(
        {FEDERATION: ConfigRecord({k: list(c) for k, c in zip(keys, cols, strict=True)})}
    )


def unpack_federation(content: RecordDict) -> list[tuple[str, ...]]:
    """(name, role, data dir, output dir, checkpoint, signing key) per partition-id from a
    query.site request."""
    rec = content.config_records.get(FEDERATION) if FEDERATION in content else None
    if rec is None:
        return []
    return list(zip(*(rec[k] for k in _TABLE_KEYS), strict=True))


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
    max_frames: int = 0,
    local_models: list[str] | None = None,
) -> RecordDict:
    """Build a train.pretrain / train.finetune / train.adapt / evaluate.segment request
    (``max_frames``: the most labeled frames an evaluation may score, which bounds every score
    vector of the reply; ``local_models``: models the site scores from its own store — a target's
    adapted pair — besides those sent)."""
    stage = ConfigRecord(
        {
            K_PHASE: phase,
            K_ROUND: int(round),
            K_BRANCH: branch,
            K_ARM: arm,
            K_SPLIT: split,
            K_MODELS: sorted(models or {}),
            K_FUSIONS: [f"{a}+{b}" for a, b in (fusions or [])],
            K_MAX_FRAMES: int(max_frames),
            K_LOCAL_MODELS: list(local_models or []),
        }
    )
    rd = RecordDict({EXPERIMENT: flatten_experiment(cfg), STAGE: stage})
    if encoder is not None:  # the caller's dicts are copied, not emptied
        rd[ENCODER] = encoder if isinstance(encoder, ArrayRecord) else _arrays(dict(encoder))
    if model is not None:
        rd[MODEL] = model if isinstance(model, ArrayRecord) else _arrays(dict(model))
    for name, m in (models or {}).items():
        rd[MODEL_PREFIX + name] = m if isinstance(m, ArrayRecord) else _arrays(dict(m))
    return rd


def unpack_request(content: RecordDict) -> StageRequest:
    """The site's view of a stage request: typed config, tensors, names. The weights are taken
    out of ``content`` (its array records are left empty)."""
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
        max_frames=int(stage.get(K_MAX_FRAMES, 0)),
        local_models=[str(m) for m in stage.get(K_LOCAL_MODELS, [])],
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
    record: str,
    state: dict[str, torch.Tensor],
    metrics: Mapping[str, float],
    num_examples: int,
    wire_dtype: str = "float32",
) -> RecordDict:
    """Pretrain (record=ENCODER) or finetune (record=MODEL) reply, its float weights in
    ``wire_dtype`` (``runtime.wire_dtype``). METRICS comes first because Flower's
    ``aggregate_arrayrecords`` weights by the first MetricRecord.

    ``state`` is consumed: each tensor leaves the dict as it is serialised, so the site never
    holds the model twice (as tensors and as the reply's bytes)."""
    arrays = _arrays(state, wire_dtype)
    return RecordDict({METRICS: _metric_record(metrics, num_examples), record: arrays})


def pack_metrics_reply(metrics: Mapping[str, float], num_examples: int) -> RecordDict:
    """train.adapt reply: scalars only; the adapted weights stay at the site."""
    return RecordDict({METRICS: _metric_record(metrics, num_examples)})


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
