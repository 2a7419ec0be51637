"""Writing frame and mask images of the canonical layout (``docs/data.md``, "Canonical on-disk
layout").

The synthetic generator and the real-data ingest write every PNG through :func:`save_png`, so the
same array gives the same bytes wherever it comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PNG_COMPRESS_LEVEL = 6  # zlib level; part of the byte-identical output, do not change lightly


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write a (H, W) array as an 8-bit grey PNG at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(
        path, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
