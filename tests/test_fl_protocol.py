"""The wire contract (common/fl/contract.py): one table, enforced on both sides; lossless packing
(common/fl/messages.py)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import arms
from common.config import load_experiment
from common.fl import contract, messages
from common.fl.describe import describe
from common.models import build_transunet
from tests.fl_harness import wire


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_experiment_round_trips_as_flat_config(name):
    cfg = load_experiment(f"configs/{name}.yaml")
    back = messages.unflatten_experiment(messages.flatten_experiment(cfg))
    # everything but the federation's site list reaches the site unchanged
    assert back == cfg.model_copy(update={"sites": ()})


def test_every_reply_table_entry_names_known_records():
    assert contract.ALLOWED_REPLY_RECORDS
    for (mtype, role), names in contract.ALLOWED_REPLY_RECORDS.items():
        assert mtype in contract.MESSAGE_TYPES and role in contract.ROLES
        assert names <= set(contract.RECORD_TYPES)


def _check_reply(message_type: str, role: str, content: RecordDict) -> None:
    contract.check("reply", message_type, role, describe(content), None, request=[])


def test_reply_with_a_record_not_in_the_table_is_refused():
    bad = messages.pack_weights_reply(contract.ENCODER, {"w": torch.zeros(2)}, {"loss": 1.0}, 3)
    bad[contract.SCORES] = MetricRecord({"x/dice": [0.5]})
    with pytest.raises(contract.ContractViolation, match="'scores' is not allowed"):
        _check_reply(contract.TRAIN_PRETRAIN, contract.TARGET, bad)


def test_reply_with_weights_in_an_evaluate_reply_is_refused():
    bad = messages.pack_eval_reply({"m/dice": 0.5}, {"m/dice": [0.5]}, {"m/dice": [0.5]}, 1)
    bad[contract.MODEL] = ArrayRecord({"w": torch.zeros(1)})
    with pytest.raises(contract.ContractViolation, match="'model' is not allowed"):
        _check_reply(contract.EVALUATE_SEGMENT, contract.SOURCE, bad)


def test_record_of_the_wrong_kind_is_refused():
    bad = RecordDict({contract.METRICS: ConfigRecord({"note": "a string is not a metric"})})
    with pytest.raises(contract.ContractViolation, match="must be a MetricRecord"):
        _check_reply(contract.EVALUATE_SEGMENT, contract.TARGET, bad)


def test_pretrain_request_may_not_go_to_a_source_site():
    cfg = load_experiment("configs/tiny.yaml")
    request = describe(messages.pack_request(cfg, "pretrain", 1, branch=arms.SIMMIM))
    with pytest.raises(contract.ContractViolation, match="source"):
        contract.check("request", contract.TRAIN_PRETRAIN, contract.SOURCE, request, cfg)


def test_request_survives_flowers_serialisation(flower_identity):
    cfg = load_experiment("configs/tiny.yaml")
    state = build_transunet(cfg.model).state_dict()
    key = next(iter(state))
    models = {"simmim": state, "mtnxent": {k: torch.zeros_like(v) for k, v in state.items()}}
    content = messages.pack_request(cfg, "evaluate", 1, models=models, fusions=[arms.MAIN_PAIR])
    msg = Message(content, dst_node_id=7, message_type=contract.EVALUATE_SEGMENT, group_id="g")
    copy, size = wire(msg)
    records = describe(copy.content)  # the guard describes a request before the handler runs
    contract.check("request", contract.EVALUATE_SEGMENT, contract.TARGET, records, cfg)
    req = messages.unpack_request(copy.content)
    assert size > 0 and req.cfg == cfg.model_copy(update={"sites": ()})
    assert req.fusions == [arms.MAIN_PAIR] and req.branch == "" and req.encoder is None
    assert torch.equal(req.models["simmim"][key], state[key])
    # the weights left the message as they became tensors: a big model is not held twice
    assert all(len(rec) == 0 for rec in copy.content.array_records.values())


def test_record_bytes_handles_empty_strings_and_lists():
    # ConfigRecord.count_bytes in Flower 1.42 raises on "" and []; ours must not
    rd = RecordDict({contract.STAGE: ConfigRecord({"a": "", "b": [], "c": 1})})
    assert messages.record_bytes(rd) == 3 + 8
