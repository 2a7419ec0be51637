"""The site side as a Flower ClientApp: thin handlers (unpack, call, pack).

The guard mod (``common/fl/guard.py``) checks every request and reply against the wire contract and
the model's own state-dict schema before anything is run or sent, and logs both in the site's
hash-chained ledger (``<site out dir>/ledger.jsonl``): a reply carrying a record, array or metric
list the contract does not allow becomes an error reply, and nothing is uploaded (fail closed).
"""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported in Ray workers)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import jobs
from clients.memory import release_memory_after_job
from clients.site import known_site, resolve_site, site_card
from common.fl import messages
from common.fl.contract import (
    ENCODER,
    EVALUATE_SEGMENT,
    MODEL,
    QUERY_SITE,
    TRAIN_ADAPT,
    TRAIN_FINETUNE,
    TRAIN_PRETRAIN,
    action,
)
from common.fl.guard import Guard

app = ClientApp(mods=[Guard(known_site), release_memory_after_job])


@app.query(action(QUERY_SITE))
def query_site(msg: Message, context: Context) -> Message:
    site = resolve_site(context, messages.unpack_federation(msg.content))
    return Message(messages.pack_site_card(site_card(site)), reply_to=msg)


@app.train(action(TRAIN_PRETRAIN))
def train_pretrain(msg: Message, context: Context) -> Message:
    req = messages.unpack_request(msg.content)
    res = jobs.pretrain(req, resolve_site(context))
    reply = messages.pack_weights_reply(
        ENCODER, res.state, res.metrics, res.num_examples, req.cfg.runtime.wire_dtype
    )
    return Message(reply, reply_to=msg)


@app.train(action(TRAIN_FINETUNE))
def train_finetune(msg: Message, context: Context) -> Message:
    req = messages.unpack_request(msg.content)
    res = jobs.finetune(req, resolve_site(context))
    reply = messages.pack_weights_reply(
        MODEL, res.state, res.metrics, res.num_examples, req.cfg.runtime.wire_dtype
    )
    return Message(reply, reply_to=msg)


@app.train(action(TRAIN_ADAPT))
def train_adapt(msg: Message, context: Context) -> Message:
    res = jobs.adapt(messages.unpack_request(msg.content), resolve_site(context))
    reply = messages.pack_metrics_reply(res.metrics, res.num_examples)  # the weights stay here
    return Message(reply, reply_to=msg)


@app.evaluate(action(EVALUATE_SEGMENT))
def evaluate_segment(msg: Message, context: Context) -> Message:
    res = jobs.evaluate(messages.unpack_request(msg.content), resolve_site(context), context.run_id)
    reply = messages.pack_eval_reply(
        res.metrics, res.per_image, res.per_video, res.num_examples, res.per_patient
    )
    return Message(reply, reply_to=msg)
