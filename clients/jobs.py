"""What a site does for each stage request: pick its own output folder, load its own data, call the
framework-free stage (``common/stages.py``). Any site may get any of them that the wire contract
allows its role: target sites pretrain, labeled sites fine-tune (the source's arms; the upper bound
at a labeled target) and every site with labeled frames evaluates."""

from __future__ import annotations

from clients.site import LocalSite, load_data
from common import arms
from common.fl.messages import StageRequest


class EvaluationTooLarge(RuntimeError):
    """The site has more labeled frames in the split than the server asked it to score."""


def pretrain(req: StageRequest, site: LocalSite):
    """Pretrain ``req.branch`` (simmim | contrastive | simclr), continuing ``req.encoder`` if given.

    Returns ``common.stages.StageResult`` (encoder-only weights + scalar metrics). The decoder and
    projection head stay under the site's own output folder.
    """
    from common import stages

    # a study's variant arms pretrain the same branch under their own name (req.arm)
    out_dir = site.out_dir / f"pretrain-{req.arm or req.branch}-r{req.round}"
    return stages.pretrain(
        req.cfg,
        req.branch,
        load_data(site),
        out_dir,
        init_encoder=req.encoder,
        name=req.arm or None,
    )


def _with_own_checkpoint(cfg, site: LocalSite):
    """The experiment with this site's own backbone checkpoint (a request never names one)."""
    model = cfg.model.model_copy(update={"checkpoint": site.checkpoint or None})
    return cfg.model_copy(update={"model": model})


def finetune(req: StageRequest, site: LocalSite):
    """Fine-tune a TransUNet for arm ``req.arm`` from ``req.encoder`` (None = baseline), or continue
    the previous round's averaged ``req.model``. Returns ``common.stages.StageResult``."""
    from common import stages

    out_dir = site.out_dir / f"finetune-{req.arm}-r{req.round}"
    data = load_data(site)
    branch = req.branch or None  # the upper bound names no branch
    cfg = _with_own_checkpoint(req.cfg, site)
    return stages.finetune(
        cfg, data, out_dir, req.encoder, req.arm, init_model=req.model, branch=branch
    )


def evaluate(req: StageRequest, site: LocalSite, run_id: int | None = None):
    """Score each model in ``req.models`` and each fusion pair on the site's labeled ``req.split``.

    Returns ``common.stages.EvalResult``; fusion-weight maps and overlays stay in the site folder,
    and so does, after the test split, the main fused pair as a bundle `crossprobe segment` uses.
    """
    from common import stages

    data = load_data(site)
    labeled = data.card()["counts"].get(req.split, {}).get("labeled", 0)
    if labeled > req.max_frames:  # every score vector is bounded by what the server asked for
        raise EvaluationTooLarge(
            f"site {site.name!r} has {labeled} labeled {req.split} frames; the server asked to "
            f"score at most {req.max_frames} (its run config max-eval-frames)"
        )
    out_dir = site.out_dir / f"evaluate-{req.split}"  # one folder per split: the last run's figures
    res = stages.evaluate(req.cfg, data, out_dir, req.models, req.fusions, split=req.split)
    if req.split == "test" and all(b in req.models for b in arms.MAIN_PAIR):
        _keep_bundle(req, site, res, run_id)
    return res


def _keep_bundle(req: StageRequest, site: LocalSite, res, run_id: int | None) -> None:
    """The main fused pair, its fusion and preprocessing, and this site's own scores of it."""
    from common.bundle import save_bundle

    modes = {req.cfg.fusion.default_mode, *req.cfg.fusion.modes}
    names = {*arms.MAIN_PAIR, *(arms.fusion_name(m, arms.MAIN_PAIR) for m in modes)}
    metrics = {k: v for k, v in res.metrics.items() if k.split("/")[0] in names}
    metrics["n_images"] = res.metrics.get("n_images", 0.0)
    folder = save_bundle(site.out_dir / "bundle", req.cfg, req.models, metrics, run_id)
    print(f"[evaluate:{site.name}] the fused model kept at the site: {folder}", flush=True)
