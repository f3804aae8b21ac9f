"""change_maps on the tiny sample lake: outputs, checks, the bitemporal and the empty cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from dagster import materialize

from geofm_assets.analysis.change_outputs import (
    CELL_COG,
    CHANGE_COG,
    CHANGE_GEOJSON,
    CHANGE_PNG,
    CHANGE_TABLE,
    NODATA,
)
from geofm_assets.assets.change_maps import change_maps
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.lake import lake_connection
from geofm_assets.partitions import REGIONS
from geofm_assets.resources.lake import LocalLakeResource

pytestmark = pytest.mark.slow  # the session's tiny lake (tiles, chips, embeddings) first


@pytest.fixture
def lake_copy(tiny_lake, tmp_path: Path) -> Path:
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake.root, root)
    return root


def run(root: Path, region: str, instance, config: dict[str, Any] | None = None):
    result = materialize(
        [change_maps], partition_key=region, instance=instance,
        resources={"lake": LocalLakeResource(root=str(root))},
        run_config={"ops": {"change_maps": {"config": config or {}}}},
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"every_chip_has_status": True, "no_nan_in_table": True,
                      "changes_are_dated_and_scored": True}
    (event,) = result.get_asset_materialization_events()
    metadata = event.step_materialization_data.materialization.metadata
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def assert_outputs(root: Path, region: str, rows: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = root / "change_maps" / f"region={region}"
    assert sorted(p.name for p in out.glob("*.parquet")) == [CHANGE_TABLE]  # one table for `geofm sql`
    table = pq.read_table(out / CHANGE_TABLE)
    assert table.num_rows == rows
    doc = json.loads((out / CHANGE_GEOJSON).read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == rows
    grid = ChipGrid.for_region(REGIONS[region])
    with rasterio.open(out / CHANGE_COG) as ds:
        assert ds.driver == "GTiff" and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.crs.to_epsg() == grid.epsg and ds.nodata == NODATA
        assert (ds.width, ds.height) == (grid.n_cols, grid.n_rows)
        assert ds.transform.a == grid.step and (ds.transform.c, ds.transform.f) == (grid.x0, grid.y0)
        raster = ds.read(1)
    assert (out / CHANGE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return table.to_pylist(), {"raster": raster, "doc": doc}


def test_harmonic_map_of_the_tiny_sample(lake_copy: Path, instance):
    # The tiny sample has only two dates in its first year: too few for the default model
    # (5 parameters + margin 2), so every chip is labelled insufficient_data, not NaN.
    md = run(lake_copy, "jamari", instance)
    assert md["mode"] == "harmonic" and md["chips"] == 12 and md["chips_ok"] == 0
    rows, _ = assert_outputs(lake_copy, "jamari", 12)
    assert {r["status"] for r in rows} == {"insufficient_data"}
    assert all("baseline observations" in r["reason"] for r in rows)

    # A mean-only model with a baseline up to mid-2022 fits: every chip gets a status and score.
    config = {"harmonics": 0, "margin": 0, "baseline_end": "2022-06-01", "consecutive": 2}
    md = run(lake_copy, "jamari", instance, config)
    rows, extra = assert_outputs(lake_copy, "jamari", 12)
    ok = [r for r in rows if r["status"] == "ok"]
    assert md["chips_ok"] == len(ok) > 0
    assert all(r["intensity"] is not None and r["n_baseline"] >= 1 for r in ok)
    assert all(r["change_date"] is not None for r in rows if r["changed"])
    grid = ChipGrid.for_region(REGIONS["jamari"])
    for r in ok:
        assert extra["raster"][r["row"], r["col"]] == pytest.approx(r["intensity"], rel=1e-5)
        assert grid.chip_id(r["row"], r["col"]) == r["chip_id"]
    assert "map" in md and md["map"].startswith("![change map jamari](data:image/png;base64,")
    assert "strongest_changes" in md and (lake_copy / "change_maps/region=jamari/plots").is_dir()
    props = extra["doc"]["features"][0]["properties"]
    assert {"chip_id", "status", "changed", "change_date", "intensity", "n_obs"} <= set(props)

    count = lake_connection(lake_copy).execute("SELECT count(*) FROM change_maps").fetchone()
    assert count == (12,)


def test_bitemporal_map_with_before_and_after(lake_copy: Path, instance, tiny_lake):
    before, after = tiny_lake.dates[1], tiny_lake.dates[-1]
    md = run(lake_copy, "candeias", instance, {"mode": "bitemporal", "before": before, "after": after,
                                                "series": "baseline_distance"})  # chip vectors
    assert md["mode"] == "bitemporal" and md["params"]["before"] == before
    rows, _ = assert_outputs(lake_copy, "candeias", md["chips"])
    assert (lake_copy / "change_maps/region=candeias/plots/scores.png").exists()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["n_obs"] == 2 and r["intensity"] is not None for r in ok)
    assert all(r["change_date"].isoformat() == after for r in rows if r["changed"])
    assert abs(float(np.median([r["intensity"] for r in ok]))) < 1e-6  # robust z: median 0


def test_region_with_one_date_gives_an_empty_labelled_map(lake_copy: Path, instance, tiny_lake):
    parts = sorted((lake_copy / "embeddings" / "region=candeias").glob("date=*"))
    for part in parts[1:]:
        shutil.rmtree(part)
    md = run(lake_copy, "candeias", instance)
    assert md["status"] == "empty" and md["chips_changed"] == 0
    assert "1 date(s)" in md["empty_reason"]
    rows, extra = assert_outputs(lake_copy, "candeias", md["chips"])
    assert all(r["status"] == "insufficient_data" and r["reason"] == md["empty_reason"] for r in rows)
    assert (extra["raster"] == NODATA).all()

    shutil.rmtree(parts[0])  # no date at all: an empty table, still labelled
    md = run(lake_copy, "candeias", instance)
    assert md["chips"] == 0 and "0 date(s)" in md["empty_reason"]
    assert_outputs(lake_copy, "candeias", 0)


def test_patch_level_map_writes_a_cell_cog_on_the_chip_grid(lake_copy: Path, instance, tiny_lake):
    config = {"harmonics": 0, "margin": 0, "baseline_end": "2022-06-01", "consecutive": 2}
    md = run(lake_copy, "jamari", instance, config)  # default series: patch_distance
    assert md["series"] == "patch_distance" and md["cell_grid"] == 16
    rows, _ = assert_outputs(lake_copy, "jamari", 12)
    grid = ChipGrid.for_region(REGIONS["jamari"])
    with rasterio.open(lake_copy / "change_maps/region=jamari" / CELL_COG) as ds:
        assert ds.count == 2 and ds.crs.to_epsg() == grid.epsg and ds.nodata == NODATA
        assert (ds.width, ds.height) == (grid.n_cols * 16, grid.n_rows * 16)
        assert ds.transform.a == grid.step / 16 and (ds.transform.c, ds.transform.f) == (grid.x0, grid.y0)
        intensity, day = ds.read(1), ds.read(2)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["changed_cells"] is not None and 0 <= r["changed_fraction"] <= 1 for r in rows)
    for r in rows:  # each chip's 16 x 16 block: analysed cells have an intensity, changed cells a date
        block = (slice(r["row"] * 16, (r["row"] + 1) * 16), slice(r["col"] * 16, (r["col"] + 1) * 16))
        assert int((day[block] != NODATA).sum()) == r["changed_cells"]
        assert (intensity[block] != NODATA).any() == (r["status"] == "ok")
        if r["changed"]:
            first = np.datetime64(int(day[block][day[block] != NODATA].min()), "D")
            assert first == np.datetime64(r["change_date"])
    assert md["cells_changed"] == sum(r["changed_cells"] for r in rows)

    before, after = tiny_lake.dates[1], tiny_lake.dates[-1]
    md = run(lake_copy, "candeias", instance, {"mode": "bitemporal", "before": before, "after": after})
    assert md["mode"] == "bitemporal" and md["cell_grid"] == 16
    rows, _ = assert_outputs(lake_copy, "candeias", md["chips"])
    assert (lake_copy / "change_maps/region=candeias" / CELL_COG).exists()
    assert all(r["changed_cells"] is not None for r in rows)


def test_patch_series_on_embeddings_without_spatial_features_is_explained(lake_copy: Path, instance):
    for path in (lake_copy / "embeddings" / "region=candeias").glob("date=*/spatial.npy"):
        path.unlink()
    result = materialize([change_maps], partition_key="candeias", instance=instance,
                         resources={"lake": LocalLakeResource(root=str(lake_copy))}, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None and "spatial_grid > 0" in str(failure)
    md = run(lake_copy, "candeias", instance, {"series": "baseline_distance"})  # the chip-level series
    assert md["series"] == "baseline_distance" and "cell_cog" not in md
