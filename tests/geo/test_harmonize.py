"""A scene before and after processing baseline 04.00 gives the same reflectance."""

from __future__ import annotations

import datetime as dt

import numpy as np
import rasterio

from geofm_assets.geo.mosaic import write_region_mosaic
from geofm_assets.geo.regions import ChipGrid, load_regions
from geofm_assets.geo.sample_data import write_scene
from geofm_assets.geo.scenes import scene_from_item


def test_pre_and_post_04_00_scenes_of_the_same_ground_harmonize_equal(tmp_path):
    date = dt.date(2021, 6, 1)
    region = load_regions()["candeias"]
    grid = ChipGrid.for_region(region)
    mosaics = {}
    raw = {}
    for baseline in ("03.01", "04.00"):
        item = write_scene(tmp_path / baseline, "20LMQ", date, seed=0, size="tiny",
                           processing_baseline=baseline)
        scene = scene_from_item(item)
        assert scene.processing_baseline == baseline
        with rasterio.open(scene.assets["red"].href) as ds:
            raw[baseline] = ds.read(1)
        summary = write_region_mosaic([scene], grid, tmp_path / f"{baseline}.tif")
        with rasterio.open(summary.path) as ds:
            mosaics[baseline] = ds.read()
    valid = raw["03.01"] > 0
    # the archive's DN differ by the offset ...
    assert np.median(raw["04.00"][valid].astype(int) - raw["03.01"][valid]) == 1000
    assert scene_from_item(item).assets["red"].dn_offset == 1000
    # ... and the harmonized mosaics are identical
    np.testing.assert_array_equal(mosaics["03.01"], mosaics["04.00"])
    assert mosaics["03.01"][:10].mean() < 4000  # reflectance x 10000 over forest and pasture
