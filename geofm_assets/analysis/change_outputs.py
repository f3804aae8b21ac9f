"""Files of a change map (no Dagster imports): the per-chip table (GeoParquet), a GeoJSON grid,
an intensity COG on the chip grid (one pixel per chip), for the patch-level modes a cell COG
(g x g pixels per chip: where inside the chip the ground changed), a PNG map and time-series
plots.

Everything is written into one directory (the asset's staging directory, so the set appears
atomically); ``CHANGE_TABLE`` is the only Parquet file in it (DuckDB's ``change_maps`` view
globs ``change_maps/region=*/*.parquet``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from affine import Affine
from matplotlib.colors import Normalize
from matplotlib.dates import date2num
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from shapely.geometry import mapping

from geofm_assets.analysis.change import STATUS_OK, ChangeResult, harmonic_design
from geofm_assets.geo.geoparquet import write_geoparquet
from geofm_assets.geo.previews import figure_png
from geofm_assets.geo.regions import ChipGrid

CHANGE_TABLE = "change_maps.parquet"
CHANGE_GEOJSON = "change_maps.geojson"
CHANGE_COG = "intensity.tif"
CELL_COG = "cells.tif"
CHANGE_PNG = "change_map.png"
PLOTS_DIR = "plots"
NODATA = -9999.0

CHANGE_SCHEMA = pa.schema(
    [
        ("chip_id", pa.string()),
        ("region", pa.string()),
        ("mode", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("changed", pa.bool_()),
        ("change_date", pa.date32()),
        ("intensity", pa.float64()),
        ("max_score", pa.float64()),
        ("sigma", pa.float64()),
        ("n_obs", pa.int32()),
        ("n_baseline", pa.int32()),
        ("n_monitoring", pa.int32()),
        ("changed_cells", pa.int32()),  # patch-level modes: confirmed cells (null otherwise)
        ("changed_fraction", pa.float64()),  # of the chip's cells
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("centroid_lon", pa.float64()),
        ("centroid_lat", pa.float64()),
        ("geometry", pa.binary()),
    ]
)


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def change_records(result: ChangeResult, grid: ChipGrid) -> list[dict[str, Any]]:
    """One dict per chip, in ``CHANGE_SCHEMA``'s columns (NaN becomes None: null, never NaN)."""
    geoms = shapely.from_wkb(result.geometries) if result.geometries else np.array([])
    cells = result.cells
    records = []
    for i, chip_id in enumerate(result.chip_ids):
        row, col = grid.parse_chip_id(str(chip_id))
        centroid = geoms[i].centroid
        day = result.change_date[i]
        records.append({
            "chip_id": str(chip_id), "region": result.region, "mode": result.mode,
            "status": str(result.status[i]), "reason": str(result.reason[i]),
            "changed": bool(result.changed[i]),
            "change_date": None if np.isnat(day) else day.astype("datetime64[D]").item(),
            "intensity": finite_or_none(result.intensity[i]),
            "max_score": finite_or_none(result.max_score[i]),
            "sigma": finite_or_none(result.sigma[i]),
            "n_obs": int(result.n_obs[i]), "n_baseline": int(result.n_baseline[i]),
            "n_monitoring": int(result.n_monitoring[i]),
            "changed_cells": int(cells.changed[i].sum()) if cells is not None else None,
            "changed_fraction": float(cells.changed[i].mean()) if cells is not None else None,
            "row": row, "col": col,
            "centroid_lon": float(centroid.x), "centroid_lat": float(centroid.y),
            "geometry": result.geometries[i],
        })
    return records


def change_table(result: ChangeResult, grid: ChipGrid) -> pa.Table:
    return pa.Table.from_pylist(change_records(result, grid), schema=CHANGE_SCHEMA)


def summary(result: ChangeResult) -> dict[str, Any]:
    """The run's description, stored in the table's ``geofm`` metadata and the GeoJSON."""
    return {
        "region": result.region, "mode": result.mode, "chips": result.n_chips,
        "chips_changed": result.n_changed,
        "chips_ok": int((result.status == STATUS_OK).sum()),
        "dates": [str(d) for d in result.dates],
        "baseline_end": result.baseline_end.isoformat() if result.baseline_end else None,
        "params": result.params, "intensity": result.intensity_definition,
        "empty_reason": result.empty_reason,
        **{k: v for k, v in result.extra.items() if isinstance(v, (int, float, str))},
    }


def write_geojson(records: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """A FeatureCollection of chip polygons (EPSG:4326) with the table's columns as properties."""
    features = []
    for rec in records:
        props = {k: v for k, v in rec.items() if k != "geometry"}
        if isinstance(props["change_date"], dt.date):
            props["change_date"] = props["change_date"].isoformat()
        features.append({"type": "Feature", "id": rec["chip_id"],
                         "geometry": mapping(shapely.from_wkb(rec["geometry"])), "properties": props})
    doc = {"type": "FeatureCollection", "name": f"change_maps_{meta['region']}",
           "geofm": meta, "features": features}
    path.write_text(json.dumps(doc, allow_nan=False))


def chip_raster(records: list[dict[str, Any]], grid: ChipGrid, key: str) -> np.ndarray:
    """``[rows cols]`` float32 of ``key`` per chip, ``NODATA`` where a chip has no value."""
    out = np.full((grid.n_rows, grid.n_cols), NODATA, np.float32)
    for rec in records:
        if rec["status"] == STATUS_OK and rec[key] is not None:
            out[rec["row"], rec["col"]] = rec[key]
    return out


def chip_grid_transform(grid: ChipGrid) -> Affine:
    """The region grid's transform with one pixel per chip."""
    return grid.transform * Affine.scale(grid.chip_size)


def write_intensity_cog(records: list[dict[str, Any]], grid: ChipGrid, meta: dict[str, Any],
                        path: Path) -> None:
    """A single-band float32 COG of intensity, one pixel per chip, in the grid's CRS."""
    raster = chip_raster(records, grid, "intensity")
    profile = dict(
        driver="COG", width=grid.n_cols, height=grid.n_rows, count=1, dtype="float32",
        crs=grid.crs, transform=chip_grid_transform(grid), nodata=NODATA, compress="DEFLATE",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(raster, 1)
        dst.set_band_description(1, "change intensity")
        dst.update_tags(region=meta["region"], mode=meta["mode"], intensity=meta["intensity"],
                        dates=",".join(meta["dates"]), chips_changed=str(meta["chips_changed"]))


def cell_rasters(result: ChangeResult, grid: ChipGrid) -> tuple[np.ndarray, np.ndarray]:
    """(intensity, change day) ``[rows*g cols*g]`` float32 of the cells, chips placed on the
    region's chip grid; ``NODATA`` where a cell was not analysed (intensity) or did not change
    (day: days since 1970-01-01)."""
    cells = result.cells
    if cells is None:
        raise ValueError("cell rasters need a patch-level result")
    g = cells.grid
    intensity = np.full((grid.n_rows * g, grid.n_cols * g), NODATA, np.float32)
    day = np.full_like(intensity, NODATA)
    for i, chip_id in enumerate(result.chip_ids):
        row, col = grid.parse_chip_id(str(chip_id))
        block = (slice(row * g, (row + 1) * g), slice(col * g, (col + 1) * g))
        value = cells.intensity[i].reshape(g, g)
        intensity[block] = np.where(cells.ok[i].reshape(g, g) & np.isfinite(value), value, NODATA)
        when = cells.change_date[i].reshape(g, g)
        day[block] = np.where(np.isnat(when), NODATA, when.astype("datetime64[D]").astype(np.int64))
    return intensity, day


def write_cell_cog(result: ChangeResult, grid: ChipGrid, meta: dict[str, Any], path: Path) -> None:
    """A two-band float32 COG at cell resolution (g x g pixels a chip, ``chip_size / g`` grid
    pixels each) in the grid's CRS: 1 the cell's intensity (z), 2 its change date as days since
    1970-01-01 (no data where the cell did not change)."""
    assert result.cells is not None
    g = result.cells.grid
    intensity, day = cell_rasters(result, grid)
    profile = dict(
        driver="COG", width=grid.n_cols * g, height=grid.n_rows * g, count=2, dtype="float32",
        crs=grid.crs, transform=grid.transform * Affine.scale(grid.chip_size / g), nodata=NODATA,
        compress="DEFLATE",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(intensity, 1)
        dst.write(day, 2)
        dst.set_band_description(1, "cell change intensity (z)")
        dst.set_band_description(2, "cell change date (days since 1970-01-01)")
        dst.update_tags(region=meta["region"], mode=meta["mode"], grid=str(g), intensity=meta["intensity"],
                        dates=",".join(meta["dates"]), chips_changed=str(meta["chips_changed"]))


PLOT_DPI = 90


def map_png(records: list[dict[str, Any]], grid: ChipGrid, meta: dict[str, Any],
            cells: np.ndarray | None = None) -> bytes:
    """The chip grid coloured by intensity (grey: no data) or, given ``cells`` (``[rows*g
    cols*g]``, ``NODATA`` where nothing changed), each chip's changed cells coloured by their
    intensity; changed chips outlined in red and labelled with their change date."""
    raster = chip_raster(records, grid, "intensity")
    g = 1
    if cells is not None:  # where inside each chip: the cells' intensity, changed cells only
        g = cells.shape[0] // max(grid.n_rows, 1)
        raster = cells
    valid = raster != NODATA
    fig = Figure(figsize=(max(4.0, 1.1 * grid.n_cols + 1.5), max(2.5, 1.1 * grid.n_rows + 1.2)))
    ax = fig.add_subplot()
    shown = np.ma.masked_array(raster, ~valid)
    vmax = max(float(np.abs(raster[valid]).max()) if valid.any() else 1.0, 1.0)
    extent = (-0.5, grid.n_cols - 0.5, grid.n_rows - 0.5, -0.5)
    image = ax.imshow(shown, cmap="magma", norm=Normalize(0.0, vmax), interpolation="nearest",
                      extent=extent)
    ax.set_facecolor("#cccccc")
    fig.colorbar(image, ax=ax, label="changed cells: intensity (z)" if g > 1 else "intensity (z)",
                 shrink=0.8)
    for rec in records:
        if rec["changed"]:
            ax.add_patch(Rectangle((rec["col"] - 0.5, rec["row"] - 0.5), 1, 1, fill=False,
                                   edgecolor="red", linewidth=2.5))
            label = rec["change_date"].isoformat() if rec["change_date"] else ""
            ax.text(rec["col"], rec["row"], label, ha="center", va="center", fontsize=7,
                    color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1})
    title = f"{meta['region']}: {meta['chips_changed']} of {meta['chips']} chips changed ({meta['mode']})"
    if meta.get("empty_reason"):
        title = f"{meta['region']}: no change map ({meta['empty_reason']})"
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(grid.n_cols))
    ax.set_yticks(range(grid.n_rows))
    ax.set_xlabel("chip column")
    ax.set_ylabel("chip row")
    return figure_png(fig, PLOT_DPI)


def series_plot_png(result: ChangeResult, i: int) -> bytes:
    """One chip's series: observations (baseline filled, monitoring open), the fitted harmonic,
    the threshold band, the baseline end and the detected change date."""
    curves = result.curves
    if curves is None:
        raise ValueError("series plots need a harmonic result (the bitemporal mode has no series)")
    params = curves.params
    days = result.dates.astype("datetime64[D]")
    grid_days = np.arange(days[0], days[-1] + np.timedelta64(1, "D"), np.timedelta64(5, "D"))
    design = harmonic_design(grid_days.astype(np.int64).astype(np.float64), curves.origin, params)
    fitted = design @ curves.coef[i]  # [G]
    band = params.threshold * curves.sigma[i]
    valid = curves.valid[i]
    base = valid & (days <= np.datetime64(result.baseline_end))
    mon = valid & ~base
    fig = Figure(figsize=(7.0, 3.0))
    ax = fig.add_subplot()
    when = grid_days.astype("datetime64[D]").astype(dt.date)
    ax.fill_between(when, fitted - band, fitted + band, color="tab:blue", alpha=0.15,
                    label=f"fit ± {params.threshold:g} σ")
    ax.plot(when, fitted, color="tab:blue", linewidth=1.2, label="harmonic fit")
    as_dates = days.astype(dt.date)
    ax.plot(as_dates[base], curves.values[i][base], "o", color="tab:blue", markersize=4, label="baseline")
    over = mon & (np.nan_to_num(curves.score[i], nan=-np.inf) > params.threshold)
    ax.plot(as_dates[mon & ~over], curves.values[i][mon & ~over], "o", mfc="none", color="tab:gray",
            markersize=4, label="monitoring")
    ax.plot(as_dates[over], curves.values[i][over], "o", color="tab:red", markersize=4,
            label="over threshold")
    if result.baseline_end is not None:
        ax.axvline(float(date2num(result.baseline_end)), color="black", linestyle=":", linewidth=1)
    if result.changed[i]:
        change = result.change_date[i].astype("datetime64[D]").item()
        ax.axvline(float(date2num(change)), color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"change {change}")
    verdict = "changed" if result.changed[i] else "no confirmed change"
    ax.set_title(f"{result.chip_ids[i]}: {verdict}, intensity {result.intensity[i]:.1f}", fontsize=9)
    ax.set_ylabel(curves.label, fontsize=7)
    ax.legend(fontsize=6, loc="upper left", ncol=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return figure_png(fig, PLOT_DPI)


def score_plot_png(result: ChangeResult, top: np.ndarray) -> bytes:
    """Bitemporal: every chip's score, sorted, with the threshold; the strongest labelled."""
    ok = np.isfinite(result.intensity)
    order = np.argsort(-np.where(ok, result.intensity, -np.inf))[: int(ok.sum())]
    fig = Figure(figsize=(7.0, 3.0))
    ax = fig.add_subplot()
    ax.bar(range(len(order)), result.intensity[order],
           color=["tab:red" if result.changed[j] else "tab:gray" for j in order])
    ax.axhline(result.params["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
    for rank, j in enumerate(order):
        if j in set(top.tolist()):
            ax.text(rank, result.intensity[j], str(result.chip_ids[j]), rotation=90, fontsize=6,
                    ha="center", va="bottom")
    ax.set_ylabel("robust z")
    ax.set_title(f"{result.region}: {result.params['before']} -> {result.params['after']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig, PLOT_DPI)


@dataclass(frozen=True)
class ChangeOutputs:
    table: pa.Table
    summary: dict[str, Any]
    map_png: bytes
    plots: dict[str, bytes]  # chip id (or "scores") -> PNG


def write_change_outputs(
    result: ChangeResult, grid: ChipGrid, out_dir: Path, top_n: int = 3
) -> ChangeOutputs:
    """Write the table, GeoJSON, COG, PNG map and up to ``top_n`` plots into ``out_dir``."""
    records = change_records(result, grid)
    table = pa.Table.from_pylist(records, schema=CHANGE_SCHEMA)
    meta = summary(result)
    write_geoparquet(table, out_dir / CHANGE_TABLE, extra_metadata={"geofm": meta})
    write_geojson(records, meta, out_dir / CHANGE_GEOJSON)
    write_intensity_cog(records, grid, meta, out_dir / CHANGE_COG)
    cell_map = None
    if result.cells is not None:
        write_cell_cog(result, grid, meta, out_dir / CELL_COG)
        intensity, day = cell_rasters(result, grid)
        cell_map = np.where(day != NODATA, intensity, NODATA)  # changed cells only
    png = map_png(records, grid, meta, cell_map)
    (out_dir / CHANGE_PNG).write_bytes(png)
    plots: dict[str, bytes] = {}
    top = result.strongest(top_n, fill=True)
    if result.curves is not None:
        plots = {str(result.chip_ids[i]): series_plot_png(result, int(i)) for i in top}
    elif result.mode == "bitemporal" and np.isfinite(result.intensity).any():
        plots = {"scores": score_plot_png(result, top)}
    if plots:
        (out_dir / PLOTS_DIR).mkdir()
        for name, data in plots.items():
            (out_dir / PLOTS_DIR / f"{name}.png").write_bytes(data)
    return ChangeOutputs(table, meta, png, plots)
