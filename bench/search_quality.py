"""Retrieval quality on the sample: precision@10 of same-land-cover retrieval, against baselines.

    .venv/bin/python bench/search_quality.py [--encoder rcf] [--chip 64] [--max-cloud 20]

The tiny sample catalog is written to a temporary folder (~10 s). Chips of ``--chip`` pixels
are cut on each clear scene's own 10 m grid straight from its COGs with rasterio (the 10 m
bands read as they are, the 20 m bands and SCL upsampled x2 by repetition, the +1000 DN offset
of baseline 04.00 removed), labelled by the majority class of the land-cover truth raster
(chips under 60% majority, with land-cover no-data, or with more than 2% cloud, shadow or
no-data in SCL are skipped), and embedded with the encoder through ``make_datacube``. For each
chip its 10 nearest chips by cosine are retrieved, leaving out the chip itself and every chip
of the same place (centres closer than one chip: the other dates and the overlapping tile,
which would otherwise make retrieval a near-duplicate lookup); precision@10 is the fraction of
them with the same class. Baselines: random retrieval (expected precision sum_c f_c^2 over the
class frequencies f_c of the chips) and a per-band mean + std feature (20 numbers, z-scored).
The last line is JSON with the overall precision@10 of the encoder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform as warp_transform

from geofm_assets import bands
from geofm_assets.geo.sample_data import generate_sample
from geofm_assets.models import build_encoder
from geofm_assets.models.datacube import make_datacube

K = 10
MAJORITY = 0.6
BAD_SCL = (bands.SCL_NO_DATA, *bands.SCL_CLOUD_CLASSES, *bands.SCL_SHADOW_CLASSES)


def scene_chips(
    item_path: Path, landcover: rasterio.DatasetReader, lc: np.ndarray, size: int, max_bad: float
):
    """(dn [C H W] float32, class, x, y, datetime, tile) of each usable chip of one scene."""
    item = json.loads(item_path.read_text())
    props = item["properties"]
    offset = 0
    if not props.get("earthsearch:boa_offset_applied", False) and tuple(
        int(p) for p in props["s2:processing_baseline"].split(".")
    ) >= (4, 0):
        offset = bands.BOA_ADD_OFFSET_DN
    href = {k: (item_path.parent / v["href"]).resolve() for k, v in item["assets"].items()}
    with rasterio.open(href[bands.SPECTRAL_BAND_NAMES[0]]) as ref:
        t, h, w = ref.transform, ref.height, ref.width
    stack = []
    for b in bands.SPECTRAL_BANDS:
        with rasterio.open(href[b.name]) as src:
            a = src.read(1).astype(np.float32)
        if b.resolution == 20:
            a = a.repeat(2, 0).repeat(2, 1)
        stack.append(a[:h, :w])
    dn = np.clip(np.stack(stack) - offset, 0, None)  # [C H W]
    with rasterio.open(href[bands.SCL_ASSET]) as src:
        scl = src.read(1).repeat(2, 0).repeat(2, 1)[:h, :w]
    # the scene grid inside the land-cover grid (both 10 m, EPSG:32720, aligned)
    lt = landcover.transform
    c0, r0 = round((t.c - lt.c) / lt.a), round((t.f - lt.f) / lt.e)
    when = dt.datetime.fromisoformat(props["datetime"].replace("Z", "+00:00"))
    out = []
    for r in range(0, h - size + 1, size):
        for c in range(0, w - size + 1, size):
            lr, lc_ = r0 + r, c0 + c
            if lr < 0 or lc_ < 0 or lr + size > lc.shape[0] or lc_ + size > lc.shape[1]:
                continue
            cover = lc[lr : lr + size, lc_ : lc_ + size]
            if (cover == 0).any():
                continue
            counts = np.bincount(cover.ravel(), minlength=7)
            cls = int(counts.argmax())
            if counts[cls] < MAJORITY * cover.size:
                continue
            if np.isin(scl[r : r + size, c : c + size], BAD_SCL).mean() > max_bad:
                continue
            x, y = t * (c + size / 2, r + size / 2)
            out.append((dn[:, r : r + size, c : c + size], cls, x, y, when, props["s2:mgrs_tile"]))
    return out


def precision_at_k(features: np.ndarray, labels: np.ndarray, xy: np.ndarray, size_m: float) -> np.ndarray:
    """Per chip: the share of its K nearest (cosine) other-place chips with its class."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    sim[d2 < size_m**2] = -np.inf  # itself and the same place on other dates / the other tile
    nn = np.argsort(-sim, axis=1)[:, :K]
    return (labels[nn] == labels[:, None]).mean(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="rcf")
    p.add_argument("--chip", type=int, default=64)
    p.add_argument("--max-cloud", type=float, default=20.0, help="eo:cloud_cover of a clear scene, %%")
    p.add_argument("--max-bad", type=float, default=0.02, help="share of cloud/shadow/no-data SCL pixels")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate_sample(Path(tmp) / "sample", size="tiny", seed=0)
        names = json.loads((sample.landcover_path.parent / "landcover_classes.json").read_text())
        chips = []
        with rasterio.open(sample.landcover_path) as landcover:
            lc = landcover.read(1)
            items = sorted(sample.root.glob("sentinel-2-l2a/*/*.json"))
            clear = [
                i
                for i in items
                if json.loads(i.read_text())["properties"]["eo:cloud_cover"] <= args.max_cloud
            ]
            for item in clear:
                chips += scene_chips(item, landcover, lc, args.chip, args.max_bad)
    dn = np.stack([c[0] for c in chips])  # [N C H W]
    labels = np.array([c[1] for c in chips])
    xy = np.array([(c[2], c[3]) for c in chips])
    lon, lat = warp_transform("EPSG:32720", "EPSG:4326", xy[:, 0].tolist(), xy[:, 1].tolist())
    print(
        f"# {len(chips)} chips of {args.chip} px from {len(clear)} clear scenes of {len(items)} "
        f"(tiny sample, seed 0); {dt.date.today()}"
    )

    encoder = build_encoder(args.encoder)
    vecs = []
    for s in range(0, len(chips), 64):
        cube = make_datacube(
            dn[s : s + 64], [c[4] for c in chips[s : s + 64]], lat[s : s + 64], lon[s : s + 64]
        )
        vecs.append(np.asarray(encoder.embed_datacube(cube), np.float32))
    emb = np.concatenate(vecs)
    stats = np.concatenate([dn.mean(axis=(2, 3)), dn.std(axis=(2, 3))], axis=1)
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)

    size_m = args.chip * 10.0
    p_enc = precision_at_k(emb, labels, xy, size_m)
    p_stats = precision_at_k(stats, labels, xy, size_m)
    freq = np.bincount(labels, minlength=7)[1:] / len(labels)
    print(f"{'class':10s} {'chips':>6s} {'random':>7s} {'mean+std':>9s} {args.encoder:>7s}")
    per_class = {}
    for cls in sorted(set(labels.tolist())):
        m = labels == cls
        name = names[str(cls)]
        per_class[name] = {
            "chips": int(m.sum()),
            "random": float(freq[cls - 1]),
            "mean_std": float(p_stats[m].mean()),
            args.encoder: float(p_enc[m].mean()),
        }
        print(
            f"{name:10s} {int(m.sum()):6d} {freq[cls - 1]:7.3f} "
            f"{p_stats[m].mean():9.3f} {p_enc[m].mean():7.3f}"
        )
    random_p = float((freq**2).sum())
    print(
        f"{'overall':10s} {len(labels):6d} {random_p:7.3f} {p_stats.mean():9.3f} {p_enc.mean():7.3f}  "
        f"({p_enc.mean() / random_p:.1f}x random, {p_enc.mean() / p_stats.mean():.2f}x mean+std)"
    )
    print(
        json.dumps(
            {
                "encoder": args.encoder,
                "chips": len(labels),
                "precision_at_10": float(p_enc.mean()),
                "random": random_p,
                "mean_std": float(p_stats.mean()),
                "per_class": per_class,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
