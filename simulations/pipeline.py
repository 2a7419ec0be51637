"""`crossprobe bench-pipeline`: the federated study's stages called directly, in process, one after
the other — no Flower. The reference for Flower's overhead: same config, same stage functions,
same data; compare its wall time with ``crossprobe simulate``'s. One source + one target (the
paper's federation)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer


def run_pipeline(config: str, run_dir: Path) -> dict:
    """Pretrain every branch, fine-tune every arm and both bounds, evaluate on both sites; returns
    (and writes to ``<run_dir>/inprocess.json``) the seconds per stage and the metrics."""
    from common import arms, stages
    from common.config import load_experiment
    from common.data.manifest import load_site
    from simulations.sites import ensure_site

    cfg = load_experiment(config)
    t0 = time.perf_counter()
    data = {
        s.role: load_site(ensure_site(s, cfg.model.img_size, run_dir / "data")) for s in cfg.sites
    }
    src, tgt = data["source"], data["target"]
    out = run_dir / "inprocess"
    shutil.rmtree(out, ignore_errors=True)  # a stage finished earlier would be reused, not timed
    times: dict[str, float] = {"data": time.perf_counter() - t0}

    def timed(key: str, fn):
        t = time.perf_counter()
        res = fn()
        times[key] = time.perf_counter() - t
        return res

    branches = arms.pretrain_branches(cfg.contrastive.simclr_arm)
    encoders = {
        b: timed(f"pretrain:{b}", lambda b=b: stages.pretrain(cfg, b, tgt, out / f"pretrain-{b}"))
        for b in branches
    }
    models = {}
    for b, enc in encoders.items():
        arm = arms.BRANCHES[b].arm
        models[arm] = timed(
            f"finetune:{arm}",
            lambda arm=arm, b=b, enc=enc: stages.finetune(
                cfg, src, out / f"ft-{arm}", enc.state, arm, branch=b
            ),
        ).state
    for arm, site in ((arms.LOWER, src), (arms.UPPER, tgt)):
        models[arm] = timed(
            f"finetune:{arm}",
            lambda arm=arm, site=site: stages.finetune(cfg, site, out / f"ft-{arm}", None, arm),
        ).state
    results = {
        site.name: timed(
            f"evaluate:{site.name}",
            lambda site=site: stages.evaluate(
                cfg, site, out / f"eval-{site.name}", models, [arms.MAIN_PAIR]
            ),
        ).metrics
        for site in (tgt, src)
    }
    times["total"] = time.perf_counter() - t0
    summary = {"config": config, "seconds": times, "metrics": results}
    (run_dir / "inprocess.json").write_text(json.dumps(summary, indent=2))
    return summary


def pipeline_command(
    config: Path = typer.Option(Path("configs/demo.yaml"), help="Experiment YAML."),
    run_dir: Path = typer.Option(Path("runs/inprocess"), help="Where data and outputs go."),
) -> None:
    """Run the study's stages in process without Flower (the reference for Flower's overhead)."""
    res = run_pipeline(str(config), run_dir)
    for k, v in res["seconds"].items():
        typer.echo(f"{k:28s} {v:8.1f} s")
