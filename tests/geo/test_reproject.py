"""A scene delivered in another UTM zone is reprojected onto the region's grid."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject

from geofm_assets.geo.mosaic import write_region_mosaic
from geofm_assets.geo.regions import ChipGrid, load_regions
from geofm_assets.geo.sample_data import write_scene
from geofm_assets.geo.scenes import scene_from_item


def to_zone_21(src_path: str, dst_path: Path, categorical: bool) -> tuple[list[float], list[int]]:
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(
            src.crs, "EPSG:32721", src.width, src.height, *src.bounds, resolution=src.res[0]
        )
        profile = src.profile | {"crs": "EPSG:32721", "transform": transform, "width": width,
                                 "height": height, "driver": "GTiff"}
        with rasterio.open(dst_path, "w", **profile) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1), src_nodata=0, dst_nodata=0,
                      resampling=Resampling.nearest if categorical else Resampling.bilinear)
    return list(transform)[:6], [height, width]


def test_a_tile_in_another_utm_zone_is_warped_onto_the_region_grid(tmp_path):
    region = load_regions()["candeias"]
    grid = ChipGrid.for_region(region)
    item = write_scene(tmp_path / "z20", "20LMQ", dt.date(2021, 6, 1), seed=0, size="tiny")
    moved = copy.deepcopy(item)
    moved.id = item.id + "-z21"
    moved.properties["proj:epsg"] = 32721
    moved.properties["proj:code"] = "EPSG:32721"
    (tmp_path / "z21").mkdir()
    for name, asset in moved.assets.items():
        out = tmp_path / "z21" / Path(asset.href).name
        transform, shape = to_zone_21(item.assets[name].href, out, categorical=name == "scl")
        asset.href = str(out)
        asset.extra_fields.update({"proj:transform": transform, "proj:shape": shape,
                                   "proj:epsg": 32721, "proj:code": "EPSG:32721"})
    native = write_region_mosaic([scene_from_item(item)], grid, tmp_path / "native.tif")
    warped = write_region_mosaic([scene_from_item(moved)], grid, tmp_path / "warped.tif")
    assert warped.valid_fraction > 0.99
    with rasterio.open(native.path) as a, rasterio.open(warped.path) as b:
        assert b.crs.to_epsg() == 32720
        nir_a, nir_b = a.read(7).astype(float), b.read(7).astype(float)
    # two resamplings blur edges, but the same ground comes out in the same place
    assert np.corrcoef(nir_a.ravel(), nir_b.ravel())[0, 1] > 0.9
    assert abs(nir_a.mean() - nir_b.mean()) < 0.02 * nir_a.mean()
