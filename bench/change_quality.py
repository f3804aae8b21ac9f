"""Change-map quality on the sample: chip-level precision / recall / F1 and change-date error of
the harmonic mode, and ROC AUC of the bitemporal score against per-band spectral statistics.

    .venv/bin/python bench/change_quality.py [--sample DIR] [--lake DIR] [--encoder rcf]

1. The ``demo`` sample (monthly dates 2020-2022, seed 0) is written to ``bench/out/sample-demo``
   unless ``--sample`` names one (or it is already there).
2. ``sentinel2_tiles`` + ``chips`` (``dagster.materialize``, in process) and the embedding
   worker's ``embed_partition`` run for every region x date into ``--lake`` (default
   ``bench/out/lake-demo-<encoder>``; partitions already there are reused).
3. ``change_maps`` is materialized for both regions with its default config; its table is read
   back and scored. The ``pca`` series is scored too (domain call, same defaults otherwise).
4. Truth: ``truth/deforestation.geojson`` (RFC 7946 lon/lat unless the file names another CRS),
   projected to each region's grid. A chip is *truly changed* when the events cleared inside
   the monitoring period cover at least ``--min-cover`` of it (default 1%: the sample's
   clearings are 5-60 ha, 0.3-5% of a 655 ha chip, so a 10% rule would leave no changed chip);
   its true date is the earliest ``date_cleared`` of those events covering at least half that.
   A detection with no true change is a false positive; a true change not detected (or a chip
   with ``insufficient_data``) a false negative. Date error: detected minus true date, in days,
   over true positives.
5. Bitemporal: pairs (before, after) = each date of the first year x the date nearest the same
   day of the year two years later (same season) and nearest six months later plus one year
   (opposite season). Per pair and chip the label is "events cleared between the two dates cover
   >= --min-cover". Scores: ``bitemporal_scores`` on the chips' embeddings, and the same function
   on per-band mean + standard deviation of the chip datacubes (20 features, each z-scored over
   the pair's chips) - the spectral-statistics baseline, normalized the same way. ROC AUC over
   all (pair, chip) rows of both regions.

The last printed line is the harmonic mode's F1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geofm_assets.analysis.change import ChangeParams, bitemporal_scores, detect_harmonic
from geofm_assets.analysis.change_outputs import CHANGE_TABLE
from geofm_assets.analysis.series import load_region_series
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.geo.sample_data import SampleCatalog, generate_sample
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, partition_dir, region_dir
from geofm_assets.partitions import REGIONS
from geofm_assets.workers.embed import read_datacube

OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Event:
    geometry: BaseGeometry  # in the grid's CRS
    date_cleared: dt.date


def sample_dates(sample_dir: Path) -> list[str]:
    """The catalog's acquisition dates (YYYY-MM-DD), read from its items."""
    days = set()
    for item in sample_dir.glob("sentinel-2-l2a/*/*.json"):
        days.add(json.loads(item.read_text())["properties"]["datetime"][:10])
    if not days:
        raise SystemExit(f"{sample_dir} has no items under sentinel-2-l2a/: pass a sample catalog folder")
    return sorted(days)


def ensure_sample(path: Path | None) -> Path:
    if path is not None:
        if not (path / "catalog.json").exists():
            raise SystemExit(f"--sample {path} has no catalog.json")
        return path
    target = OUT / "sample-demo"
    if not (target / "catalog.json").exists():
        t0 = time.perf_counter()
        sample: SampleCatalog = generate_sample(target, size="demo", seed=0)
        print(f"wrote the demo sample to {target} ({len(sample.dates)} dates) in "
              f"{time.perf_counter() - t0:.0f} s")
    return target


def ensure_lake(sample_dir: Path, lake: Path, encoder_name: str) -> list[str]:
    """Tiles, chips and embeddings of every region x date (reusing partitions already there)."""
    import tempfile

    from dagster import DagsterInstance, materialize

    from geofm_assets.assets.chips import chips
    from geofm_assets.assets.tiles import sentinel2_tiles
    from geofm_assets.models import build_encoder
    from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
    from geofm_assets.resources.lake import LocalLakeResource
    from geofm_assets.resources.stac import StacResource
    from geofm_assets.workers.embed import embed_partition

    dates = sample_dates(sample_dir)
    todo = [(r, d) for r in sorted(REGIONS) for d in dates
            if not (partition_dir(lake, "embeddings", r, d) / EMBEDDINGS_TABLE).exists()]
    if not todo:
        return dates
    with tempfile.TemporaryDirectory() as home:
        import os

        os.environ.setdefault("DAGSTER_HOME", home)
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, dates)
        resources = {"stac": StacResource(catalog=str(sample_dir / "catalog.json")),
                     "lake": LocalLakeResource(root=str(lake))}
        encoder = build_encoder(encoder_name)
        t0 = time.perf_counter()
        for i, (region, day) in enumerate(todo):
            result = materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                                 partition_key=str(partition_key(day, region)), raise_on_error=True)
            assert result.success
            embed_partition(lake, region, day, encoder, batch_size=16, log=lambda _m: None)
            if (i + 1) % 12 == 0 or i + 1 == len(todo):
                print(f"  lake: {i + 1}/{len(todo)} partitions in {time.perf_counter() - t0:.0f} s",
                      flush=True)
    return dates


def load_events(path: Path, grid: ChipGrid) -> list[Event]:
    doc = json.loads(path.read_text())
    source = CRS.from_user_input((doc.get("crs") or {}).get("properties", {}).get("name", "EPSG:4326"))
    to_grid = Transformer.from_crs(source, grid.epsg, always_xy=True)
    return [
        Event(shapely.transform(shape(f["geometry"]), lambda x, y: to_grid.transform(x, y),
                                interleaved=False),
              dt.date.fromisoformat(f["properties"]["date_cleared"]))
        for f in doc["features"]
    ]


def chip_truth(events: list[Event], grid: ChipGrid, chip_id: str, start: dt.date, end: dt.date,
               min_cover: float) -> tuple[bool, dt.date | None, float]:
    """(truly changed, true date, covered fraction) of one chip for clearings in (start, end]."""
    cell = box(*grid.chip_bounds(*grid.parse_chip_id(chip_id)))
    hits = sorted((e.date_cleared, e.geometry.intersection(cell).area / cell.area)
                  for e in events if start < e.date_cleared <= end and e.geometry.intersects(cell))
    cover = sum(f for _, f in hits)
    day = next((d for d, f in hits if f >= min_cover / 2), hits[0][0] if hits else None)
    return cover >= min_cover, day, cover


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def prf(rows: list[tuple[bool, bool]]) -> tuple[float, float, float, int, int, int]:
    tp = sum(t and d for t, d in rows)
    fp = sum(d and not t for t, d in rows)
    fn = sum(t and not d for t, d in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, tp, fp, fn


def spectral_stats(lake: Path, region: str, day: str) -> dict[str, np.ndarray]:
    """chip id -> [20] per-band mean and standard deviation of the chip's datacube (DN > 0)."""
    table = pq.read_table(partition_dir(lake, "chips", region, day) / CHIPS_TABLE,
                          columns=["chip_id", "datacube_path"]).to_pylist()
    out = {}
    for row in table:
        dn = read_datacube(lake / row["datacube_path"]).astype(np.float64)  # [C H W]
        valid = (dn > 0).all(axis=0)
        pixels = dn[:, valid]  # [C P]
        out[row["chip_id"]] = np.concatenate([pixels.mean(axis=1), pixels.std(axis=1)])
    return out


def nearest(dates: list[dt.date], target: dt.date) -> dt.date:
    return min(dates, key=lambda d: abs((d - target).days))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=None)
    ap.add_argument("--lake", type=Path, default=None)
    ap.add_argument("--encoder", default="rcf")
    ap.add_argument("--min-cover", type=float, default=0.01)
    args = ap.parse_args()
    sample_dir = ensure_sample(args.sample)
    lake = (args.lake or OUT / f"lake-demo-{args.encoder}").resolve()
    dates = ensure_lake(sample_dir, lake, args.encoder)
    truth_path = sample_dir / "truth" / "deforestation.geojson"

    import os
    import tempfile

    from dagster import DagsterInstance, materialize

    from geofm_assets.assets.change_maps import change_maps
    from geofm_assets.resources.lake import LocalLakeResource

    print(f"sample {sample_dir} ({len(dates)} dates {dates[0]} .. {dates[-1]}), lake {lake}, "
          f"encoder {args.encoder}")
    print(f"truth rule: a chip is changed when clearings dated inside the monitoring period cover "
          f">= {args.min_cover:.1%} of it; true date = earliest such clearing covering >= "
          f"{args.min_cover / 2:.1%}")
    harmonic_rows: list[tuple[bool, bool]] = []
    pca_rows: list[tuple[bool, bool]] = []
    date_errors: list[int] = []
    pca_errors: list[int] = []
    pair_scores: dict[str, list[float]] = {"embeddings": [], "spectral": []}
    pair_labels: list[bool] = []
    with tempfile.TemporaryDirectory() as home:
        os.environ.setdefault("DAGSTER_HOME", home)
        instance = DagsterInstance.ephemeral()
        for region in sorted(REGIONS):
            grid = ChipGrid.for_region(REGIONS[region])
            events = load_events(truth_path, grid)
            t0 = time.perf_counter()
            result = materialize([change_maps], partition_key=region, instance=instance,
                                 resources={"lake": LocalLakeResource(root=str(lake))})
            assert result.success
            asset_s = time.perf_counter() - t0
            table = pq.read_table(region_dir(lake, "change_maps", region) / CHANGE_TABLE).to_pylist()
            series = load_region_series(lake, region)
            pca = detect_harmonic(series, ChangeParams(series="pca"))
            baseline_end = dt.date.fromisoformat(dates[0]) + dt.timedelta(
                days=ChangeParams().baseline_days - 1)
            end = dt.date.fromisoformat(dates[-1])
            print(f"\n{region}: {len(table)} chips, change_maps materialized in {asset_s:.1f} s; "
                  f"monitoring {baseline_end + dt.timedelta(days=1)} .. {end}")
            print(f"  {'chip':22s} {'cover':>6s} {'true date':>10s} | {'status':17s} {'detected':>10s} "
                  f"{'intensity':>9s} | pca")
            pca_by_id = {str(c): i for i, c in enumerate(pca.chip_ids)}
            for row in table:
                changed, true_day, cover = chip_truth(events, grid, row["chip_id"], baseline_end, end,
                                                      args.min_cover)
                detected = bool(row["changed"])
                harmonic_rows.append((changed, detected))
                if changed and detected and true_day:
                    date_errors.append((row["change_date"] - true_day).days)
                j = pca_by_id[row["chip_id"]]
                pca_detected = bool(pca.changed[j])
                pca_rows.append((changed, pca_detected))
                if changed and pca_detected and true_day:
                    pca_errors.append((pca.change_date[j].item() - true_day).days)
                intensity = f"{row['intensity']:9.2f}" if row["intensity"] is not None else " " * 9
                print(f"  {row['chip_id']:22s} {cover:6.2%} {true_day or ''!s:>10s} | "
                      f"{row['status']:17s} {row['change_date'] or ''!s:>10s} {intensity} | "
                      f"{pca.change_date[j] if pca_detected else ''}")

            # Bitemporal pairs: first-year dates x same season two years on / opposite season.
            days = [d.item() for d in series.dates.astype("datetime64[D]")]
            first = [d for d in days if d <= baseline_end]
            index = {d: i for i, d in enumerate(days)}
            stats_cache: dict[dt.date, dict[str, np.ndarray]] = {}
            pairs = sorted({(b, nearest(days, b + dt.timedelta(days=offset)))
                            for b in first for offset in (730, 548)})
            for before, after in pairs:
                if after <= before:
                    continue
                rows_b = {series.chip_ids[series.chip_index[m]]: m
                          for m in np.flatnonzero(series.date_index == index[before])}
                rows_a = {series.chip_ids[series.chip_index[m]]: m
                          for m in np.flatnonzero(series.date_index == index[after])}
                both = sorted(set(rows_b) & set(rows_a))
                if len(both) < 3:
                    continue
                for day in (before, after):
                    if day not in stats_cache:
                        stats_cache[day] = spectral_stats(lake, region, day.isoformat())
                emb = bitemporal_scores(series.vectors[[rows_b[c] for c in both]],
                                        series.vectors[[rows_a[c] for c in both]]).score
                sb = np.array([stats_cache[before][c] for c in both])
                sa = np.array([stats_cache[after][c] for c in both])
                scale = np.concatenate([sb, sa]).std(axis=0) + 1e-9
                spec = bitemporal_scores(sb / scale, sa / scale).score
                for k, chip in enumerate(both):
                    label, _, _ = chip_truth(events, grid, chip, before, after, args.min_cover)
                    pair_labels.append(label)
                    pair_scores["embeddings"].append(float(emb[k]))
                    pair_scores["spectral"].append(float(spec[k]))

    precision, recall, f1, tp, fp, fn = prf(harmonic_rows)
    p_precision, p_recall, p_f1, p_tp, p_fp, p_fn = prf(pca_rows)
    labels = np.array(pair_labels)
    auc_emb = roc_auc(np.array(pair_scores["embeddings"]), labels)
    auc_spec = roc_auc(np.array(pair_scores["spectral"]), labels)
    median_err = float(np.median(np.abs(date_errors))) if date_errors else float("nan")
    pca_err = float(np.median(np.abs(pca_errors))) if pca_errors else float("nan")
    print(f"\nharmonic, default (baseline_distance, z > 3, k = 3): {len(harmonic_rows)} chips, "
          f"{tp + fn} truly changed; tp {tp} fp {fp} fn {fn}")
    print(f"  precision {precision:.3f}  recall {recall:.3f}  F1 {f1:.3f} (target >= 0.9)")
    print(f"  median |change-date error| {median_err:.0f} days over {len(date_errors)} true positives "
          f"(target <= ~30, one monthly revisit); errors {sorted(date_errors)}")
    print(f"harmonic, series=pca: tp {p_tp} fp {p_fp} fn {p_fn}; precision {p_precision:.3f} recall "
          f"{p_recall:.3f} F1 {p_f1:.3f}; median |date error| {pca_err:.0f} days {sorted(pca_errors)}")
    print(f"bitemporal: {len(labels)} (pair, chip) rows, {int(labels.sum())} changed; ROC AUC "
          f"embeddings {auc_emb:.3f} vs spectral statistics {auc_spec:.3f}")
    print(json.dumps({"f1": round(f1, 4), "precision": round(precision, 4), "recall": round(recall, 4),
                      "median_date_error_days": median_err, "pca_f1": round(p_f1, 4),
                      "auc_bitemporal_embeddings": round(auc_emb, 4),
                      "auc_bitemporal_spectral": round(auc_spec, 4)}))
    print(f"F1 {f1:.3f}")


if __name__ == "__main__":
    main()
