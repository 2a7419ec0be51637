"""`crossprobe bench-signing`: what checking and signing one reply costs, for a model of any size.

A fine-tune reply of the experiment's full TransUNet (random weights) is timed through each step a
reply takes: ``describe`` (SHA-256 of every array, non-finite scan: the ledgers need it anyway), the
contract check, the digest, the site's ECDSA P-384 signature and the server's verification. Medians
over a few repeats; read the ratios (signature vs describe), not the absolute times.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import typer


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_signing(config: Path, repeats: int = 3) -> dict:
    """Seconds per step for one fine-tune reply of ``config``'s model (see the module docstring)."""
    import torch

    from common.config import load_experiment
    from common.fl import contract, messages, signing
    from common.fl.describe import describe
    from common.models import build_transunet

    cfg = load_experiment(config)
    torch.manual_seed(0)
    state = build_transunet(cfg.model).state_dict()
    parameters = sum(t.numel() for t in state.values())
    # (the reply takes the tensors out of ``state``)
    reply = messages.pack_weights_reply(contract.MODEL, state, {"train_loss": 0.1}, 10)
    request = describe(messages.pack_request(cfg, "finetune", 1, arm="lower"))
    key = signing.load_private_key_from_bytes(signing.new_keypair()[0])
    records = describe(reply)
    stmt = signing.statement(
        run_id=1, node=1, site="s", message_type=contract.TRAIN_FINETUNE, group_id="g",
        request_id="m", request=signing.digest(request), reply=signing.digest(records),
    )  # fmt: skip
    sig = signing.sign(key, stmt)
    steps = {
        "describe (hash + scan)": lambda: describe(reply),
        "contract check": lambda: contract.check(
            "reply", contract.TRAIN_FINETUNE, contract.SOURCE, records, cfg, request=request
        ),
        "digest": lambda: signing.digest(records),
        "sign": lambda: signing.sign(key, stmt),
        "verify": lambda: signing.verify(key.public_key(), stmt, sig),
    }
    seconds = {name: _median_s(fn, repeats) for name, fn in steps.items()}
    return {
        "config": str(config),
        "parameters": parameters,
        "reply_bytes": messages.record_bytes(reply),
        "seconds": seconds,
        "signature_vs_describe": (seconds["sign"] + seconds["verify"])
        / seconds["describe (hash + scan)"],
    }


def bench_signing_command(
    config: Annotated[Path, typer.Option(help="Experiment whose model is timed.")] = Path(
        "configs/paper.yaml"
    ),
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per step.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Also write the numbers as JSON here.")] = None,
) -> None:
    """Time describe, contract check, digest, sign and verify for one fine-tune reply."""
    typer.echo(f"bench-signing: building {config}'s model …")
    result = bench_signing(config, repeats)
    typer.echo(
        f"{result['parameters'] / 1e6:.1f} M parameters, reply {result['reply_bytes'] / 2**20:.1f}"
        " MiB"
    )
    for name, s in result["seconds"].items():
        typer.echo(f"  {name:<24}{s * 1e3:10.2f} ms")
    typer.echo(f"sign + verify = {result['signature_vs_describe']:.2e} × describe")
    if out:
        out.write_text(json.dumps(result, indent=2))
