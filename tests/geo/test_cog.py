"""The one-pass uncompressed COG writer against GDAL's own COG driver, and the layout check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from geofm_assets.geo.cog import CogWriter, cog_layout_problems
from geofm_assets.geo.mosaic import overview_levels

TRANSFORM = from_origin(400_000, 9_000_000, 10, 10)


def write_with_cog_writer(
    path: Path, data: np.ndarray, *, split: int = 256, backwards: bool = False, **kwargs
) -> None:
    """Blocks of one tile row, each row in two blocks (columns before and after ``split``),
    top to bottom or bottom to top."""
    count, height, width = data.shape
    blocks = [(r, 0, split) for r in range(0, height, 256)]
    blocks += [(r, split, width) for r in range(0, height, 256) if split < width]
    with CogWriter(
        path, width=width, height=height, count=count, dtype=data.dtype, epsg=32720,
        transform=TRANSFORM, nodata=0, overviews=overview_levels(width, height, 256), **kwargs,
    ) as w:
        for r, c0, c1 in sorted(blocks, reverse=backwards):
            w.write(r, c0, data[:, r : r + 256, c0:c1].transpose(1, 2, 0))


def write_with_gdal(path: Path, data: np.ndarray, descriptions: list[str]) -> None:
    count, height, width = data.shape
    scratch = path.with_suffix(".scratch.tif")
    levels = overview_levels(width, height, 256)
    with rasterio.open(
        scratch, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
        crs="EPSG:32720", transform=TRANSFORM, nodata=0, tiled=True, blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(data)
        dst.descriptions = descriptions
        dst.build_overviews(levels, Resampling.nearest)
    rasterio.shutil.copy(scratch, path, driver="COG", compress="NONE", blocksize=256,
                         overviews="FORCE_USE_EXISTING")


@pytest.mark.parametrize(("shape", "backwards"), [((3, 520, 600), False), ((11, 768, 1024), True)])
def test_cog_writer_matches_gdal_cog_driver(
    tmp_path: Path, shape: tuple[int, int, int], backwards: bool
) -> None:
    data = np.random.default_rng(0).integers(0, 60_000, shape).astype(np.uint16)
    descriptions = [f"band{i} <&>" for i in range(shape[0])]
    ours, gdal = tmp_path / "ours.tif", tmp_path / "gdal.tif"
    write_with_cog_writer(ours, data, descriptions=descriptions, backwards=backwards)
    write_with_gdal(gdal, data, descriptions)

    with rasterio.open(ours) as a, rasterio.open(gdal) as b:
        np.testing.assert_array_equal(a.read(), data)
        assert a.profile == b.profile  # tiling, dtype, CRS, transform, nodata, interleave
        assert a.crs.to_epsg() == 32720
        assert a.descriptions == b.descriptions == tuple(descriptions)
        assert a.tags(ns="IMAGE_STRUCTURE") == b.tags(ns="IMAGE_STRUCTURE")
        assert a.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert a.overviews(1) == b.overviews(1) == overview_levels(shape[2], shape[1], 256) != []
    for level in range(len(overview_levels(shape[2], shape[1], 256))):
        with (rasterio.open(ours, overview_level=level) as a,
              rasterio.open(gdal, overview_level=level) as b):
            np.testing.assert_array_equal(a.read(), b.read())
    assert cog_layout_problems(ours) == []
    assert cog_layout_problems(gdal) == []
    assert_leaders_and_trailers(ours)


def assert_leaders_and_trailers(path: Path) -> None:
    """Every tile is preceded by its size (uint32) and followed by its last 4 bytes, as the
    layout header declares."""
    raw = path.read_bytes()
    with rasterio.open(path) as ds:
        n_levels = 1 + len(ds.overviews(1))
    for level in range(n_levels):
        with rasterio.open(path, overview_level=level - 1) if level else rasterio.open(path) as ds:
            for ty in range(-(-ds.height // 256)):
                for tx in range(-(-ds.width // 256)):
                    at = int(ds.get_tag_item(f"BLOCK_OFFSET_{tx}_{ty}", "TIFF", bidx=1))
                    size = int(ds.get_tag_item(f"BLOCK_SIZE_{tx}_{ty}", "TIFF", bidx=1))
                    assert int.from_bytes(raw[at - 4 : at], "little") == size
                    assert raw[at + size - 4 : at + size] == raw[at + size : at + size + 4]


def test_bigtiff_is_written_when_asked_and_reads_back(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 60_000, (11, 512, 512)).astype(np.uint16)
    path = tmp_path / "big.tif"
    write_with_cog_writer(path, data, bigtiff=True)
    assert path.read_bytes()[:4] == b"II+\x00"  # BigTIFF magic 43
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.read(), data)
        assert ds.overviews(1) == [2, 4]
    with rasterio.open(path, overview_level=1) as ds:
        np.testing.assert_array_equal(ds.read(), data[:, ::4, ::4])
    assert cog_layout_problems(path) == []


def test_layout_check_flags_a_plain_geotiff(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint16",
        crs="EPSG:32720", transform=TRANSFORM, tiled=True, blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(np.ones((1, 600, 600), np.uint16))
        dst.build_overviews([2], Resampling.nearest)
    problems = cog_layout_problems(path)
    assert "no GDAL COG layout header (LAYOUT=IFDS_BEFORE_DATA)" in problems
    assert "overview data does not come before the full resolution, smallest first" in problems


def test_blocks_must_be_whole_tiles_on_the_tile_grid(tmp_path: Path) -> None:
    data = np.zeros((512, 512, 2), np.uint16)
    kwargs = dict(width=512, height=512, count=2, dtype="uint16", epsg=32720, transform=TRANSFORM)
    with CogWriter(tmp_path / "a.tif", **kwargs) as w:
        with pytest.raises(ValueError, match="tile-aligned"):
            w.write(100, 0, data[:256])
        with pytest.raises(ValueError, match="one tile row of whole tiles"):
            w.write(0, 0, data[:256, :100])
        with pytest.raises(ValueError, match="expected 2 bands"):
            w.write(0, 0, data[:256, :, :1])
    with pytest.raises(ValueError, match="projected CRSs"):
        CogWriter(tmp_path / "b.tif", **{**kwargs, "epsg": 4326})


def test_layout_check_reports_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    write_with_cog_writer(path, np.ones((2, 512, 512), np.uint16))
    path.write_bytes(path.read_bytes()[:300])  # inside the first IFD
    problems = cog_layout_problems(path)
    assert len(problems) == 1 and problems[0].startswith("cannot read the TIFF structure of cut.tif")
