import json

import pytest
import shapely

from geofm_assets.geo.regions import ChipGrid, RegionError, get_region, load_regions, utm_epsg


def test_committed_regions_load_on_the_utm_grid():
    regions = load_regions()
    assert set(regions) == {"jamari", "candeias"}
    for region in regions.values():
        assert region.epsg == 32720  # Rondonia: UTM 20 south
        grid = ChipGrid.for_region(region)
        assert grid.x0 % 20 == 0 and grid.y0 % 20 == 0
        assert len(grid.cells) == grid.n_rows * grid.n_cols  # rectangles: every cell touches


def test_chip_ids_round_trip_and_geometry_inside_region_bounds():
    region = load_regions()["jamari"]
    grid = ChipGrid.for_region(region)
    for row, col in grid.cells:
        chip_id = grid.chip_id(row, col)
        assert grid.parse_chip_id(chip_id) == (row, col)
        footprint = grid.chip_polygon_lonlat(row, col)
        assert footprint.intersects(region.geometry)
    with pytest.raises(ValueError, match="not a chip of region"):
        grid.parse_chip_id("candeias_r0000_c0000")
    with pytest.raises(ValueError, match="outside"):
        grid.parse_chip_id("jamari_r0099_c0000")


def test_grid_is_stable_for_the_same_region():
    region = load_regions()["candeias"]
    assert ChipGrid.for_region(region) == ChipGrid.for_region(region)


def test_unknown_region_names_the_known_ones():
    with pytest.raises(RegionError, match=r"unknown region 'atlantis'.*candeias, jamari"):
        get_region(load_regions(), "atlantis")


@pytest.mark.parametrize(
    ("name", "message"),
    [("../etc", "lowercase letters"), ("Big Region", "lowercase letters"), (None, "lowercase")],
)
def test_region_names_that_would_make_bad_keys_are_refused(tmp_path, name, message):
    doc = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": name},
        "geometry": shapely.geometry.mapping(shapely.box(-63.9, -9.1, -63.8, -9.0)),
    }]}
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(doc))
    with pytest.raises(RegionError, match=message):
        load_regions(path)


def test_missing_and_projected_regions_files_are_explained(tmp_path):
    with pytest.raises(RegionError, match="does not exist"):
        load_regions(tmp_path / "nope.geojson")
    doc = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "utm"},
        "geometry": shapely.geometry.mapping(shapely.box(400000, 8990000, 410000, 9000000)),
    }]}
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(doc))
    with pytest.raises(RegionError, match="not lon/lat"):
        load_regions(path)


def test_utm_zone_of_a_point():
    assert utm_epsg(-63.9, -9.1) == 32720
    assert utm_epsg(2.35, 48.85) == 32631
