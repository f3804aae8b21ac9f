"""The region mosaic is a COG, written uncompressed in one pass or compressed by GDAL."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio

from geofm_assets.geo.cog import cog_layout_problems
from geofm_assets.geo.mosaic import write_region_mosaic
from geofm_assets.geo.quality import check_mosaic_cog
from geofm_assets.geo.regions import ChipGrid, load_regions
from geofm_assets.geo.sample_data import write_scene
from geofm_assets.geo.scenes import scene_from_item


def test_uncompressed_and_zstd_region_cogs_hold_the_same_pixels(tmp_path):
    grid = ChipGrid.for_region(load_regions()["candeias"])
    scene = scene_from_item(write_scene(tmp_path / "scene", "20LMQ", dt.date(2021, 6, 1), seed=0))
    plain = write_region_mosaic([scene], grid, tmp_path / "plain.tif")
    packed = write_region_mosaic([scene], grid, tmp_path / "zstd.tif", compress="zstd")
    assert plain.valid_fraction == packed.valid_fraction > 0.9
    for summary in (plain, packed):
        assert cog_layout_problems(summary.path) == []
        passed, details = check_mosaic_cog(summary.path, grid)
        assert passed, details
    with rasterio.open(plain.path) as a, rasterio.open(packed.path) as b:
        assert a.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION") is None
        assert b.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"
        assert a.descriptions == b.descriptions and a.descriptions[-1] == "scl"
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.overviews(1) == b.overviews(1) == [2, 4]
        np.testing.assert_array_equal(a.read(out_shape=(11, 256, 384)), b.read(out_shape=(11, 256, 384)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.tif", "scene", "zstd.tif"]


def test_unknown_compression_is_refused_before_any_read(tmp_path):
    grid = ChipGrid.for_region(load_regions()["candeias"])
    scene = scene_from_item(write_scene(tmp_path / "scene", "20LMQ", dt.date(2021, 6, 1), seed=0))
    with pytest.raises(ValueError, match="compression 'LZ4' is not supported: use one of NONE, ZSTD"):
        write_region_mosaic([scene], grid, tmp_path / "out.tif", compress="lz4")
    assert not (tmp_path / "out.tif").exists()


def test_reader_threads_outlive_a_mosaic_and_forked_children_start_without_them(tmp_path):
    # A thread's exit tears down GDAL's and PROJ's per-thread state after join() returns; a
    # chipping pool forked in that window inherited PROJ's SQLite mutex locked and hung.
    # The reader threads therefore stay, idle, between mosaics.
    import os
    import threading

    from geofm_assets.geo import mosaic

    grid = ChipGrid.for_region(load_regions()["candeias"])
    scene = scene_from_item(write_scene(tmp_path / "scene", "20LMQ", dt.date(2021, 6, 1), seed=0))
    readers = []
    for name in ("a.tif", "b.tif"):
        write_region_mosaic([scene], grid, tmp_path / name, threads=2)
        readers.append({t.ident for t in threading.enumerate() if t.name.startswith("geofm-read")})
    assert readers[0] and readers[0] == readers[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports how many reader pools it sees, then leaves at once
        os.write(w, str(len(mosaic._READ_POOLS)).encode())
        os._exit(0)
    os.close(w)
    assert os.read(r, 16) == b"0" and mosaic._READ_POOLS
    os.waitpid(pid, 0)
    os.close(r)
