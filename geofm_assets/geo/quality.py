"""Checks on written partitions (no Dagster imports): each returns (passed, details)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pyarrow as pa
import rasterio
import shapely

from geofm_assets.bands import SPECTRAL_BANDS, TILE_BAND_NAMES
from geofm_assets.geo.cog import cog_layout_problems
from geofm_assets.geo.regions import ChipGrid

CheckOutcome = tuple[bool, dict[str, Any]]
# Surface reflectance x 10000: a chip's band mean outside this is not plausible ground
# (an un-removed +1000 offset on dark forest, saturated or empty data).
PLAUSIBLE_MEAN_DN = (1.0, 10_000.0)


def check_mosaic_cog(path: Path, grid: ChipGrid) -> CheckOutcome:
    with rasterio.open(path) as ds:
        problems = []
        if ds.count != len(TILE_BAND_NAMES):
            problems.append(f"{ds.count} bands, expected {len(TILE_BAND_NAMES)}")
        if ds.crs is None or ds.crs.to_epsg() != grid.epsg:
            problems.append(f"CRS {ds.crs}, expected EPSG:{grid.epsg}")
        if (ds.width, ds.height) != (grid.width, grid.height):
            problems.append(f"size {ds.width}x{ds.height}, expected {grid.width}x{grid.height}")
        if not ds.profile.get("tiled"):
            problems.append("not internally tiled")
        if max(ds.width, ds.height) > 512 and not ds.overviews(1):
            problems.append("no overviews")
        if not ds.transform.almost_equals(grid.transform):
            problems.append(f"transform {tuple(ds.transform)[:6]} is off the region grid")
        layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
    problems += cog_layout_problems(path)
    return not problems, {"problems": problems, "layout": layout}


def check_datacubes_readable(lake_root: Path, table: pa.Table) -> CheckOutcome:
    """Every kept chip's datacube (``datacube_path``, relative to the lake root) opens, has
    every band, and no NaN or infinite value."""
    bad: list[str] = []
    for chip_id, rel in zip(
        table.column("chip_id").to_pylist(), table.column("datacube_path").to_pylist(), strict=True
    ):
        try:
            with netCDF4.Dataset(lake_root / rel) as nc:
                refl = nc.variables["reflectance"]
                refl.set_auto_maskandscale(False)
                values = np.asarray(refl[:], dtype=np.float64)
                coords = np.concatenate([nc.variables["x"][:], nc.variables["y"][:]])
                ok = (
                    values.shape[0] == len(SPECTRAL_BANDS)
                    and np.isfinite(values).all()
                    and np.isfinite(coords).all()
                )
        except (OSError, KeyError):
            ok = False
        if not ok:
            bad.append(chip_id)
    return not bad, {"chips_checked": table.num_rows, "bad_chips": bad[:20], "n_bad": len(bad)}


def check_reflectance_range(table: pa.Table) -> CheckOutcome:
    lo, hi = PLAUSIBLE_MEAN_DN
    means = np.asarray(table.column("band_means").to_pylist(), dtype=np.float64)
    if means.size == 0:
        return True, {"chips_checked": 0}
    bad_rows = np.where(~np.all((means >= lo) & (means <= hi), axis=1))[0]
    ids = table.column("chip_id").to_pylist()
    return len(bad_rows) == 0, {
        "chips_checked": table.num_rows,
        "plausible_band_mean_dn": [lo, hi],
        "bad_chips": [ids[i] for i in bad_rows[:20]],
        "median_band_means": {
            b.name: round(float(v), 1) for b, v in zip(SPECTRAL_BANDS, np.median(means, axis=0), strict=True)
        },
    }


def check_chips_on_grid(table: pa.Table, grid: ChipGrid) -> CheckOutcome:
    """Ids parse to cells of the region's grid, and stored bounds and footprints match them."""
    cells = set(grid.cells)
    bad: list[str] = []
    rows = table.select(["chip_id", "row", "col", "x_min", "y_max", "geometry"]).to_pylist()
    for rec in rows:
        try:
            row, col = grid.parse_chip_id(rec["chip_id"])
        except ValueError:
            bad.append(rec["chip_id"])
            continue
        minx, _, _, maxy = grid.chip_bounds(row, col)
        footprint = grid.chip_polygon_lonlat(row, col)
        stored = shapely.from_wkb(rec["geometry"])
        if (
            (row, col) != (rec["row"], rec["col"])
            or (row, col) not in cells
            or abs(rec["x_min"] - minx) > 1e-6
            or abs(rec["y_max"] - maxy) > 1e-6
            or stored.symmetric_difference(footprint).area > 1e-6 * footprint.area
        ):
            bad.append(rec["chip_id"])
    return not bad, {"chips_checked": len(rows), "off_grid": bad[:20], "n_off_grid": len(bad)}
