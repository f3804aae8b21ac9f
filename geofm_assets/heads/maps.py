"""What the heads' map assets write: class COGs (codes with a class table in the tags), a
GeoJSON of per-chip predictions, and PNG previews with a legend."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from shapely.geometry import mapping

from geofm_assets.geo.previews import figure_png

NODATA = 0  # class code of "no prediction" in every class raster

# Colours of the sample's classes (and of "mixed"); other names get tab20 colours.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "forest": (20, 100, 40), "pasture": (190, 210, 100), "crops": (240, 170, 40),
    "water": (40, 90, 200), "bare_soil": (150, 100, 60), "urban": (200, 40, 40),
    "mixed": (150, 150, 150),
}


def class_colors(names: Sequence[str]) -> np.ndarray:
    """[K 3] uint8 colours, one per class name."""
    import matplotlib

    tab = matplotlib.colormaps["tab20"]
    out = np.empty((len(names), 3), np.uint8)
    for i, name in enumerate(names):
        rgb = CLASS_COLORS.get(name)
        out[i] = rgb if rgb else (np.array(tab(i % 20)[:3]) * 255).astype(np.uint8)
    return out


def write_class_cog(
    path: Path, codes: np.ndarray, transform: Affine, epsg: int, class_table: Mapping[int, str],
    confidence: np.ndarray | None = None,
) -> None:
    """A uint8 class-code COG (band 1; NODATA where nothing was predicted), with the class table
    as ``CLASS_<code>`` tags, and optionally the confidence in percent as band 2; written to a
    temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 1 if confidence is None else 2
    h, w = codes.shape
    block = 256 if min(h, w) >= 256 else 16 * max(1, min(h, w) // 16)
    profile = dict(driver="COG", width=w, height=h, count=count, dtype="uint8", crs=f"EPSG:{epsg}",
                   transform=transform, nodata=NODATA, compress="DEFLATE", blocksize=max(block, 16),
                   overview_resampling="nearest")
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(codes.astype(np.uint8), 1)
        dst.set_band_description(1, "class: " + ", ".join(f"{k} {v}" for k, v in sorted(class_table.items())))
        if confidence is not None:
            dst.write(confidence.astype(np.uint8), 2)
            dst.set_band_description(2, "confidence of the class, percent")
        dst.update_tags(**{f"CLASS_{k}": v for k, v in class_table.items()}, NODATA_MEANS="no prediction")
    os.replace(tmp, path)


def class_map_png(codes: np.ndarray, class_table: Mapping[int, str], title: str = "",
                  max_pixels: int = 1024) -> bytes:
    """An RGB class map [H W] of codes, NODATA white, with a legend of the classes it shows."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    step = max(1, int(np.ceil(max(codes.shape) / max_pixels)))
    small = codes[::step, ::step]
    table = dict(sorted(class_table.items()))
    colors = class_colors(list(table.values()))
    lut = np.full((256, 3), 255, np.uint8)
    for (code, _), rgb in zip(table.items(), colors, strict=True):
        lut[code] = rgb
    rgb_image = lut[small]
    h, w = small.shape
    fig_w = 3.0 + 4.0 * min(1.0, w / max(h, 1))
    fig = Figure(figsize=(fig_w, 3.5), dpi=100)
    ax = fig.subplots()
    ax.imshow(rgb_image, interpolation="nearest")
    ax.set_axis_off()
    shown = [c for c in table if (small == c).any()]
    def face(code: int) -> tuple[float, float, float]:
        r, g, b = (float(v) / 255 for v in lut[code])
        return (r, g, b)

    handles = [Patch(facecolor=face(c), edgecolor="black", label=table[c]) for c in shown]
    if (small == NODATA).any():
        handles.append(Patch(facecolor="white", edgecolor="black", label="no data"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def write_predictions_geojson(
    path: Path, chip_ids: Sequence[str], geometries: Sequence[bytes], predicted: Sequence[str],
    proba: np.ndarray, classes: Sequence[str], properties: Mapping[str, object] | None = None,
) -> None:
    """A FeatureCollection (lon/lat) of chip footprints with ``class``, ``probability`` (of that
    class) and ``p_<class>`` for every class; written to a temporary name and renamed."""
    features = []
    for i, cid in enumerate(chip_ids):
        k = int(np.argmax(proba[i]))
        props: dict[str, object] = {"chip_id": str(cid), "class": str(predicted[i]),
                                    "probability": round(float(proba[i, k]), 4)}
        props |= {f"p_{c}": round(float(proba[i, j]), 4) for j, c in enumerate(classes)}
        props |= dict(properties or {})
        features.append({"type": "Feature", "id": str(cid),
                         "geometry": mapping(shapely.from_wkb(geometries[i])), "properties": props})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    os.replace(tmp, path)
