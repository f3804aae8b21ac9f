"""``change_maps``: per-chip change over all dates of a region (harmonic regression, or two
dates), detected by default on a 16 x 16 grid of cells inside each chip (the embeddings'
spatial features) and aggregated per chip, as a table, a GeoJSON grid, an intensity COG, a
cell-resolution COG, a PNG map and time-series plots."""

import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from pydantic import Field

from geofm_assets.analysis.change import (
    STATUS_INSUFFICIENT,
    STATUS_OK,
    BitemporalParams,
    ChangeConfigError,
    ChangeParams,
    ChangeResult,
    detect_bitemporal,
    detect_harmonic,
    empty_result,
)
from geofm_assets.analysis.change_outputs import (
    CELL_COG,
    CHANGE_COG,
    CHANGE_GEOJSON,
    CHANGE_PNG,
    CHANGE_SCHEMA,
    CHANGE_TABLE,
    write_change_outputs,
)
from geofm_assets.analysis.series import (
    SPATIAL_FILE,
    SPATIAL_VALID_FILE,
    RegionSeries,
    RegionSpatial,
    load_region_series,
    load_region_spatial,
)
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.tiles import md_image, png_markdown
from geofm_assets.automation import follows_new_dates_of_region
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.lake import EMBEDDINGS_TABLE, checked_date
from geofm_assets.partitions import all_dates_of_region, region_of, region_partitions
from geofm_assets.resources.lake import LakeResource

MODES = ("auto", "harmonic", "bitemporal")


class ChangeMapsConfig(Config):
    mode: str = Field(
        default="auto",
        description="auto: bitemporal when the region has exactly two dates, else harmonic; "
        "harmonic; or bitemporal (with before/after, or a region of two dates)",
    )
    series: str = Field(
        default="patch_distance",
        description="patch_distance: per cell of the chip (spatial features), aggregated per chip; "
        "baseline_distance or pca: the chip's embedding",
    )
    min_clear: float = Field(default=0.9, description="patch: a cell counts on a date when this "
                             "fraction of its pixels is clear (SCL)")
    min_cells: int = Field(default=2, description="patch: confirmed cells that make a chip changed")
    persistence: float = Field(default=0.5, description="of the observations after a confirmed run, "
                               "the fraction that must stay over the threshold (0: off)")
    n_components: int = Field(default=3, description="principal components (series pca)")
    baseline_days: int = Field(default=365, description="baseline: the first date + this many days")
    baseline_end: str | None = Field(default=None, description="last baseline date (YYYY-MM-DD)")
    harmonics: int = Field(default=2, description="1: annual; 2: annual + semi-annual")
    trend: bool = Field(default=False, description="add a linear trend to the harmonic model")
    threshold: float = Field(default=3.0, description="standardized residual (z) to exceed")
    consecutive: int = Field(default=3, description="consecutive valid observations to confirm")
    margin: int = Field(default=2, description="baseline observations needed beyond the parameters")
    before: str | None = Field(default=None, description="bitemporal: the earlier date")
    after: str | None = Field(default=None, description="bitemporal: the later date")
    top_n: int = Field(default=4, description="time-series plots of the strongest changes")

    def harmonic_params(self) -> ChangeParams:
        return ChangeParams(
            series=self.series, n_components=self.n_components, baseline_days=self.baseline_days,
            baseline_end=checked_date(self.baseline_end) if self.baseline_end else None,
            harmonics=self.harmonics, trend=self.trend, threshold=self.threshold,
            consecutive=self.consecutive, margin=self.margin, min_clear=self.min_clear,
            min_cells=self.min_cells, persistence=self.persistence,
        )

    def bitemporal_params(self) -> BitemporalParams:
        return BitemporalParams(threshold=self.threshold, patch=self.series == "patch_distance",
                                min_clear=self.min_clear, min_cells=self.min_cells)


def run_change(series: RegionSeries, config: ChangeMapsConfig, spatial: RegionSpatial | None = None
               ) -> ChangeResult:
    """Pick the mode from the config and the region's dates, and run it."""
    if config.mode not in MODES:
        raise ChangeConfigError(
            f"change_maps mode {config.mode!r} is unknown: choose one of {', '.join(MODES)}"
        )
    params = config.harmonic_params()
    if series.n_dates < 2:
        reason = (f"the region has {series.n_dates} date(s) with embeddings; a change map needs "
                  "at least two")
        return empty_result(series, reason, "empty", {"mode": config.mode})
    pair = (config.before, config.after)
    if config.mode == "bitemporal" or (config.mode == "auto" and (series.n_dates == 2 or any(pair))):
        if all(pair):
            before, after = checked_date(str(config.before)), checked_date(str(config.after))
        elif not any(pair) and series.n_dates == 2:
            before, after = (d.item() for d in series.dates.astype("datetime64[D]"))
        else:
            raise ChangeConfigError(
                f"bitemporal change over {series.region!r} needs both `before` and `after` "
                f"(the region has {series.n_dates} dates: {series.dates[0]} .. {series.dates[-1]})"
            )
        return detect_bitemporal(series, before, after, config.bitemporal_params(), spatial)
    return detect_harmonic(series, params, spatial)


def images_md(pngs: dict[str, bytes]) -> MetadataValue:
    return MetadataValue.md("\n\n".join(
        f"**{name}**\n\n{png_markdown(png, name)}"
        for name, png in pngs.items()
    ))


def table_checks(path: Path, expected_chips: int) -> list[AssetCheckResult]:
    table = pq.read_table(path)
    rows = table.to_pylist()
    statuses = [r["status"] for r in rows]
    bad_status = [r["chip_id"] for r in rows if r["status"] not in (STATUS_OK, STATUS_INSUFFICIENT)]
    nan_cells = [
        (r["chip_id"], k) for r in rows for k, v in r.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    undated = [r["chip_id"] for r in rows
               if r["changed"] and (r["change_date"] is None or r["status"] != STATUS_OK)]
    unscored = [r["chip_id"] for r in rows if r["status"] == STATUS_OK and r["intensity"] is None]
    return [
        AssetCheckResult(
            check_name="every_chip_has_status",
            passed=not bad_status and len(rows) == expected_chips,
            metadata={"rows": len(rows), "chips_in_series": expected_chips,
                      "ok": statuses.count(STATUS_OK),
                      "insufficient_data": statuses.count(STATUS_INSUFFICIENT),
                      "bad_status": bad_status[:20]},
        ),
        AssetCheckResult(
            check_name="no_nan_in_table", passed=not nan_cells,
            metadata={"nan_cells": [f"{c}.{k}" for c, k in nan_cells[:20]]},
        ),
        AssetCheckResult(
            check_name="changes_are_dated_and_scored", passed=not undated and not unscored,
            metadata={"changed_without_date": undated[:20], "ok_without_intensity": unscored[:20]},
        ),
    ]


@asset(
    partitions_def=region_partitions,
    deps=[AssetDep(embeddings, partition_mapping=all_dates_of_region)],
    automation_condition=follows_new_dates_of_region(),
    group_name="analysis",
    kinds={"geoparquet", "geojson", "cog"},
    description=(
        "Per-chip change over all dates of the region. Harmonic mode (CCDC-like): a harmonic "
        "regression (annual + semi-annual) fitted on the baseline period to each cell's cosine "
        "distance to its baseline-mean features (16 x 16 cells of 2.56 ha a chip, from the "
        "embeddings' spatial features; cloudy cells are missing observations), residuals over the "
        "monitoring period standardized by the baseline RMSE; a cell changes after k consecutive "
        "observations over the threshold that last, a chip when min_cells cells do, dated at the "
        "earliest. Two dates: a before/after cell score normalized against the region's cells. "
        "Outputs: a table (`geofm sql`: view change_maps), a GeoJSON grid, an intensity COG, a "
        "cell COG (where in each chip), a PNG map and plots."
    ),
    check_specs=[
        AssetCheckSpec("every_chip_has_status", asset="change_maps",
                       description="one row per chip of the region's series, each ok or insufficient_data"),
        AssetCheckSpec("no_nan_in_table", asset="change_maps",
                       description="no NaN anywhere in the table (missing values are nulls)"),
        AssetCheckSpec("changes_are_dated_and_scored", asset="change_maps",
                       description="every changed chip has a change date; every ok chip an intensity"),
    ],
)
def change_maps(
    context: AssetExecutionContext, config: ChangeMapsConfig, lake: LakeResource
) -> MaterializeResult:
    region = region_of(context)
    grid = ChipGrid.for_region(region)
    patch = config.series == "patch_distance"
    # the embeddings tables, and the cell features when the series is per cell
    needed = [EMBEDDINGS_TABLE, *((SPATIAL_FILE, SPATIAL_VALID_FILE) if patch else ())]
    root = lake.readable_root(["embeddings"], region.name, files={"embeddings": needed})
    series = load_region_series(root, region.name)
    spatial = load_region_spatial(root, region.name) if patch else None
    result = run_change(series, config, spatial)
    with lake.write_region("change_maps", region.name) as staging:
        outputs = write_change_outputs(result, grid, staging, top_n=config.top_n)
    out_dir = lake.region_dir("change_maps", region.name)
    meta = outputs.summary
    metadata: dict[str, Any] = {
        "status": "empty" if result.empty_reason else "ok",
        "mode": result.mode,
        "dagster/row_count": outputs.table.num_rows,
        "chips": result.n_chips,
        "chips_changed": result.n_changed,
        "chips_ok": meta["chips_ok"],
        "chips_insufficient_data": result.n_chips - meta["chips_ok"],
        "dates": len(result.dates),
        "first_date": str(result.dates[0]) if len(result.dates) else "",
        "last_date": str(result.dates[-1]) if len(result.dates) else "",
        "baseline_end": meta["baseline_end"] or "",
        "params": MetadataValue.json(result.params),
        "intensity": result.intensity_definition or "",
        "table": MetadataValue.path(str(out_dir / CHANGE_TABLE)),
        "geojson": MetadataValue.path(str(out_dir / CHANGE_GEOJSON)),
        "cog": MetadataValue.path(str(out_dir / CHANGE_COG)),
        "series": config.series,
        "map": md_image(outputs.map_png, f"change map {region.name}"),
        "dagster/column_schema": TableSchema(
            columns=[TableColumn(f.name, str(f.type)) for f in CHANGE_SCHEMA]
        ),
    }
    if result.cells is not None:
        metadata["cell_cog"] = MetadataValue.path(str(out_dir / CELL_COG))
        metadata["cell_grid"] = result.cells.grid
        metadata["cells_changed"] = int(result.cells.changed.sum())
    if outputs.plots:
        metadata["strongest_changes"] = images_md(outputs.plots)
    changed_dates = sorted({str(d) for d in result.change_date[result.changed]})
    metadata["change_dates"] = MetadataValue.json(changed_dates)
    if result.empty_reason:
        metadata["empty_reason"] = result.empty_reason
        context.log.warning(f"change_maps {region.name}: empty map ({result.empty_reason})")
    context.log.info(
        f"change_maps {region.name} ({result.mode}): {result.n_changed} of {result.n_chips} chips "
        f"changed over {len(result.dates)} dates; map at {out_dir / CHANGE_PNG}"
    )
    checks = table_checks(out_dir / CHANGE_TABLE, result.n_chips)
    return MaterializeResult(metadata=metadata, check_results=checks)
