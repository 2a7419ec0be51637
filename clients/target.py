"""Target-site work: self-supervised pretraining of one encoder branch on the site's own frames."""

from __future__ import annotations

from clients.site import LocalSite, load_data
from common.fl.protocol import StageRequest


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
