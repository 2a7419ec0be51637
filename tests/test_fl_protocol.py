"""The wire contract (common/fl/protocol.py): one table, enforced on both sides, lossless packing."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import load_experiment
from common.fl import protocol as p
from tests.fl_harness import wire


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_experiment_round_trips_as_flat_config(name):
    # Prepare
    cfg = load_experiment(f"configs/{name}.yaml")
    # Execute
    back = p.unflatten_experiment(p.flatten_experiment(cfg))
    # Assert: everything but the federation's site list reaches the site unchanged
    assert back == cfg.model_copy(update={"sites": ()})


def test_every_reply_table_entry_names_known_records():
    for (mtype, role), names in p.ALLOWED_REPLY_RECORDS.items():
        assert mtype in p.MESSAGE_TYPES and role in p.ROLES
        assert names <= set(p.RECORD_TYPES)


def test_reply_with_a_record_not_in_the_table_is_refused():
    # Prepare: a pretrain reply that also carries per-image scores
    bad = p.pack_weights_reply(p.ENCODER, {"w": torch.zeros(2)}, {"loss": 1.0}, 3)
    bad[p.SCORES] = MetricRecord({"x/dice": [0.5]})
    # Execute / Assert
    with pytest.raises(p.ProtocolError, match="'scores' is not allowed"):
        p.check_reply(p.TRAIN_PRETRAIN, p.TARGET, bad)


def test_reply_with_weights_in_an_evaluate_reply_is_refused():
    bad = p.pack_eval_reply({"m/dice": 0.5}, {"m/dice": [0.5]}, {"m/dice": [0.5]}, 1)
    bad[p.MODEL] = ArrayRecord({"w": torch.zeros(1)})
    with pytest.raises(p.ProtocolError, match="'model' is not allowed"):
        p.check_reply(p.EVALUATE_SEGMENT, p.SOURCE, bad)


def test_record_of_the_wrong_kind_is_refused():
    bad = RecordDict({p.METRICS: ConfigRecord({"note": "a string is not a metric"})})
    with pytest.raises(p.ProtocolError, match="must be a MetricRecord"):
        p.check_reply(p.EVALUATE_SEGMENT, p.TARGET, bad)


def test_pretrain_request_may_not_go_to_a_source_site():
    cfg = load_experiment("configs/tiny.yaml")
    with pytest.raises(p.ProtocolError, match="source"):
        p.check_request(
            p.TRAIN_PRETRAIN, p.SOURCE, p.pack_request(cfg, "pretrain", 1, branch=p.SIMMIM)
        )


def test_request_survives_flowers_serialisation(flower_identity):
    # Prepare: an evaluate request with two models and the fusion pair (empty strings included)
    cfg = load_experiment("configs/tiny.yaml")
    models = {"simmim": {"w": torch.ones(2, 3)}, "mtnxent": {"w": torch.zeros(2, 3)}}
    content = p.pack_request(cfg, "evaluate", 1, models=models, fusions=[p.FUSION_PAIR])
    msg = Message(content, dst_node_id=7, message_type=p.EVALUATE_SEGMENT, group_id="g")
    # Execute
    copy, size = wire(msg)
    req = p.unpack_request(copy.content)
    # Assert
    assert size > 0 and req.cfg == cfg.model_copy(update={"sites": ()})
    assert req.fusions == [p.FUSION_PAIR] and req.branch == "" and req.encoder is None
    assert torch.equal(req.models["simmim"]["w"], torch.ones(2, 3))
    p.check_request(p.EVALUATE_SEGMENT, p.TARGET, copy.content)


def test_record_bytes_handles_empty_strings_and_lists():
    # ConfigRecord.count_bytes in Flower 1.42 raises on "" and []; ours must not
    rd = RecordDict({p.STAGE: ConfigRecord({"a": "", "b": [], "c": 1})})
    assert p.record_bytes(rd) == 3 + 8
