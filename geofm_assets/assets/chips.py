"""``chips``: 256 x 256 chips of the region mosaic on the region's fixed grid."""

import datetime as dt
from typing import Any

import pyarrow as pa
import shapely
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from pydantic import Field

from geofm_assets.assets.tiles import md_image, read_tiles_manifest, sentinel2_tiles
from geofm_assets.geo.chipping import DROP_REASONS, ChippingResult, ChipThresholds, chip_region_mosaic
from geofm_assets.geo.geoparquet import write_geoparquet
from geofm_assets.geo.previews import contact_sheet
from geofm_assets.geo.quality import (
    check_chips_on_grid,
    check_datacubes_readable,
    check_reflectance_range,
)
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.lake import CHIPS_TABLE
from geofm_assets.partitions import ONE_PARTITION_PER_RUN, region_and_date, region_date_partitions
from geofm_assets.resources.lake import LakeResource

CHIPS_SCHEMA = pa.schema(
    [
        ("chip_id", pa.string()),
        ("region", pa.string()),
        ("date", pa.date32()),
        ("datetime", pa.timestamp("us", tz="UTC")),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("geometry", pa.binary()),
        ("centroid_lon", pa.float64()),
        ("centroid_lat", pa.float64()),
        ("epsg", pa.int32()),
        ("x_min", pa.float64()),
        ("y_min", pa.float64()),
        ("x_max", pa.float64()),
        ("y_max", pa.float64()),
        ("cloud_fraction", pa.float32()),
        ("shadow_fraction", pa.float32()),
        ("nodata_fraction", pa.float32()),
        ("band_means", pa.list_(pa.float32())),
        ("datacube_path", pa.string()),
        ("thumbnail_path", pa.string()),
        ("scene_ids", pa.list_(pa.string())),
    ]
)


class ChipsConfig(Config):
    max_cloud_fraction: float = Field(default=0.10, description="drop chips with more cloud (SCL 8, 9, 10)")
    max_shadow_fraction: float = Field(default=0.10, description="drop chips with more cloud shadow (SCL 3)")
    max_nodata_fraction: float = Field(default=0.05, description="drop chips with more pixels without data")
    compress_datacubes: bool = Field(
        default=False, description="zlib-compress NetCDF datacubes (about 3x smaller, about 5x slower)"
    )
    workers: int = Field(default=0, description="processes for chipping; 0 = one per core")


def chips_table(
    result: ChippingResult,
    grid: ChipGrid,
    date: dt.date,
    acquired: dt.datetime | None,
    scene_ids: list[str],
    prefix: str,
) -> pa.Table:
    """One row per kept chip; paths are relative to the lake root (``prefix`` is the
    partition's folder relative to it). ``acquired``: the scenes' acquisition time (UTC)."""
    rows = []
    for rec in result.kept:
        footprint = grid.chip_polygon_lonlat(rec.row, rec.col)
        centroid = footprint.centroid
        minx, miny, maxx, maxy = grid.chip_bounds(rec.row, rec.col)
        rows.append(
            {
                "chip_id": rec.chip_id, "region": grid.region, "date": date, "datetime": acquired,
                "row": rec.row, "col": rec.col, "geometry": shapely.to_wkb(footprint),
                "centroid_lon": centroid.x, "centroid_lat": centroid.y, "epsg": grid.epsg,
                "x_min": minx, "y_min": miny, "x_max": maxx, "y_max": maxy,
                "cloud_fraction": rec.cloud_fraction, "shadow_fraction": rec.shadow_fraction,
                "nodata_fraction": rec.nodata_fraction, "band_means": rec.band_means,
                "datacube_path": f"{prefix}/{rec.datacube_path}",
                "thumbnail_path": f"{prefix}/{rec.thumbnail_path}",
                "scene_ids": scene_ids,
            }
        )
    return pa.Table.from_pylist(rows, schema=CHIPS_SCHEMA)


@asset(
    partitions_def=region_date_partitions,
    backfill_policy=ONE_PARTITION_PER_RUN,
    deps=[sentinel2_tiles],
    group_name="ingest",
    kinds={"netcdf", "geoparquet"},
    description=(
        "256x256 chips on a grid anchored to the region's origin (a chip id names the same "
        "ground on every date). Chips with too much cloud, shadow or missing data (from SCL) "
        "are dropped and counted; each kept chip has a NetCDF datacube and an RGB thumbnail, "
        "and a row in the partition's GeoParquet table."
    ),
    check_specs=[
        AssetCheckSpec("datacubes_finite", asset="chips",
                       description="every kept chip's datacube reads back, no NaN/inf"),
        AssetCheckSpec("reflectance_plausible", asset="chips",
                       description="per-chip band means are surface reflectance x 10000"),
        AssetCheckSpec("chip_ids_on_grid", asset="chips",
                       description="ids, bounds and footprints match the region's chip grid"),
    ],
)
def chips(context: AssetExecutionContext, config: ChipsConfig, lake: LakeResource) -> MaterializeResult:
    region, date = region_and_date(context)
    grid = ChipGrid.for_region(region)
    tiles_dir, manifest = read_tiles_manifest(lake, region.name, date.isoformat())
    scene_ids = [s["id"] for s in manifest["scenes"]]
    thresholds = ChipThresholds(
        config.max_cloud_fraction, config.max_shadow_fraction, config.max_nodata_fraction
    )
    prefix = f"chips/region={region.name}/date={date.isoformat()}"
    result = ChippingResult()
    with lake.write_partition("chips", region.name, date.isoformat()) as staging:
        if manifest["status"] == "ok":
            result = chip_region_mosaic(
                tiles_dir / manifest["mosaic"], grid, date, scene_ids, staging, thresholds,
                workers=config.workers or None, compress=config.compress_datacubes,
            )
        acquired = min(
            (dt.datetime.fromisoformat(s["datetime"]) for s in manifest["scenes"]), default=None
        )
        table = chips_table(result, grid, date, acquired, scene_ids, prefix)
        status = manifest["status"] if manifest["status"] != "ok" else (
            "ok" if result.kept else "all_dropped"
        )
        write_geoparquet(
            table, staging / CHIPS_TABLE,
            extra_metadata={"geofm": {
                "status": status, "region": region.name, "date": date.isoformat(),
                "grid": grid.to_dict(), "thresholds": thresholds.__dict__,
                "dropped": result.dropped, "scene_ids": scene_ids,
            }},
        )
    partition_dir = lake.partition_dir("chips", region.name, date.isoformat())
    counts = result.dropped_counts
    metadata: dict[str, Any] = {
        "status": status,
        "dagster/row_count": table.num_rows,
        "chips_kept": table.num_rows,
        "chips_dropped": sum(counts.values()),
        **{f"dropped_{r}": counts[r] for r in DROP_REASONS},
        "grid_chips": len(grid.cells),
        "scene_ids": MetadataValue.json(scene_ids),
        "table": MetadataValue.path(str(partition_dir / CHIPS_TABLE)),
        "dagster/column_schema": TableSchema(
            columns=[TableColumn(f.name, str(f.type)) for f in CHIPS_SCHEMA]
        ),
    }
    if result.datacube_writers:
        metadata["datacube_writer"] = ", ".join(sorted(result.datacube_writers))
    for reason in sorted(result.template_fallbacks):
        # correct files either way, but each took ~8x longer to write
        context.log.warning(
            f"datacubes of {region.name} {date} written through netCDF4, not a template: {reason}"
        )
    if status == "no_scene":
        context.log.warning(f"no scene over {region.name} on {date}: empty chips table")
    sheet = contact_sheet(
        [lake.local_path(p) for p in table.column("thumbnail_path").to_pylist()]
    )
    if sheet is not None:
        metadata["preview"] = md_image(sheet, f"chips {region.name} {date}")
    lake_root = lake.local_path()
    checks = []
    for name, (passed, details) in (
        ("datacubes_finite", check_datacubes_readable(lake_root, table)),
        ("reflectance_plausible", check_reflectance_range(table)),
        ("chip_ids_on_grid", check_chips_on_grid(table, grid)),
    ):
        checks.append(AssetCheckResult(check_name=name, passed=passed, metadata={"details": details}))
    return MaterializeResult(metadata=metadata, check_results=checks)
