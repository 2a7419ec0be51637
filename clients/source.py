"""Labeled-site work: supervised fine-tuning (source sites; the upper bound at a labeled target) and
evaluation on the site's labeled test frames."""

from __future__ import annotations

from clients.site import LocalSite, load_data
from common.fl.protocol import StageRequest


def finetune(req: StageRequest, site: LocalSite):
    """Fine-tune a TransUNet for arm ``req.arm`` from ``req.encoder`` (None = baseline), or continue
    the previous round's averaged ``req.model``. Returns ``common.stages.StageResult``."""
    from common import stages

    out_dir = site.out_dir / f"finetune-{req.arm}-r{req.round}"
    contrastive = req.branch in (stages.BRANCHES[1], stages.BRANCHES[2]) if req.branch else None
    return stages.finetune(
        req.cfg,
        load_data(site),
        out_dir,
        req.encoder,
        req.arm,
        init_model=req.model,
        contrastive=contrastive,
    )


def evaluate(req: StageRequest, site: LocalSite):
    """Score each model in ``req.models`` and each fusion pair on the site's labeled ``req.split``.

    Returns ``common.stages.EvalResult``; fusion-weight maps and overlays stay in the site folder.
    """
    from common import stages

    out_dir = site.out_dir / f"evaluate-{req.split}"  # one folder per split: the last run's figures
    return stages.evaluate(
        req.cfg, load_data(site), out_dir, req.models, req.fusions, split=req.split
    )
