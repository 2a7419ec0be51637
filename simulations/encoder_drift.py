"""`crossprobe encoder-drift RUN_DIR`: how far source fine-tuning moved each pretrained encoder.

The target pretrains an encoder on its own frames, the source fine-tunes a TransUNet from it, and
the method only helps if fine-tuning keeps some of what pretraining learnt. This command compares,
on the target's own frames, the encoder's token features before fine-tuning (the target's
pretraining folder) and after (the fine-tuned model the server stored), with linear CKA
(``common/cka.py``): 1 = the same representation, lower = moved further. As a reference it gives
each pretrained encoder's CKA with the untrained encoder every arm starts from without pretraining.

It reads a **simulation** run folder (``crossprobe simulate``), where all sites' folders are on
one machine: ``<run>/data/<target>``, ``<run>/sites/<target>/pretrain-<key>-r<R>/model_local.pt``
and ``<run>/phases/finetune/<arm>.safetensors``. In a deployment the two halves are at different
hospitals, and this comparison would have to run at the target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # torch and timm load when the command runs, not for --help
    import torch

    from common.models.encoder import HybridEncoder

ENCODER_KEYS = "encoder.vit."


class DriftError(RuntimeError):
    """The run folder lacks what the comparison needs (the message names the path)."""


def _encoder(cfg, state: dict[str, torch.Tensor], source: Path) -> HybridEncoder:
    from common.models.encoder import HybridEncoder

    enc = HybridEncoder(cfg.model)
    # a TransUNet's keys start with it, SimMIM's pretraining model nests it (net.encoder.vit.)
    vit = {k.split(ENCODER_KEYS, 1)[1]: v for k, v in state.items() if ENCODER_KEYS in k}
    if not vit:
        raise DriftError(f"{source}: no encoder tensors ({ENCODER_KEYS}*)")
    enc.vit.load_state_dict(vit, strict=True)
    return enc.eval()


def token_features(enc: HybridEncoder, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(frames × tokens, width): the encoder's final tokens, each token one row."""
    import torch

    with torch.no_grad():
        out = [enc(images[i : i + batch])[0] for i in range(0, len(images), batch)]
    return torch.cat(out).flatten(0, 1)


def pretrained_arms(run_dir: Path, cfg, target: str) -> dict[str, Path]:
    """Fine-tuned arm -> its encoder's pretraining folder at ``target`` (last round)."""
    from common import arms

    keys = {arms.BRANCHES[b].arm: b for b in arms.pretrain_branches(cfg.contrastive.simclr_arm)}
    keys |= {v.name: v.name for v in cfg.study.variants if arms.branch(v.branch).pretrains}
    out = {}
    for arm, key in keys.items():
        folders = sorted((run_dir / "sites" / target).glob(f"pretrain-{key}-r*"),
                         key=lambda p: int(p.name.rsplit("-r", 1)[1]))  # fmt: skip
        if folders and (run_dir / "phases" / "finetune" / f"{arm}.safetensors").is_file():
            out[arm] = folders[-1] / "model_local.pt"
    return out


def encoder_drift(run_dir: Path, frames: int = 64, split: str = "test") -> dict:
    """CKA between each pretrained encoder and its fine-tuned encoder on the target's frames."""
    import torch
    from safetensors.torch import load_file

    from common.cka import linear_cka
    from common.config import load_experiment
    from common.data.datasets import FrameDataset
    from common.data.manifest import load_site
    from common.models.encoder import HybridEncoder

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise DriftError(f"{config}: not found (is {run_dir} a `crossprobe simulate` run folder?)")
    cfg = load_experiment(config)
    target = next(s.name for s in cfg.sites if s.role == "target")
    data = run_dir / "data" / target
    if not data.is_dir():
        raise DriftError(f"{data}: no target site data (is {run_dir} a simulation run folder?)")
    ds = FrameDataset(load_site(data), split, cfg.model.img_size)
    if len(ds) < 2:
        raise DriftError(f"{data}: fewer than two {split} frames")
    idx = torch.linspace(0, len(ds) - 1, min(frames, len(ds))).long().tolist()
    images = torch.stack([ds[i]["image"] for i in dict.fromkeys(idx)])
    torch.manual_seed(cfg.seed)
    untrained = token_features(HybridEncoder(cfg.model).eval(), images)
    rows = {}
    for arm, path in pretrained_arms(run_dir, cfg, target).items():
        before = token_features(_encoder(cfg, torch.load(path, map_location="cpu"), path), images)
        tuned_path = run_dir / "phases" / "finetune" / f"{arm}.safetensors"
        after = token_features(_encoder(cfg, load_file(str(tuned_path)), tuned_path), images)
        rows[arm] = {"cka_finetuned": linear_cka(before, after),
                     "cka_untrained": linear_cka(before, untrained)}  # fmt: skip
    if not rows:
        raise DriftError(f"{run_dir}: no fine-tuned arm with a pretraining folder at {target!r}")
    return {"run": str(run_dir), "site": target, "split": split, "frames": len(images),
            "finetune": cfg.finetune.model_dump(mode="json"), "arms": rows}  # fmt: skip


def plot_drift(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3), dpi=100)
    x = list(range(len(names)))
    ax.bar([i - 0.2 for i in x], [result["arms"][n]["cka_finetuned"] for n in names], 0.4,
           label="pretrained vs fine-tuned")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [result["arms"][n]["cka_untrained"] for n in names], 0.4,
           label="pretrained vs untrained")  # fmt: skip
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("linear CKA")
    ax.set_title(f"encoder drift on {result['site']} {result['split']} frames", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def encoder_drift_command(
    run_dir: Path = typer.Argument(..., help="A `crossprobe simulate` run folder."),
    frames: int = typer.Option(64, min=2, help="Target frames to compare on (evenly spaced)."),
    split: str = typer.Option("test", help="The target split the frames come from."),
) -> None:
    """How far fine-tuning moved each pretrained encoder: linear CKA on the target's frames."""
    try:
        res = encoder_drift(run_dir, frames, split)
    except DriftError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    (run_dir / "encoder_drift.json").write_text(json.dumps(res, indent=2))
    plot_drift(res, run_dir / "encoder_drift.png")
    typer.echo(
        f"{res['frames']} {split} frames of {res['site']}; linear CKA of the encoder's tokens"
    )
    typer.echo(f"{'arm':12s} {'vs fine-tuned':>14s} {'vs untrained':>13s}")
    for arm, r in res["arms"].items():
        typer.echo(f"{arm:12s} {r['cka_finetuned']:14.3f} {r['cka_untrained']:13.3f}")
    typer.echo(f"→ {run_dir / 'encoder_drift.json'}, {run_dir / 'encoder_drift.png'}")
