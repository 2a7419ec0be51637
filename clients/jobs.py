"""What a site does for each stage request: pick its own output folder, load its own data, call the
framework-free stage (``common/stages.py``). Any site may get any of them that the wire contract
allows its role: target sites pretrain (and adapt the fine-tuned pair to their own frames), labeled
sites fine-tune (the source's arms; the upper bound at a labeled target) and every site with labeled
frames evaluates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from clients.site import LocalSite, load_data
from common import arms
from common.fl.messages import StageRequest

ADAPTED_WEIGHTS = "pair.safetensors"  # <site output>/adapt/<key>/: the adapted pair


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


def adapt(req: StageRequest, site: LocalSite):
    """Adapt the main pair in ``req.models`` to this site's unlabeled train frames
    (``req.cfg.adapt``) and keep the result under the site's folder, keyed by the pair it came
    from. Returns ``common.adapt.AdaptResult``; only its metrics leave the site."""
    from common.adapt import adapt as adapt_pair

    folder = _adapted_folder(req, site)
    res = adapt_pair(req.cfg, load_data(site), folder, req.models)
    _keep_adapted(folder, res)
    return res


def _adapted_folder(req: StageRequest, site: LocalSite) -> Path:
    """Where this site keeps the pair adapted from ``req.models`` under ``req.cfg``'s adaptation:
    one folder per fine-tuned pair, adaptation settings and seed."""
    from common.adapt import pair_digest

    how = req.cfg.adapt.model_dump_json() + f"seed={req.cfg.seed}"
    key = hashlib.sha256((pair_digest(req.models) + how).encode()).hexdigest()[:16]
    return site.out_dir / "adapt" / key


def _keep_adapted(folder: Path, res) -> None:
    from safetensors.torch import save_file

    flat = {f"{a}.{k}": v.contiguous() for a, state in res.states.items() for k, v in state.items()}
    save_file(flat, str(folder / ADAPTED_WEIGHTS))
    (folder / "adapt.json").write_text(json.dumps(res.metrics, indent=2) + "\n")


def adapted_pair(req: StageRequest, site: LocalSite) -> dict[str, dict]:
    """The pair this site adapted from ``req.models``; adapted now when it is not kept (the adapt
    phase ran in an earlier attempt whose folder is gone: the same seed gives the same pair)."""
    from safetensors.torch import load_file

    folder = _adapted_folder(req, site)
    if not (folder / ADAPTED_WEIGHTS).is_file():
        print(f"[evaluate:{site.name}] no adapted pair kept for these models: adapting now",
              flush=True)  # fmt: skip
        adapt(req, site)
    flat = load_file(str(folder / ADAPTED_WEIGHTS))
    return {
        a: {k[len(a) + 1 :]: v for k, v in flat.items() if k.startswith(f"{a}.")}
        for a in arms.ADAPTED_PAIR
    }


def evaluate(req: StageRequest, site: LocalSite, run_id: int | None = None):
    """Score each model in ``req.models`` (and the site's own adapted pair, when the request names
    it) and each fusion pair on the site's labeled ``req.split``.

    Returns ``common.stages.EvalResult``; fusion-weight maps and overlays stay in the site folder,
    and so does, after the test split, the fused pair as a bundle `crossprobe segment` uses (the
    adapted one when there is one; the paper's pair then beside it, in ``bundle-unadapted``).
    """
    from common import stages

    unknown = sorted(set(req.local_models) - set(arms.ADAPTED_PAIR))
    if unknown:
        raise ValueError(f"site {site.name!r} holds no model {unknown[0]!r} of its own")
    models = dict(req.models)
    if req.local_models:
        models.update(adapted_pair(req, site))
    data = load_data(site)
    labeled = data.card()["counts"].get(req.split, {}).get("labeled", 0)
    if labeled > req.max_frames:  # every score vector is bounded by what the server asked for
        raise EvaluationTooLarge(
            f"site {site.name!r} has {labeled} labeled {req.split} frames; the server asked to "
            f"score at most {req.max_frames} (its run config max-eval-frames)"
        )
    out_dir = site.out_dir / f"evaluate-{req.split}"  # one folder per split: the last run's figures
    res = stages.evaluate(req.cfg, data, out_dir, models, req.fusions, split=req.split)
    if req.split == "test" and all(b in models for b in arms.MAIN_PAIR):
        adapted = all(b in models for b in arms.ADAPTED_PAIR)
        if adapted:
            _keep_bundle(req, site, models, res, run_id, arms.ADAPTED_PAIR, "bundle")
        folder = "bundle-unadapted" if adapted else "bundle"
        _keep_bundle(req, site, models, res, run_id, arms.MAIN_PAIR, folder)
    return res


def _keep_bundle(req, site: LocalSite, models, res, run_id, pair, folder: str) -> None:
    """A fused pair, its fusion and preprocessing, and this site's own scores of it."""
    from common.bundle import save_bundle

    modes = {req.cfg.fusion.default_mode, *req.cfg.fusion.modes}
    names = {*pair, *(arms.fusion_name(m, pair) for m in modes)}
    metrics = {k: v for k, v in res.metrics.items() if k.split("/")[0] in names}
    metrics["n_images"] = res.metrics.get("n_images", 0.0)
    how = req.cfg.adapt.model_dump() if pair == arms.ADAPTED_PAIR else None
    path = save_bundle(site.out_dir / folder, req.cfg, models, metrics, run_id, pair, how)
    print(f"[evaluate:{site.name}] the fused model {'+'.join(pair)} kept at the site: {path}",
          flush=True)  # fmt: skip
