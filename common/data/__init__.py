"""Site data: the canonical layout (manifest), preprocessing/augmentation, datasets, readers."""

from common.data.manifest import COLUMNS, SPLITS, DataError, FrameRow, SiteData, load_site

__all__ = ["COLUMNS", "SPLITS", "DataError", "FrameRow", "SiteData", "load_site"]
