"""The wire contract: every message type, record name and who may send what — named once, as data —
and the one check that enforces it.

Server and sites import these names; no handler spells a wire name as a literal. :func:`check` is
applied to a message as :func:`common.fl.describe.describe` renders it: by the site's guard before
anything runs and before a reply leaves (``common/fl/guard.py``), by the server before it sends and
on everything it receives (``server/workflow.py``), and by the auditor to every ledger line
(``common/fl/audit.py``).

| message type       | request                                   | reply                        |
|--------------------|-------------------------------------------|------------------------------|
| query.site         | federation table (simulation only)        | site card                    |
| train.pretrain     | experiment + stage config, [encoder]      | encoder weights + metrics    |
| train.finetune     | experiment + stage config, [encoder|model]| model weights + metrics      |
| train.adapt        | experiment + stage config, the main pair  | metrics only (no weights)    |
| evaluate.segment   | experiment + stage config, models         | metrics + score vectors      |

docs/architecture.md, "The wire contract", explains each row; docs/audit.md the bounds below.
"""

from __future__ import annotations

from typing import Any

from common.config import ExperimentConfig

# --- roles -----------------------------------------------------------------------------------
SOURCE = "source"
TARGET = "target"
ROLES = (SOURCE, TARGET)
ANY_ROLE = "*"  # query requests go to every node before its role is known

# --- message types (Flower 1.42: "<train|evaluate|query>.<action>") --------------------------
QUERY_SITE = "query.site"
TRAIN_PRETRAIN = "train.pretrain"
TRAIN_FINETUNE = "train.finetune"
TRAIN_ADAPT = "train.adapt"  # the target adapts the pair to its own frames and keeps the result
EVALUATE_SEGMENT = "evaluate.segment"
MESSAGE_TYPES = (QUERY_SITE, TRAIN_PRETRAIN, TRAIN_FINETUNE, TRAIN_ADAPT, EVALUATE_SEGMENT)


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
SCORE_RECORDS = frozenset({SCORES, VIDEO_SCORES, PATIENT_SCORES})  # the only lists that cross
SIGNATURE = "signature"  # ConfigRecord: the site's signature of its reply (common/fl/signing.py)

NUM_EXAMPLES = "num-examples"  # the weighting key for federated averaging

# Keys of the STAGE record.
K_PHASE = "phase"
K_ROUND = "round"
K_BRANCH = "branch"
K_ARM = "arm"
K_MODELS = "models"
K_FUSIONS = "fusions"
K_SPLIT = "split"
K_MAX_FRAMES = "max-frames"  # evaluate: the most frames the server asks a site to score
K_LOCAL_MODELS = "local-models"  # evaluate: models the site holds itself (its adapted pair)
# Keys of the FEDERATION record (parallel lists, index = partition-id).
K_NAMES = "names"
K_ROLES = "roles"
K_DATA_DIRS = "data-dirs"
K_OUT_DIRS = "out-dirs"
K_CHECKPOINTS = "checkpoints"  # each simulated site's own local backbone checkpoint ("" = none)
K_SIGNING_KEYS = "signing-keys"  # each simulated site's private key file (simulation only)
# Keys of the SITE_CARD record.
K_NAME = "name"
K_ROLE = "role"
# Keys of the SIGNATURE record.
K_ALG = "alg"
K_VALUE = "value"

CONFIG, ARRAY, METRIC = "ConfigRecord", "ArrayRecord", "MetricRecord"

# Record name -> the one record type it may have ("model.<arm>" records are ArrayRecords).
RECORD_TYPES: dict[str, str] = {
    FEDERATION: CONFIG,
    EXPERIMENT: CONFIG,
    STAGE: CONFIG,
    ENCODER: ARRAY,
    MODEL: ARRAY,
    SITE_CARD: CONFIG,
    METRICS: METRIC,
    SCORES: METRIC,
    VIDEO_SCORES: METRIC,
    PATIENT_SCORES: METRIC,
    SIGNATURE: CONFIG,
}

# (message type, addressee role) -> record names the request may carry. ``MODEL_PREFIX`` stands for
# any "model.<arm>" record.
ALLOWED_REQUEST_RECORDS: dict[tuple[str, str], frozenset[str]] = {
    (QUERY_SITE, ANY_ROLE): frozenset({FEDERATION}),
    (TRAIN_PRETRAIN, TARGET): frozenset({EXPERIMENT, STAGE, ENCODER}),
    (TRAIN_FINETUNE, SOURCE): frozenset({EXPERIMENT, STAGE, ENCODER, MODEL}),
    (TRAIN_FINETUNE, TARGET): frozenset({EXPERIMENT, STAGE, MODEL}),  # upper bound: no encoder
    (TRAIN_ADAPT, TARGET): frozenset({EXPERIMENT, STAGE, MODEL_PREFIX}),
    (EVALUATE_SEGMENT, SOURCE): frozenset({EXPERIMENT, STAGE, MODEL_PREFIX}),
    (EVALUATE_SEGMENT, TARGET): frozenset({EXPERIMENT, STAGE, MODEL_PREFIX}),
}

# (message type, sender role) -> record names the reply may carry. Nothing else crosses. Every
# reply also carries the site's SIGNATURE (added by the guard after this check passed).
_EVAL_REPLY = frozenset({METRICS, SCORES, VIDEO_SCORES, PATIENT_SCORES, SIGNATURE})
ALLOWED_REPLY_RECORDS: dict[tuple[str, str], frozenset[str]] = {
    (QUERY_SITE, SOURCE): frozenset({SITE_CARD, SIGNATURE}),
    (QUERY_SITE, TARGET): frozenset({SITE_CARD, SIGNATURE}),
    (TRAIN_PRETRAIN, TARGET): frozenset({ENCODER, METRICS, SIGNATURE}),
    (TRAIN_FINETUNE, SOURCE): frozenset({MODEL, METRICS, SIGNATURE}),
    (TRAIN_FINETUNE, TARGET): frozenset({MODEL, METRICS, SIGNATURE}),
    (TRAIN_ADAPT, TARGET): frozenset({METRICS, SIGNATURE}),  # the adapted weights stay there
    (EVALUATE_SEGMENT, SOURCE): _EVAL_REPLY,
    (EVALUATE_SEGMENT, TARGET): _EVAL_REPLY,
}

# Experiment keys that would name a file on the site's disk: a site opens only files its own
# configuration names (--node-config, or the simulator's site table), never one a request names.
SITE_PATH_KEYS = frozenset({"model.checkpoint"})

# Bounds for what may ride in scalar records (a frame must not fit through them).
MAX_METRIC_KEYS = 256  # keys per MetricRecord
MAX_CARD_KEYS = 32  # keys in a site card (an honest one has 15)
MAX_STR = 128  # characters per key name, and per config string in a reply
MAX_REASON = 200  # characters of an error reply's reason (the traceback stays at the site)


# The names a reply's scalars may have: a site reports these and nothing else, so a name cannot
# carry data (a new metric is added here, and to docs/audit.md).
TRAIN_METRIC_NAMES = frozenset(
    {
        "steps",
        "epochs",
        "seconds",
        "images_per_s",
        "train_loss",
        "best_val_loss",
        "best_step",
        "labeled_val_frames",
        NUM_EXAMPLES,
    }
    # pretraining's label-free signals (common/ssl_health.py; not imported: it needs torch)
    | {f"ssl_{s}" for s in ("collapse_loss", "std", "rank", "alignment", "uniformity", "mean_l1")}
    | {"ssl_loss_ratio"}
)
# the adapt phase: its budget and wall time, and label-free signals of the pair before and after
ADAPT_METRIC_NAMES = frozenset(
    {"steps", "epochs", "seconds", "images_per_s", "train_loss", NUM_EXAMPLES}
    | {
        f"{s}_{when}"
        for s in ("entropy", "agreement", "foreground")
        for when in ("before", "after")
    }
)
EVAL_SCALAR_NAMES = frozenset(
    {"n_images", "n_empty_gt", "n_videos", "n_patients", "seconds", "frames_per_s", NUM_EXAMPLES}
)
CARD_KEYS = frozenset(
    {"name", "role", "device", "digest"}
    | {
        f"counts.{split}.{n}"
        for split in ("train", "val", "test")
        for n in ("patients", "videos", "frames", "labeled")
    }
)
SCORE_NAMES = ("dice", "iou")  # = common.metrics.SCORES (not imported: that module needs torch)
SIGNATURE_ALG, SIGNATURE_BYTES = "ecdsa-p384-sha384", 96  # what common/fl/signing.py makes
NUMBER_BYTES = 8  # what one number may carry (a float64)


class ContractViolation(RuntimeError):
    """A message carries something the wire contract or the model schema does not allow."""


def bounded_reason(text: str) -> str:
    """An error reason as it may cross: its first line, printable ASCII only, at most
    :data:`MAX_REASON` characters (a frame must not ride in an exception message)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    clean = "".join(c if " " <= c <= "~" else "?" for c in line)
    return clean if len(clean) <= MAX_REASON else clean[: MAX_REASON - 1] + "…"


def error_reason(err: BaseException) -> str:
    """The reason a site sends for a failure: the exception's type and bounded message."""
    return bounded_reason(f"{type(err).__name__}: {err}")


def record_type(name: str) -> str | None:
    """The record type ``name`` must have, or None for a name the contract does not know."""
    return ARRAY if name.startswith(MODEL_PREFIX) else RECORD_TYPES.get(name)


def allowed(kind: str, message_type: str, role: str) -> frozenset[str]:
    """Record names a ``kind`` ("request" | "reply") of ``message_type`` may carry to / from a
    ``role`` site — the one allow-list lookup.

    Raises:
        ContractViolation: no such message may go to (come from) that role at all.
    """
    if kind == "request":
        table = ALLOWED_REQUEST_RECORDS
        key = (message_type, ANY_ROLE)
        if key not in table:
            key = (message_type, role)
    else:
        table, key = ALLOWED_REPLY_RECORDS, (message_type, role)
    if key not in table:
        way = "to" if kind == "request" else "from"
        raise ContractViolation(f"no {message_type!r} {kind} is allowed {way} a {role!r} site")
    return table[key]


def _check_records(what: str, records: list[dict], allow: frozenset[str]) -> None:
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        raise ContractViolation(f"{what}: a record name repeats")
    for rec in records:
        key = MODEL_PREFIX if rec["name"].startswith(MODEL_PREFIX) else rec["name"]
        if key not in allow:
            raise ContractViolation(
                f"{what}: record {rec['name']!r} is not allowed (allowed: {sorted(allow)})"
            )
        if rec["type"] != record_type(rec["name"]):
            raise ContractViolation(
                f"{what}: record {rec['name']!r} must be a {record_type(rec['name'])}"
            )


def _dtype_ok(wire: str, expected: str) -> bool:
    # fp16 on the wire is fine for floating-point parameters
    return wire == expected or (
        expected.startswith(("float", "bfloat")) and wire in ("float16", "float32")
    )


def _check_arrays(what: str, rec: dict, cfg: ExperimentConfig | None) -> None:
    """Every array is a parameter of the model ``cfg`` describes, and all of them are there."""
    from common.fl.schema import model_schema

    if cfg is None:
        raise ContractViolation(
            f"{what}: weights {rec['name']!r} without an experiment config to check them against"
        )
    schema = model_schema(cfg, rec["name"])
    arrays = {a["name"]: a for a in rec["arrays"]}
    if len(arrays) != len(rec["arrays"]):
        raise ContractViolation(f"{what}: record {rec['name']!r} repeats an array name")
    extra = sorted(set(arrays) - set(schema))
    if extra:
        a = arrays[extra[0]]
        raise ContractViolation(
            f"{what}: array {extra[0]!r} {a['shape']} {a['dtype']} in {rec['name']!r} is not a "
            f"model parameter ({len(extra)} unexpected)"
        )
    for k, a in arrays.items():
        shape, dtype = schema[k]
        if tuple(a["shape"]) != shape or not _dtype_ok(a["dtype"], dtype):
            raise ContractViolation(
                f"{what}: array {k!r} in {rec['name']!r} is {a['shape']} {a['dtype']}, "
                f"the model parameter is {list(shape)} {dtype}"
            )
        if "payload" in a:
            raise ContractViolation(f"{what}: array {k!r} in {rec['name']!r}: {a['payload']}")
        if a.get("nonfinite"):
            raise ContractViolation(
                f"{what}: array {k!r} in {rec['name']!r} holds {a['nonfinite']} non-finite "
                "value(s) (NaN or inf): the sender's training diverged"
            )
    missing = sorted(set(schema) - set(arrays))
    if missing:
        raise ContractViolation(
            f"{what}: record {rec['name']!r} lacks {len(missing)} parameter(s), e.g. {missing[:3]}"
        )


def _is_number(v: Any) -> bool:
    # described non-finite floats are the strings "nan", "inf", "-inf" (JSON has no such numbers)
    return isinstance(v, int | float) and not isinstance(v, bool) or v in ("nan", "inf", "-inf")


_LIST_KEYS = frozenset({"len", "min", "max", "sha256"})  # a described number list


def _is_score(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in SCORE_NAMES


def _in_unit_range(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _check_list(what: str, rec: dict, k: str, v: dict, limit: int) -> None:
    if rec["name"] not in SCORE_RECORDS:
        raise ContractViolation(
            f"{what}: metric {k!r} in {rec['name']!r} is a list; only score vectors may be"
        )
    if not isinstance(v["len"], int) or v["len"] > limit:
        raise ContractViolation(
            f"{what}: metric {k!r} in {rec['name']!r} is a list of {v['len']} numbers, "
            f"more than the {limit} frame(s) the server asked for and the site evaluated"
        )
    if v["len"] and not (_in_unit_range(v.get("min")) and _in_unit_range(v.get("max"))):
        raise ContractViolation(
            f"{what}: score vector {k!r} in {rec['name']!r} has values outside [0, 1] "
            f"(min {v.get('min')}, max {v.get('max')})"
        )


def _check_metrics(what: str, rec: dict, limit: int) -> None:
    metrics = rec["metrics"]
    if len(metrics) > MAX_METRIC_KEYS:
        raise ContractViolation(
            f"{what}: {rec['name']!r} has {len(metrics)} metrics (at most {MAX_METRIC_KEYS})"
        )
    for k, v in metrics.items():
        if len(k) > MAX_STR:
            raise ContractViolation(
                f"{what}: a metric name in {rec['name']!r} has {len(k)} characters"
            )
        if _is_number(v):
            if _is_score(k) and not _in_unit_range(v):
                raise ContractViolation(f"{what}: score {k!r} in {rec['name']!r} is {v}")
            continue
        if isinstance(v, dict) and "len" in v and set(v) <= _LIST_KEYS:
            _check_list(what, rec, k, v, limit)
            continue
        raise ContractViolation(
            f"{what}: metric {k!r} in {rec['name']!r} is not a number or list of numbers ({v})"
        )


def _check_signature(what: str, rec: dict) -> None:
    config = rec["config"]
    value = config.get(K_VALUE)
    if not (
        set(config) == {K_ALG, K_VALUE}
        and config[K_ALG] == SIGNATURE_ALG
        and isinstance(value, dict)
        and set(value) == {"bytes", "sha256"}
        and value["bytes"] == SIGNATURE_BYTES
    ):
        raise ContractViolation(
            f"{what}: {SIGNATURE!r} must be exactly {{{K_ALG}: {SIGNATURE_ALG}, "
            f"{K_VALUE}: {SIGNATURE_BYTES} bytes}}"
        )


def _check_config(what: str, rec: dict) -> None:
    config = rec["config"]
    if len(config) > MAX_CARD_KEYS:
        raise ContractViolation(
            f"{what}: {rec['name']!r} has {len(config)} keys (at most {MAX_CARD_KEYS})"
        )
    for k, v in config.items():
        if len(k) > MAX_STR:
            raise ContractViolation(f"{what}: a key in {rec['name']!r} has {len(k)} characters")
        if isinstance(v, list | dict) or (
            isinstance(v, str) and (len(v) > MAX_STR or not v.isascii())
        ):
            raise ContractViolation(
                f"{what}: {rec['name']!r} key {k!r} is not a short scalar (a number, or at most "
                f"{MAX_STR} ASCII characters)"
            )


def _stage_of(request: list[dict]) -> tuple[dict, dict]:
    """(stage config, experiment config) of a described request (empty when absent)."""
    stage = next((r["config"] for r in request if r["name"] == STAGE and r["type"] == CONFIG), {})
    exp = next(
        (r["config"] for r in request if r["name"] == EXPERIMENT and r["type"] == CONFIG), {}
    )
    return stage, exp


def reply_names(message_type: str, request: list[dict]) -> dict[str, frozenset[str]]:
    """Record name -> the names its entries may have in a reply to ``request``: fixed for
    training, adaptation and the site card; for an evaluation, ``<method>/<dice|iou>`` of exactly
    the models the server sent or named as the site's own (its adapted pair) and the fused pairs it
    asked for (every fusion mode of the experiment), and the fixed scalars."""
    if message_type == QUERY_SITE:
        return {SITE_CARD: CARD_KEYS}
    if message_type in (TRAIN_PRETRAIN, TRAIN_FINETUNE):
        return {METRICS: TRAIN_METRIC_NAMES}
    if message_type == TRAIN_ADAPT:
        return {METRICS: ADAPT_METRIC_NAMES}
    from common.arms import fusion_name

    stage, exp = _stage_of(request)

    def listed(v: Any) -> list:
        return v if isinstance(v, list) else []

    modes = listed(exp.get("fusion.modes"))
    pairs = [tuple(str(f).split("+", 1)) for f in listed(stage.get(K_FUSIONS)) if "+" in str(f)]
    methods = [str(m) for m in listed(stage.get(K_MODELS)) + listed(stage.get(K_LOCAL_MODELS))]
    methods += [fusion_name(str(mode), pair) for pair in pairs for mode in modes]
    scores = frozenset(f"{m}/{s}" for m in methods for s in SCORE_NAMES)
    return {
        METRICS: EVAL_SCALAR_NAMES | scores,
        SCORES: scores,
        VIDEO_SCORES: scores,
        PATIENT_SCORES: scores,
    }


def _check_names(what: str, rec: dict, allowed_names: frozenset[str]) -> None:
    entries = rec["metrics"] if rec["type"] == METRIC else rec["config"]
    for k in entries:
        if k not in allowed_names:
            shown = k if len(k) <= 40 else f"{k[:40]}… ({len(k)} characters)"
            raise ContractViolation(
                f"{what}: {rec['name']!r} carries {shown!r}, a name the request did not ask for"
            )


def _check_no_paths(what: str, records: list[dict]) -> None:
    for rec in records:
        if rec["name"] == EXPERIMENT and rec["type"] == CONFIG:
            named = sorted(SITE_PATH_KEYS & set(rec["config"]))
            if named:
                raise ContractViolation(
                    f"{what}: {named[0]} names a file on the site's disk; a site's checkpoint is "
                    "configured at the site (--node-config checkpoint=...)"
                )


def asked_frames(request: list[dict]) -> int:
    """How many frames the request asked the site to score at most (0 = none asked)."""
    stage, _ = _stage_of(request)
    n = stage.get(K_MAX_FRAMES)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _list_limit(records: list[dict], request: list[dict], max_list: int | None) -> int:
    """Score vectors are at most as long as the frames the request asked for, the reply's own
    example count and ``max_list`` (an outside bound: the server's count from the site's card)."""
    n = next((r["metrics"].get(NUM_EXAMPLES) for r in records if r["name"] == METRICS), None)
    own = int(n) if isinstance(n, int | float) and not isinstance(n, bool) and n >= 0 else 0
    bounds = [own, asked_frames(request)] + ([max_list] if max_list is not None else [])
    return min(bounds)


def _value_bytes(v: Any) -> int:
    if isinstance(v, dict):
        return NUMBER_BYTES * int(v["len"]) if "len" in v else int(v.get("bytes", 0))
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, list):
        return sum(_value_bytes(x) for x in v)
    return NUMBER_BYTES


def non_weight_bytes(records: list[dict]) -> int:
    """Bytes a described message carries besides declared weights: every metric and config name
    and value (a number counts 8 bytes, a list 8 per number, a string or bytes its length)."""
    total = 0
    for rec in records:
        entries = rec.get("metrics") if rec.get("type") == METRIC else rec.get("config")
        for k, v in (entries or {}).items():
            total += len(str(k).encode()) + _value_bytes(v)
    return total


def reply_capacity(message_type: str, request: list[dict], limit: int | None = None) -> int:
    """The most non-weight bytes a reply to ``request`` may carry: every name the request allows,
    each with the largest value the contract lets it have (a score vector as long as ``limit``,
    default: the frames the request asked for), plus the signature."""
    limit = asked_frames(request) if limit is None else limit
    total = len(K_ALG) + len(SIGNATURE_ALG) + len(K_VALUE) + SIGNATURE_BYTES
    for rec, names in reply_names(message_type, request).items():
        value = MAX_STR if rec == SITE_CARD else NUMBER_BYTES
        value *= limit if rec in SCORE_RECORDS else 1
        total += sum(len(k) + value for k in names)
    return total


def check(
    kind: str,
    message_type: str,
    role: str,
    records: list[dict],
    cfg: ExperimentConfig | None,
    max_list: int | None = None,
    *,
    request: list[dict] | None = None,
) -> None:
    """The contract, on a described message. ``kind`` is "request" or "reply"; ``role`` the site's;
    ``cfg`` the experiment of the request (weights are checked against its model); ``max_list`` an
    outside bound on score-vector lengths (the server: the site's labeled count of the split), on
    top of the frames the request asked for (``K_MAX_FRAMES``);
    ``request`` (replies: required) the described request the reply answers — every metric and
    card name must be one it asked for (:func:`reply_names`).

    Raises:
        ContractViolation: naming the first record, array or metric that may not cross.
        ValueError: a reply checked without its request (a programming error).
    """
    way = "to" if kind == "request" else "from"
    what = f"{message_type} {kind} {way} {role or '?'}"
    _check_records(what, records, allowed(kind, message_type, role))
    if kind == "request":
        _check_no_paths(what, records)
    limit = 0
    if kind == "reply":
        if request is None:
            raise ValueError("a reply is checked against the request it answers")
        names = reply_names(message_type, request)
        for rec in records:
            if rec["name"] in names:
                _check_names(what, rec, names[rec["name"]])
        limit = _list_limit(records, request, max_list)
    for rec in records:
        if rec["type"] == ARRAY:
            _check_arrays(what, rec, cfg)
        elif kind == "reply" and rec["type"] == METRIC:
            _check_metrics(what, rec, limit)
        elif kind == "reply" and rec["name"] == SIGNATURE:
            _check_signature(what, rec)
        elif kind == "reply" and rec["type"] == CONFIG:
            _check_config(what, rec)
    if kind == "reply":
        used, budget = non_weight_bytes(records), reply_capacity(message_type, request, limit)
        if used > budget:
            raise ContractViolation(
                f"{what}: {used} bytes besides weights, more than the {budget} this request allows"
            )
