"""The site side as a Flower ClientApp: thin handlers (unpack, call, pack).

The guard mod (``common.fl.audit.Guard``) checks every request and reply against the wire contract
and the model's own state-dict schema before anything is run or sent, and logs both in the site's
hash-chained ledger (``<site out dir>/ledger.jsonl``): a reply carrying a record, array or metric
list the contract does not allow becomes an error reply, and nothing is uploaded (fail closed).
"""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported in Ray workers)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import source, target
from clients.site import known_site, resolve_site, site_card
from common.fl import audit
from common.fl import protocol as p

app = ClientApp(mods=[audit.Guard(known_site)])


@app.query(p.action(p.QUERY_SITE))
def query_site(msg: Message, context: Context) -> Message:
    site = resolve_site(context, p.unpack_federation(msg.content))
    return Message(p.pack_site_card(site_card(site)), reply_to=msg)


@app.train(p.action(p.TRAIN_PRETRAIN))
def train_pretrain(msg: Message, context: Context) -> Message:
    req = p.unpack_request(msg.content)
    res = target.pretrain(req, resolve_site(context))
    return Message(
        p.pack_weights_reply(p.ENCODER, res.state, res.metrics, res.num_examples), reply_to=msg
    )


@app.train(p.action(p.TRAIN_FINETUNE))
def train_finetune(msg: Message, context: Context) -> Message:
    req = p.unpack_request(msg.content)
    res = source.finetune(req, resolve_site(context))
    return Message(
        p.pack_weights_reply(p.MODEL, res.state, res.metrics, res.num_examples), reply_to=msg
    )


@app.evaluate(p.action(p.EVALUATE_SEGMENT))
def evaluate_segment(msg: Message, context: Context) -> Message:
    req = p.unpack_request(msg.content)
    res = source.evaluate(req, resolve_site(context))
    reply = p.pack_eval_reply(
        res.metrics, res.per_image, res.per_video, res.num_examples, res.per_patient
    )
    return Message(reply, reply_to=msg)
