"""Small PNG previews for the Dagster UI: a mosaic's RGB, a contact sheet of chips, and any
matplotlib figure (``figure_png``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image

from geofm_assets.geo.chipping import rgb_thumbnail


def mosaic_preview(tile_path: Path, max_size: int = 512) -> bytes:
    """RGB PNG of a region mosaic, read from its overviews."""
    with rasterio.open(tile_path) as ds:
        scale = max(ds.width, ds.height) / max_size
        shape = (max(1, round(ds.height / max(scale, 1))), max(1, round(ds.width / max(scale, 1))))
        spectral = ds.read(list(range(1, ds.count)), out_shape=(ds.count - 1, *shape))  # [C H W]
    return png_bytes(rgb_thumbnail(spectral))


def contact_sheet(thumbnails: Sequence[Path], columns: int = 6, cell: int = 96) -> bytes | None:
    """A grid of up to ``columns * 2`` chip thumbnails, or None when there is none."""
    paths = list(thumbnails)[: columns * 2]
    if not paths:
        return None
    rows = -(-len(paths) // columns)
    sheet = np.full((rows * (cell + 2), min(columns, len(paths)) * (cell + 2), 3), 255, np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            small = np.asarray(im.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR))
        r, c = divmod(i, columns)
        sheet[r * (cell + 2) + 1 : r * (cell + 2) + 1 + cell,
              c * (cell + 2) + 1 : c * (cell + 2) + 1 + cell] = small
    return png_bytes(sheet)


def figure_png(fig: Any, dpi: float | str = "figure") -> bytes:
    """A matplotlib ``Figure`` as PNG bytes, drawn by Agg (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
