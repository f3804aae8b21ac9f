"""Change-map quality on the sample: chip-level precision / recall / F1 and change-date error of
the harmonic mode (patch level, the default, and the chip-level series for reference), and ROC
AUC of the two-date scores against per-band spectral statistics.

    .venv/bin/python bench/change_quality.py [--sample DIR] [--lake DIR] [--encoder rcf]
                                             [--min-cover 0.01] [--min-area-ha 0.5]

1. The ``demo`` sample (monthly dates 2020-2022, seed 0) is written to ``bench/out/sample-demo``
   unless ``--sample`` names one (or it is already there).
2. ``sentinel2_tiles`` + ``chips`` (``dagster.materialize``, in process) and the embedding
   worker's ``embed_partition`` (with its default spatial features: 16 x 16 cells a chip) run
   for every region x date into ``--lake`` (default ``bench/out/lake-demo-<encoder>``);
   partitions already there are reused, embeddings without ``spatial.npy`` are redone.
3. ``change_maps`` is materialized for both regions with its default config (series
   ``patch_distance``); its table is read back and scored. The chip-level ``baseline_distance``
   and ``pca`` series are scored too (domain calls, same defaults otherwise).
4. Truth: ``truth/deforestation.geojson`` (RFC 7946 lon/lat unless the file names another CRS),
   projected to each region's grid. Rule 1: a chip is *truly changed* when the events cleared
   inside the monitoring period cover at least ``--min-cover`` of it (default 1%, 6.6 ha: the
   sample's clearings are 5-60 ha, 0.8-9% of a 655 ha chip, less where one straddles chips);
   rule 2, for robustness: at least
   ``--min-area-ha`` (default 0.5 ha). The true date is the earliest ``date_cleared`` of those
   events covering at least half the rule's minimum. A detection with no true change is a false
   positive; a true change not detected (or ``insufficient_data``) a false negative. Date error:
   detected minus true date, in days, over true positives.
5. Two dates: pairs (before, after) = each date of the first year x the date nearest the same
   day of the year two years later (same season) and nearest six months later plus one year
   (opposite season). Per pair and chip the label is the same rule for clearings between the
   two dates. Scores: patch embeddings (``bitemporal_cell_scores`` on the cells' features: the
   change_maps default), chip embeddings (``bitemporal_scores`` on the chip vectors), and the
   spectral-statistics baselines through the same normalizations: chip spectral (per-band mean
   + standard deviation of the chip datacubes, 20 features, z-scored over the pair's chips) and
   patch spectral (the same 20 statistics per cell, the same cells, the same aggregation). ROC
   AUC over all (pair, chip) rows of both regions.

The last printed line is the default (patch-level) harmonic F1 under rule 1.
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

from geofm_assets.analysis.change import (
    BitemporalParams,
    ChangeParams,
    bitemporal_cell_scores,
    bitemporal_scores,
    detect_harmonic,
    spatial_pair,
)
from geofm_assets.analysis.change_outputs import CHANGE_TABLE
from geofm_assets.analysis.series import SPATIAL_FILE, load_region_series, load_region_spatial
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
            if not (partition_dir(lake, "embeddings", r, d) / EMBEDDINGS_TABLE).exists()
            or not (partition_dir(lake, "embeddings", r, d) / SPATIAL_FILE).exists()]
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
            if not (partition_dir(lake, "chips", region, day) / CHIPS_TABLE).exists():
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


def truth_rules(args: argparse.Namespace, chip_ha: float) -> list[tuple[str, float]]:
    """(name, minimum covered fraction of a chip) of the truth rules scored."""
    return [(f"clearings cover >= {args.min_cover:.1%} of the chip ({args.min_cover * chip_ha:.1f} ha)",
             args.min_cover),
            (f"clearings cover >= {args.min_area_ha:g} ha of the chip "
             f"({args.min_area_ha / chip_ha:.2%})", args.min_area_ha / chip_ha)]


def cell_spectral_stats(lake: Path, region: str, day: str, grid: int) -> dict[str, np.ndarray]:
    """chip id -> [g*g 20] per-band mean and standard deviation of each cell's pixels."""
    table = pq.read_table(partition_dir(lake, "chips", region, day) / CHIPS_TABLE,
                          columns=["chip_id", "datacube_path"]).to_pylist()
    out = {}
    for row in table:
        dn = read_datacube(lake / row["datacube_path"]).astype(np.float64)  # [C H W]
        c, h, w = dn.shape
        cells = dn.reshape(c, grid, h // grid, grid, w // grid).transpose(1, 3, 0, 2, 4)
        cells = cells.reshape(grid * grid, c, -1)  # [g*g C P]
        out[row["chip_id"]] = np.concatenate([cells.mean(axis=2), cells.std(axis=2)], axis=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=None)
    ap.add_argument("--lake", type=Path, default=None)
    ap.add_argument("--encoder", default="rcf")
    ap.add_argument("--min-cover", type=float, default=0.01)
    ap.add_argument("--min-area-ha", type=float, default=0.5)
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

    defaults = ChangeParams()
    print(f"sample {sample_dir} ({len(dates)} dates {dates[0]} .. {dates[-1]}), lake {lake}, "
          f"encoder {args.encoder}")
    print(f"change_maps defaults: series {defaults.series}, z > {defaults.threshold:g}, k = "
          f"{defaults.consecutive}, persistence {defaults.persistence:g}, min_cells {defaults.min_cells}, "
          f"min_clear {defaults.min_clear:g}")
    chip_ha = 0.0
    methods = ("patch (default)", "chip baseline_distance", "chip pca")
    rows: dict[str, list[tuple[float, dt.date | None, bool, dt.date | None]]] = {m: [] for m in methods}
    pair_scores: dict[str, list[float]] = {k: [] for k in ("patch embeddings", "chip embeddings",
                                                           "patch spectral", "chip spectral")}
    pair_cover: list[float] = []
    with tempfile.TemporaryDirectory() as home:
        os.environ.setdefault("DAGSTER_HOME", home)
        instance = DagsterInstance.ephemeral()
        for region in sorted(REGIONS):
            grid = ChipGrid.for_region(REGIONS[region])
            chip_ha = grid.step**2 / 1e4  # step: the chip side in metres
            events = load_events(truth_path, grid)
            t0 = time.perf_counter()
            result = materialize([change_maps], partition_key=region, instance=instance,
                                 resources={"lake": LocalLakeResource(root=str(lake))})
            assert result.success
            asset_s = time.perf_counter() - t0
            table = pq.read_table(region_dir(lake, "change_maps", region) / CHANGE_TABLE).to_pylist()
            series = load_region_series(lake, region)
            spatial = load_region_spatial(lake, region)
            chip_level = {m: detect_harmonic(series, ChangeParams(series=name)) for m, name in
                          (("chip baseline_distance", "baseline_distance"), ("chip pca", "pca"))}
            baseline_end = dt.date.fromisoformat(dates[0]) + dt.timedelta(days=defaults.baseline_days - 1)
            end = dt.date.fromisoformat(dates[-1])
            print(f"\n{region}: {len(table)} chips, change_maps materialized in {asset_s:.1f} s; "
                  f"monitoring {baseline_end + dt.timedelta(days=1)} .. {end}")
            print(f"  {'chip':22s} {'cover':>6s} {'ha':>5s} {'true date':>10s} | {'status':6s} "
                  f"{'detected':>10s} {'cells':>5s} {'intensity':>9s} | chip-level distance, pca")
            index = {str(c): i for i, c in enumerate(series.chip_ids)}
            for row in table:
                _, true_day, cover = chip_truth(events, grid, row["chip_id"], baseline_end, end, 0.0)
                j = index[row["chip_id"]]
                rows["patch (default)"].append((cover, true_day, bool(row["changed"]), row["change_date"]))
                others = []
                for m, res in chip_level.items():
                    day = res.change_date[j].item() if res.changed[j] else None
                    rows[m].append((cover, true_day, bool(res.changed[j]), day))
                    others.append(str(day or "-"))
                intensity = f"{row['intensity']:9.2f}" if row["intensity"] is not None else " " * 9
                print(f"  {row['chip_id']:22s} {cover:6.2%} {cover * chip_ha:5.1f} {true_day or ''!s:>10s} | "
                      f"{row['status'][:6]:6s} {row['change_date'] or ''!s:>10s} "
                      f"{row['changed_cells'] if row['changed_cells'] is not None else '':>5} {intensity} | "
                      f"{', '.join(others)}")

            # Bitemporal pairs: first-year dates x same season two years on / opposite season.
            days = [d.item() for d in series.dates.astype("datetime64[D]")]
            first = [d for d in days if d <= baseline_end]
            date_index = {d: i for i, d in enumerate(days)}
            stats_cache: dict[dt.date, dict[str, np.ndarray]] = {}
            cell_cache: dict[dt.date, dict[str, np.ndarray]] = {}
            pairs = sorted({(b, nearest(days, b + dt.timedelta(days=offset)))
                            for b in first for offset in (730, 548)})
            bt = BitemporalParams()
            for before, after in pairs:
                if after <= before:
                    continue
                rows_b = {series.chip_ids[series.chip_index[m]]: m
                          for m in np.flatnonzero(series.date_index == date_index[before])}
                rows_a = {series.chip_ids[series.chip_index[m]]: m
                          for m in np.flatnonzero(series.date_index == date_index[after])}
                both = sorted(set(rows_b) & set(rows_a))
                if len(both) < 3:
                    continue
                for day in (before, after):
                    if day not in stats_cache:
                        stats_cache[day] = spectral_stats(lake, region, day.isoformat())
                        cell_cache[day] = cell_spectral_stats(lake, region, day.isoformat(), spatial.grid)
                chip_emb = bitemporal_scores(series.vectors[[rows_b[c] for c in both]],
                                             series.vectors[[rows_a[c] for c in both]]).score
                sb = np.array([stats_cache[before][c] for c in both])
                sa = np.array([stats_cache[after][c] for c in both])
                scale = np.concatenate([sb, sa]).std(axis=0) + 1e-9
                chip_spec = bitemporal_scores(sb / scale, sa / scale).score
                fb, fa, usable = spatial_pair(series, spatial, (before, after), bt.min_clear)
                pick = np.array([index[c] for c in both])
                fb, fa, usable = fb[pick], fa[pick], usable[pick]
                patch_emb, _ = bitemporal_cell_scores(fb, fa, usable, bt.min_cells)
                cb = np.array([cell_cache[before][c] for c in both])  # [n C 20]
                ca = np.array([cell_cache[after][c] for c in both])
                cscale = np.concatenate([cb[usable], ca[usable]]).std(axis=0) + 1e-9
                patch_spec, _ = bitemporal_cell_scores(cb / cscale, ca / cscale, usable, bt.min_cells)
                for k, chip in enumerate(both):
                    _, _, cover = chip_truth(events, grid, chip, before, after, 0.0)
                    pair_cover.append(cover)
                    for name, values in (("patch embeddings", patch_emb), ("chip embeddings", chip_emb),
                                         ("patch spectral", patch_spec), ("chip spectral", chip_spec)):
                        pair_scores[name].append(float(np.nan_to_num(values[k], nan=-np.inf)))

    summary: dict[str, object] = {}
    covers = np.array(pair_cover)
    for r, (rule, min_cover) in enumerate(truth_rules(args, chip_ha)):
        print(f"\ntruth rule {r + 1}: a chip is changed when {rule}, counting clearings dated inside "
              f"the monitoring period; true date = the earliest of them covering >= {min_cover / 2:.2%}")
        for m in methods:
            outcome = [(cover >= min_cover, detected) for cover, _, detected, _ in rows[m]]
            precision, recall, f1, tp, fp, fn = prf(outcome)
            errors = sorted((det_day - true_day).days for cover, true_day, detected, det_day in rows[m]
                            if cover >= min_cover and detected and det_day and true_day)
            median_err = float(np.median(np.abs(errors))) if errors else float("nan")
            print(f"  {m:24s} tp {tp:2d} fp {fp:2d} fn {fn:2d}  precision {precision:.3f} recall "
                  f"{recall:.3f} F1 {f1:.3f}; median |date error| {median_err:.0f} days {errors}")
            summary[f"rule{r + 1}/{m}"] = {"f1": round(f1, 4), "precision": round(precision, 4),
                                           "recall": round(recall, 4), "median_date_error_days": median_err}
        labels = covers >= min_cover
        aucs = {name: roc_auc(np.array(v), labels) for name, v in pair_scores.items()}
        print(f"  bitemporal: {len(labels)} (pair, chip) rows, {int(labels.sum())} changed; ROC AUC "
              + ", ".join(f"{name} {auc:.3f}" for name, auc in aucs.items()))
        summary[f"rule{r + 1}/auc"] = {name: round(auc, 4) for name, auc in aucs.items()}
    print(json.dumps(summary))
    print(f"F1 {summary['rule1/patch (default)']['f1']:.3f}")  # type: ignore[index]


if __name__ == "__main__":
    main()
