"""sentinel2_tiles + chips materialized for real partitions of the tiny sample."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import duckdb
import netCDF4
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from dagster import DagsterInstance, materialize

from geofm_assets.assets.chips import chips
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.bands import SCL_CLOUD_CLASSES, SCL_SHADOW_CLASSES
from geofm_assets.geo.regions import ChipGrid, load_regions
from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key

REGIONS = load_regions()


def run(instance, resources, date, region, **kwargs):
    return materialize(
        [sentinel2_tiles, chips], instance=instance, resources=resources,
        partition_key=str(partition_key(date, region)), **kwargs,
    )


def failure_text(result) -> str:
    """The step failure's message and the messages of its causes, as the UI shows them."""
    error = result.get_step_failure_events()[0].event_specific_data.error
    parts = []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


def check_results(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def chips_metadata(result) -> dict[str, object]:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.to_user_string() == "chips":
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    raise AssertionError("no chips materialization")


def clear_dates(sample) -> list[dt.date]:
    """Dates whose items are not overcast."""
    import pystac

    cat = pystac.Catalog.from_file(str(sample.catalog_path))
    cover: dict[dt.date, float] = {}
    for item in cat.get_items(recursive=True):
        d = item.datetime.date()
        cover[d] = max(cover.get(d, 0.0), item.properties["eo:cloud_cover"])
    return sorted(d for d, c in cover.items() if c < 50)


def test_tiles_and_chips_for_a_partition_spanning_two_mgrs_tiles(tiny_sample, instance, resources):
    date = clear_dates(tiny_sample)[0]
    result = run(instance, resources, date, "jamari")
    assert result.success
    assert all(check_results(result).values()), check_results(result)

    grid = ChipGrid.for_region(REGIONS["jamari"])
    lake = Path(resources["lake"].root)
    tiles_dir = lake / "sentinel2_tiles" / "region=jamari" / f"date={date}"
    manifest = json.loads((tiles_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert {s["mgrs_tile"] for s in manifest["scenes"]} == {"20LMQ", "20LNQ"}
    with rasterio.open(tiles_dir / "mosaic.tif") as ds:
        assert ds.count == 11 and ds.crs.to_epsg() == 32720
        assert (ds.width, ds.height) == (grid.width, grid.height)
        assert ds.overviews(1)
        assert ds.descriptions[-1] == "scl"
        mosaic = ds.read()
    # both tiles contribute, and the seam leaves no gap
    assert (mosaic[:10] > 0).all()

    md = chips_metadata(result)
    table = pq.read_table(lake / "chips" / "region=jamari" / f"date={date}" / "chips.parquet")
    assert md["chips_kept"] == table.num_rows
    assert md["chips_kept"] + md["chips_dropped"] == len(grid.cells)
    assert json.loads(table.schema.metadata[b"geo"])["primary_column"] == "geometry"
    # every datacube went through the partition's template (geo.datacube), none through netCDF4
    assert md["datacube_writer"] == "template"

    # geometry: each chip touches the region, and the kept chips lie inside the grid's
    # footprint; centroid columns agree with the geometry
    region_geom = REGIONS["jamari"].geometry
    for rec in table.to_pylist():
        footprint = shapely.from_wkb(rec["geometry"])
        assert footprint.intersects(region_geom)
        assert footprint.centroid.distance(shapely.Point(rec["centroid_lon"], rec["centroid_lat"])) < 1e-9

    # cloud and shadow fractions match the SCL written in each datacube
    for rec in table.to_pylist():
        with netCDF4.Dataset(lake / rec["datacube_path"]) as nc:
            scl = np.asarray(nc["scl"][:])
            assert list(nc["band"][:]) == ["blue", "green", "red", "rededge1", "rededge2",
                                           "rededge3", "nir", "nir08", "swir16", "swir22"]
            assert nc["reflectance"].shape == (10, 256, 256)
            x = np.asarray(nc["x"][:])
            assert x[0] == rec["x_min"] + 5
        valid = scl != 0
        cloud = np.isin(scl[valid], SCL_CLOUD_CLASSES).mean()
        shadow = np.isin(scl[valid], SCL_SHADOW_CLASSES).mean()
        assert rec["cloud_fraction"] == pytest.approx(cloud, abs=1e-6)
        assert rec["shadow_fraction"] == pytest.approx(shadow, abs=1e-6)
        assert (lake / rec["thumbnail_path"]).stat().st_size > 0

    # DuckDB reads the hive layout directly
    rows = duckdb.sql(
        f"SELECT region, date, count(*) AS n FROM '{lake}/chips/region=*/date=*/*.parquet' GROUP BY ALL"
    ).fetchall()
    assert rows == [("jamari", date, table.num_rows)]


def test_chip_ids_and_geometries_are_stable_across_dates(tiny_sample, instance, resources):
    dates = clear_dates(tiny_sample)[:2]
    tables = []
    for date in dates:
        assert run(instance, resources, date, "candeias").success
        path = Path(resources["lake"].root) / "chips" / "region=candeias" / f"date={date}" / "chips.parquet"
        tables.append({r["chip_id"]: r for r in pq.read_table(path).to_pylist()})
    common = set(tables[0]) & set(tables[1])
    assert common, "the two clear dates share no kept chip"
    for chip_id in common:
        a, b = tables[0][chip_id], tables[1][chip_id]
        assert a["geometry"] == b["geometry"]
        assert (a["x_min"], a["y_max"]) == (b["x_min"], b["y_max"])


def test_overcast_date_keeps_no_chip_and_counts_the_reason(tiny_sample, instance, resources):
    import pystac

    cat = pystac.Catalog.from_file(str(tiny_sample.catalog_path))
    overcast = next(i.datetime.date() for i in cat.get_items(recursive=True)
                    if i.properties["eo:cloud_cover"] > 95)
    result = run(instance, resources, overcast, "jamari")
    assert result.success
    md = chips_metadata(result)
    assert md["chips_kept"] == 0
    assert md["dropped_cloud"] >= 1
    assert md["status"] == "all_dropped"
    assert "datacube_writer" not in md  # no datacube was written


def test_date_without_scene_gives_an_empty_labelled_partition(tiny_sample, instance, resources):
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, ["2019-01-01"])
    result = run(instance, resources, "2019-01-01", "jamari")
    assert result.success
    md = chips_metadata(result)
    assert md["status"] == "no_scene" and md["chips_kept"] == 0
    lake = Path(resources["lake"].root)
    manifest = json.loads((lake / "sentinel2_tiles/region=jamari/date=2019-01-01/manifest.json").read_text())
    assert manifest["status"] == "no_scene"
    assert pq.read_table(lake / "chips/region=jamari/date=2019-01-01/chips.parquet").num_rows == 0


def test_unregistered_date_and_unknown_region_are_refused(tiny_sample, resources):
    from dagster._core.errors import DagsterError

    instance = DagsterInstance.ephemeral()
    with pytest.raises((DagsterError, ValueError), match="2021-06-01"):
        run(instance, resources, "2021-06-01", "jamari")
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, ["2021-06-01"])
    with pytest.raises((DagsterError, ValueError), match="atlantis"):
        run(instance, resources, "2021-06-01", "atlantis")


def test_truncated_cog_fails_clearly_and_keeps_the_previous_partition(
    tiny_sample, instance, resources, tmp_path
):
    from geofm_assets.resources.stac import StacResource

    sample = tmp_path / "sample"
    shutil.copytree(tiny_sample.root, sample)
    date = clear_dates(tiny_sample)[0]
    res = {**resources, "stac": StacResource(catalog=str(sample / "catalog.json"))}
    assert run(instance, res, date, "candeias").success
    lake = Path(res["lake"].root)
    before = sorted(p.name for p in (lake / f"chips/region=candeias/date={date}/datacubes").iterdir())

    cog = next(sample.glob(f"sentinel-s2-l2a-cogs/20/L/MQ/*/*/*_20LMQ_{date:%Y%m%d}_*/B04.tif"))
    data = cog.read_bytes()
    cog.write_bytes(data[: len(data) // 3])
    result = run(instance, res, date, "candeias", raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert "B04.tif" in message and "truncated" in message
    after = sorted(p.name for p in (lake / f"chips/region=candeias/date={date}/datacubes").iterdir())
    assert after == before
    assert not list((lake / "sentinel2_tiles/region=candeias").glob(".staging-*"))


@pytest.mark.parametrize("defect", ["missing_band", "no_projection"])
def test_malformed_items_fail_with_the_item_and_what_is_missing(
    tiny_sample, instance, resources, tmp_path, defect
):
    from geofm_assets.resources.stac import StacResource

    sample = tmp_path / "sample"
    shutil.copytree(tiny_sample.root, sample)
    date = clear_dates(tiny_sample)[0]
    item_path = next(sample.glob(f"sentinel-2-l2a/*_20LMQ_{date:%Y%m%d}_*/*.json"))
    item = json.loads(item_path.read_text())
    if defect == "missing_band":
        del item["assets"]["swir16"]
        expected = "missing band asset.*swir16"
    else:
        for key in ("proj:epsg", "proj:code"):
            item["properties"].pop(key, None)
        for asset in item["assets"].values():
            for key in ("proj:epsg", "proj:code", "proj:transform", "proj:shape"):
                asset.pop(key, None)
        expected = "no projection information"
    item_path.write_text(json.dumps(item))
    res = {**resources, "stac": StacResource(catalog=str(sample / "catalog.json"))}
    result = run(instance, res, date, "candeias", raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert item["id"] in message
    import re

    assert re.search(expected, message), message
