"""The contract and the auditor under fuzzing: for any records, arrays, metrics and configs, of any
message type, role and direction, the check either passes exactly what the contract allows or
raises its own ContractViolation — no other exception; and the auditor turns any ledger line into
a finding, never a crash.

CI runs a short campaign; ``CROSSPROBE_FUZZ_EXAMPLES=20000 pytest tests/test_contract_fuzz.py``
runs a long one.
"""

from __future__ import annotations

import io
import json
import os
from functools import cache

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import load_experiment
from common.fl import contract, messages, schema, signing
from common.fl.audit import audit_run
from common.fl.describe import describe
from common.fl.ledger import LEDGER_NAME, Ledger, read_ledger

EXAMPLES = int(os.environ.get("CROSSPROBE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 150,  # CI: the same cases every run
)


@cache
def _cfg():
    return load_experiment("configs/tiny.yaml")


@cache
def _encoder():
    return schema.model_schema(_cfg(), contract.ENCODER)


# ------------------------------------------------------------------ strategies
NAMES = st.one_of(
    st.sampled_from(sorted(contract.RECORD_TYPES) + ["model.lower", "frames", "model."]),
    st.text(max_size=12),
)
DTYPES = st.sampled_from(["float32", "float16", "float64", "int64", "uint8", "bool", "<f4", "x"])
SHAPES = st.lists(st.integers(0, 6), max_size=4).map(tuple)


def _npy(shape, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


@st.composite
def arrays(draw):
    """An Array whose declaration and payload may disagree: honest, forged header, random bytes."""
    shape, dtype = draw(SHAPES), draw(DTYPES)
    kind = draw(st.sampled_from(["honest", "other-shape", "random", "truncated", "nan"]))
    real = dtype if dtype not in ("x",) else "float32"
    if kind == "honest":
        data = _npy(shape, real)
    elif kind == "other-shape":
        data = _npy(draw(SHAPES), real)
    elif kind == "truncated":
        data = _npy(shape, real)[: draw(st.integers(0, 80))]
    elif kind == "nan" and np.dtype(real).kind == "f" and int(np.prod(shape)) > 0:
        buf = io.BytesIO()
        np.save(buf, np.full(shape, np.nan, dtype=real), allow_pickle=False)
        data = buf.getvalue()
    else:
        data = draw(st.binary(max_size=200))
    stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", ""]))
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


@st.composite
def encoder_records(draw):
    """The tiny encoder's real state dict with a few parameters changed, added or removed."""
    enc = _encoder()
    state = {k: Array(np.zeros(s, dtype=d)) for k, (s, d) in enc.items()}
    for _ in range(draw(st.integers(0, 2))):
        what = draw(st.sampled_from(["replace", "add", "drop"]))
        key = draw(st.sampled_from(sorted(state) or ["x"]))
        if what == "replace":
            state[key] = draw(arrays())
        elif what == "add":
            state[draw(st.text(min_size=1, max_size=10))] = draw(arrays())
        else:
            state.pop(key, None)
    return ArrayRecord(state)


NUMBERS = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True, width=64)
)
SCORE_KEYS = ["simmim/dice", "mtnxent/iou", "fusion-entropy/dice"]  # names the request asks for
METRICS = st.dictionaries(
    st.one_of(
        st.sampled_from(sorted(contract.TRAIN_METRIC_NAMES | contract.EVAL_SCALAR_NAMES)),
        st.sampled_from(SCORE_KEYS),
        st.text(max_size=200),
    ),
    st.one_of(
        NUMBERS,
        st.lists(st.floats(0, 1), max_size=12),
        st.lists(st.floats(-1, 2), max_size=4),
        st.lists(st.integers(), max_size=4),
    ),
    max_size=6,
)
CONFIG_VALUES = st.one_of(
    st.text(max_size=200),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=300),
    st.lists(st.text(max_size=5), max_size=4),
)
CONFIGS = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(sorted(contract.CARD_KEYS)), st.text(max_size=140)),
        CONFIG_VALUES,
        max_size=6,
    ),
    st.fixed_dictionaries(  # a signature record, right or nearly right
        {
            contract.K_ALG: st.sampled_from([signing.ALG, "ecdsa-p256-sha256", ""]),
            contract.K_VALUE: st.one_of(st.binary(min_size=96, max_size=96), CONFIG_VALUES),
        }
    ),
)


@st.composite
def records(draw):
    kind = draw(st.sampled_from(["array", "encoder", "metric", "config"]))
    if kind == "array":
        return ArrayRecord(draw(st.dictionaries(st.text(max_size=10), arrays(), max_size=3)))
    if kind == "encoder":
        return draw(encoder_records())
    if kind == "metric":
        return MetricRecord(draw(METRICS))
    return ConfigRecord(draw(CONFIGS))


CONTENT = st.dictionaries(NAMES, records(), max_size=4).map(RecordDict)
KINDS = st.sampled_from(["request", "reply"])
TYPES = st.sampled_from([*contract.MESSAGE_TYPES, "train.other", "query"])
ROLES = st.sampled_from([*contract.ROLES, "", "*", "admin"])


def _request(message_type: str) -> list[dict]:
    """An honest request of that type (what a reply is checked against)."""
    cfg = _cfg()
    if message_type == contract.QUERY_SITE:
        return describe(messages.pack_query([]))
    models = {"simmim": {}, "mtnxent": {}} if message_type == contract.EVALUATE_SEGMENT else None
    rd = messages.pack_request(
        cfg, "x", 1, models=models, fusions=[("simmim", "mtnxent")], max_frames=MAX_FRAMES
    )
    return describe(rd)


MAX_FRAMES = 8  # what the fuzzed evaluation requests ask for


# ------------------------------------------------------------------ the check
def _assert_allowed(kind, message_type, role, described) -> None:
    """What a passing check promises: every record is allowed, of its type, and every array a
    parameter of the model with its shape, its payload exactly that array and finite."""
    allowed = contract.allowed(kind, message_type, role)
    for rec in described:
        key = (
            contract.MODEL_PREFIX if rec["name"].startswith(contract.MODEL_PREFIX) else rec["name"]
        )
        assert key in allowed and rec["type"] == contract.record_type(rec["name"])
        for a in rec.get("arrays", []):
            shape, _ = schema.model_schema(_cfg(), rec["name"])[a["name"]]
            assert tuple(a["shape"]) == shape and "payload" not in a and not a.get("nonfinite")
        if kind != "reply":
            continue
        for v in rec.get("metrics", {}).values():  # lists: scores only, bounded, in [0, 1]
            if isinstance(v, dict):
                assert rec["name"] in contract.SCORE_RECORDS and v["len"] <= MAX_FRAMES
                assert v["len"] == 0 or 0 <= v["min"] <= v["max"] <= 1
        if rec["name"] == contract.SIGNATURE:
            assert rec["config"][contract.K_VALUE]["bytes"] == signing.SIGNATURE_BYTES
    if kind == "reply":
        used = contract.non_weight_bytes(described)
        assert used <= contract.reply_capacity(message_type, _request(message_type))


@FUZZ
@given(kind=KINDS, message_type=TYPES, role=ROLES, content=CONTENT)
def test_the_check_passes_only_what_is_allowed_and_raises_only_its_own_error(
    kind, message_type, role, content
):
    described = describe(content)
    json.dumps(described, allow_nan=False)  # what the ledger writes is always valid JSON
    request = _request(message_type) if message_type in contract.MESSAGE_TYPES else []
    try:
        contract.check(kind, message_type, role, described, _cfg(), request=request)
    except contract.ContractViolation:
        return
    _assert_allowed(kind, message_type, role, described)


@FUZZ
@given(role=st.sampled_from(contract.ROLES), encoder=encoder_records(), extra=METRICS)
def test_an_encoder_reply_passes_exactly_when_it_is_the_encoder(role, encoder, extra):
    content = RecordDict({contract.METRICS: MetricRecord(extra), contract.ENCODER: encoder})
    described = describe(content)
    try:
        contract.check(
            "reply",
            contract.TRAIN_PRETRAIN,
            contract.TARGET,
            described,
            _cfg(),
            request=_request(contract.TRAIN_PRETRAIN),
        )
    except contract.ContractViolation:
        return
    _assert_allowed("reply", contract.TRAIN_PRETRAIN, contract.TARGET, described)
    assert set(extra) <= contract.TRAIN_METRIC_NAMES


@FUZZ
@given(
    n=st.integers(0, 20),
    vectors=st.dictionaries(
        st.sampled_from(SCORE_KEYS),
        st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=12),
        min_size=1,
        max_size=3,
    ),
    record=st.sampled_from(sorted(contract.SCORE_RECORDS)),
)
def test_an_evaluation_reply_passes_exactly_when_its_scores_are_bounded_and_in_0_1(
    n, vectors, record
):
    content = RecordDict(
        {
            contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: n}),
            record: MetricRecord(vectors),
        }
    )
    expected = all(
        len(v) <= min(n, MAX_FRAMES) and all(0 <= x <= 1 for x in v) for v in vectors.values()
    )
    request = _request(contract.EVALUATE_SEGMENT)
    try:
        contract.check(
            "reply", contract.EVALUATE_SEGMENT, contract.TARGET, describe(content), _cfg(),
            request=request,
        )  # fmt: skip
        passed = True
    except contract.ContractViolation:
        passed = False
    assert passed == expected


@FUZZ
@given(a=CONTENT, b=CONTENT, forged=st.binary(max_size=120))
def test_a_signature_verifies_only_the_reply_it_was_made_for(a, b, forged):
    key = _key()
    da, db = describe(a), describe(b)
    stmt_a, stmt_b = (
        signing.statement(
            run_id=1,
            node=2,
            site="s",
            message_type="train.pretrain",
            group_id="g",
            request_id="m",
            request="0" * 64,
            reply=signing.digest(d),
        )  # fmt: skip
        for d in (da, db)
    )
    sig = signing.sign(key, stmt_a)
    assert signing.verify(key.public_key(), stmt_a, sig)
    assert signing.verify(key.public_key(), stmt_b, sig) == (stmt_a == stmt_b)
    assert not signing.verify(key.public_key(), stmt_a, forged)  # any other bytes: False


@cache
def _key():
    return signing.load_private_key_from_bytes(signing.new_keypair()[0])


def test_an_honest_encoder_reply_passes():
    state = {k: Array(np.zeros(s, dtype=d)) for k, (s, d) in _encoder().items()}
    content = RecordDict(
        {
            contract.METRICS: MetricRecord({"train_loss": 0.5, contract.NUM_EXAMPLES: 3}),
            contract.ENCODER: ArrayRecord(state),
        }
    )
    contract.check(
        "reply",
        contract.TRAIN_PRETRAIN,
        contract.TARGET,
        describe(content),
        _cfg(),
        request=_request(contract.TRAIN_PRETRAIN),
    )


# ------------------------------------------------------------------ the auditor
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
ENTRY_KEYS = st.sampled_from(
    [
        "event",
        "party",
        "direction",
        "message_type",
        "src_node",
        "dst_node",
        "records",
        "seq",
        "prev",
        "hash",
        "run_id",
        "group_id",
        "site",
        "role",
        "error",
        "refused",
        "reply_to",
    ]
)


@st.composite
def ledger_lines(draw) -> list[bytes]:
    """A real site ledger with lines mutated, replaced by junk, or appended to."""
    original = _real_ledger()
    lines = list(original)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["field", "drop-field", "junk", "json", "bytes", "cut"]))
        entry = json.loads(original[i])
        if how == "field":
            entry[draw(ENTRY_KEYS)] = draw(JSON_VALUES)
            lines[i] = json.dumps(entry).encode()
        elif how == "drop-field":
            entry.pop(draw(ENTRY_KEYS), None)
            lines[i] = json.dumps(entry).encode()
        elif how == "junk":
            lines[i] = draw(st.text(max_size=50)).encode()
        elif how == "json":
            lines[i] = json.dumps(draw(JSON_VALUES)).encode()
        elif how == "bytes":
            lines[i] = draw(st.binary(max_size=50)).replace(b"\n", b"")
        else:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    return lines


@cache
def _real_ledger() -> list[bytes]:
    """Lines of a small, real ledger: a request and its reply as a site logs them."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / LEDGER_NAME
    book = Ledger(path)
    request = _request(contract.TRAIN_PRETRAIN)
    for direction, records in (("in", request), ("out", [])):
        book.append(
            {
                "event": "message",
                "party": "site",
                "site": "s",
                "role": contract.TARGET,
                "direction": direction,
                "message_type": contract.TRAIN_PRETRAIN,
                "group_id": "g",
                "message_id": "",
                "reply_to": "",
                "src_node": 1,
                "dst_node": 2,
                "run_id": 1,
                "records": records,
            }
        )
    return path.read_bytes().splitlines()


@FUZZ
@given(lines=ledger_lines(), newline=st.booleans())
def test_the_auditor_reports_any_ledger_line_and_never_crashes(tmp_path_factory, lines, newline):
    folder = tmp_path_factory.mktemp("ledger")
    path = folder / LEDGER_NAME
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline else b""))
    read_ledger(path)
    report = audit_run(site_dirs=[folder])
    assert report.exit_code in (0, 2, 3, 4, 5)
    report.render()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
