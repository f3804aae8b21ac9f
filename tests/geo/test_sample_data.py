"""The seeded sample catalog: STAC layout, COGs, clouds, baselines, truth and determinism."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.features
from pyproj import Transformer
from shapely import transform as transform_coords
from shapely.geometry import shape

from geofm_assets import bands
from geofm_assets.geo import sample_data as sd
from geofm_assets.geo.sample_data import SIZE_PRESETS, SampleCatalog, generate_sample, write_scene

T = SIZE_PRESETS["tiny"].tile_pixels
OVERCAST = dt.date(2022, 2, 11)  # the tiny preset's overcast date
# pystac moves proj:epsg into proj:code when it reads an item; the JSON files carry both.
ITEM_PROPERTIES = (
    "platform", "constellation", "instruments", "eo:cloud_cover", "proj:code",
    "mgrs:utm_zone", "mgrs:latitude_band", "mgrs:grid_square", "grid:code", "s2:mgrs_tile",
    "s2:processing_baseline", "s2:product_type", "earthsearch:boa_offset_applied", "created",
    "updated",
)


@pytest.fixture(scope="module")
def sample(tiny_sample: SampleCatalog) -> SampleCatalog:
    return tiny_sample


@pytest.fixture(scope="module")
def items(sample: SampleCatalog) -> dict[str, pystac.Item]:
    catalog = pystac.Catalog.from_file(str(sample.catalog_path))
    return {item.id: item for item in catalog.get_items(recursive=True)}


def read(item: pystac.Item, asset: str) -> np.ndarray:
    with rasterio.open(item.assets[asset].get_absolute_href()) as ds:
        return ds.read(1)


def item_on(items: dict[str, pystac.Item], tile: str, day: dt.date) -> pystac.Item:
    (item,) = (i for i in items.values() if i.id.split("_")[1:3] == [tile, f"{day:%Y%m%d}"])
    return item


def cloud_percent(scl: np.ndarray) -> float:
    valid = scl != bands.SCL_NO_DATA
    return 100 * np.isin(scl[valid], bands.SCL_CLOUD_CLASSES).mean()


def landcover_of(sample: SampleCatalog, tile: str) -> np.ndarray:
    with rasterio.open(sample.landcover_path) as ds:
        lc = ds.read(1)
    c0 = sd.tile_column_offset(tile, T)
    return lc[:, c0 : c0 + T]


def test_presets_and_dates():
    assert set(SIZE_PRESETS) == {"tiny", "demo", "bench"}
    with pytest.raises(ValueError, match="tiny, demo, bench"):
        sd.preset_for("huge")
    grid = set(sd.revisit_dates())
    for size, count in (("tiny", 6), ("demo", 36), ("bench", 4)):
        plan = sd.plan_acquisitions(SIZE_PRESETS[size], seed=0)
        days = [a.date for a in plan]
        assert len(days) == count and days == sorted(set(days)) and set(days) <= grid
        assert dt.date(2020, 1, 1) <= days[0] and days[-1] <= dt.date(2022, 12, 31)
        assert {a.platform for a in plan} == {"sentinel-2a", "sentinel-2b"}
    tiny = sd.plan_acquisitions(SIZE_PRESETS["tiny"], seed=0)
    assert sum(a.date < sd.BOA_OFFSET_FROM for a in tiny) == 2
    assert not any(a.swath_edge for a in tiny[:2])


def test_catalog_reads_back_with_every_item(sample, items):
    assert sample.tiles == ["20LMQ", "20LNQ"] and len(sample.dates) == 6
    assert sorted(items) == sample.item_ids and len(items) == 12
    catalog = pystac.Catalog.from_file(str(sample.catalog_path))
    assert catalog.id == "geofm-sample"
    collection = catalog.get_child("sentinel-2-l2a")
    assert isinstance(collection, pystac.Collection)
    assert (sample.root / "sentinel-2-l2a" / "collection.json").exists()
    start = collection.extent.temporal.intervals[0][0]
    assert start is not None and start.date() == sample.dates[0]
    assert json.loads(sample.regions_path.read_text())["features"]
    for item_id in items:  # relative links: the folder can be moved
        raw = json.loads((sample.root / "sentinel-2-l2a" / item_id / f"{item_id}.json").read_text())
        assert raw["assets"]["blue"]["href"].startswith("../../sentinel-s2-l2a-cogs/20/L/")
        assert raw["properties"]["proj:epsg"] == 32720 and len(raw["stac_extensions"]) == 5
    assert not [p for p in sample.root.parent.iterdir() if p.name != "sample"]  # no temp left


def test_items_carry_earth_search_properties_and_assets(items):
    for item in items.values():
        satellite, tile, day, _, _ = item.id.split("_")
        assert re.fullmatch(r"S2[AB]_20L[MN]Q_\d{8}_0_L2A", item.id)
        props = item.properties
        assert all(k in props for k in ITEM_PROPERTIES)
        assert props["platform"] == f"sentinel-2{satellite[-1].lower()}"
        assert (props["s2:mgrs_tile"], props["grid:code"]) == (tile, f"MGRS-{tile}")
        assert props["proj:code"] == "EPSG:32720"
        assert item.datetime.hour == 14 and f"{item.datetime:%Y%m%d}" == day
        post = item.datetime.date() >= sd.BOA_OFFSET_FROM
        assert (props["s2:processing_baseline"] == "04.00") == post
        assert set(item.assets) == set(bands.REQUIRED_ASSETS)
        for band in bands.SPECTRAL_BANDS:
            asset = item.assets[band.name]
            assert Path(asset.get_absolute_href()).name == f"{band.band_id}.tif"
            assert asset.media_type == pystac.MediaType.COG
            assert asset.roles == ["data", "reflectance"]
            assert asset.extra_fields["eo:bands"][0]["name"] == band.band_id
            raster = asset.extra_fields["raster:bands"][0]
            assert raster["offset"] == pytest.approx(-0.1 if post else 0.0)
            assert raster["scale"] == 0.0001 and raster["nodata"] == 0
        assert item.assets["scl"].extra_fields["raster:bands"][0]["data_type"] == "uint8"


def test_every_asset_is_a_tiled_deflate_cog_matching_its_metadata(items):
    for item in items.values():
        for name, asset in item.assets.items():
            with rasterio.open(asset.get_absolute_href()) as ds:
                assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
                assert ds.compression == rasterio.enums.Compression.deflate
                assert ds.overviews(1) and ds.nodata == 0 and ds.crs.to_epsg() == 32720
                assert list(ds.shape) == asset.extra_fields["proj:shape"]
                assert list(ds.transform)[:6] == asset.extra_fields["proj:transform"]
                assert ds.dtypes[0] == ("uint8" if name == "scl" else "uint16")
                assert ds.shape[0] == T * 10 // asset.extra_fields["gsd"]


def test_cloud_cover_is_the_scl_cloud_fraction(items):
    for item in items.values():
        scl = read(item, "scl")
        assert item.properties["eo:cloud_cover"] == pytest.approx(cloud_percent(scl), abs=1e-3)
        if item.datetime.date() == OVERCAST:
            assert item.properties["eo:cloud_cover"] > 95
        else:
            assert item.properties["eo:cloud_cover"] < 20


def test_swath_edge_wedge_is_nodata_in_every_band(sample, items):
    edged = [i for i in items.values() if i.properties["s2:nodata_pixel_percentage"] > 0]
    assert edged and all(i.properties["s2:mgrs_tile"] == "20LNQ" for i in edged)
    assert all(i.datetime.date() not in sample.dates[:2] for i in edged)
    item = edged[0]
    scl = read(item, "scl")
    assert 5 < 100 * (scl == 0).mean() < 70
    assert np.array_equal(read(item, "swir16") == 0, scl == 0)
    assert np.mean((read(item, "red")[::2, ::2] == 0) != (scl == 0)) < 0.01  # 10 m vs 20 m edge
    full = item_on(items, "20LMQ", item.datetime.date())
    assert shape(item.geometry).area < 0.95 * shape(full.geometry).area  # valid-data footprint


def test_post_04_00_dn_are_the_same_ground_plus_1000(sample, items, tmp_path):
    day = sample.dates[1]  # pre-04.00 in the catalog
    pre = write_scene(tmp_path / "pre", "20LMQ", day, seed=0, size="tiny")
    post = write_scene(tmp_path / "post", "20LMQ", day, seed=0, size="tiny",
                       processing_baseline="04.00")
    # determinism: a second run gives the catalog's item and arrays
    original = item_on(items, "20LMQ", day)
    on_disk = json.loads(Path(str(original.get_self_href())).read_text())["properties"]
    assert json.dumps(pre.to_dict()["properties"]) == json.dumps(on_disk)
    assert np.array_equal(read(pre, "nir"), read(original, "nir"))
    assert post.properties["s2:processing_baseline"] == "04.00"
    assert post.assets["red"].extra_fields["raster:bands"][0]["offset"] == pytest.approx(-0.1)
    forest = (landcover_of(sample, "20LMQ") == sd.FOREST)[::2, ::2] & (read(pre, "scl") == 4)
    for band in ("red", "nir", "swir16"):
        a, b = read(pre, band).astype(int), read(post, band).astype(int)
        assert np.all(b[a > 0] - a[a > 0] == 1000)
        a, b = (x[::2, ::2] if x.shape != forest.shape else x for x in (a, b))
        assert (b[forest].mean() - a[forest].mean()) == pytest.approx(1000)


def test_overcast_date_is_mostly_cloud_in_scl(items):
    for tile in sd.TILES:
        scl = read(item_on(items, tile, OVERCAST), "scl")
        assert np.isin(scl, bands.SCL_CLOUD_CLASSES).mean() > 0.95
        assert {8, 9, 10} <= set(np.unique(scl).tolist())


def test_truth_files(sample):
    classes = json.loads((sample.root / "truth" / "landcover_classes.json").read_text())
    assert classes == {"1": "forest", "2": "pasture", "3": "crops", "4": "water",
                       "5": "bare_soil", "6": "urban"}
    with rasterio.open(sample.landcover_path) as ds:
        landcover, transform = ds.read(1), ds.transform
        assert ds.dtypes[0] == "uint8" and ds.nodata == 0 and ds.crs.to_epsg() == 32720
        assert ds.res == (10, 10) and ds.shape == (T, 2 * T - 256) and ds.overviews(1)
        assert ds.tags()["CLASS_1"] == "forest" and "forest" in ds.descriptions[0]
    assert set(np.unique(landcover)) == set(range(1, 7))
    to_utm = Transformer.from_crs(4326, 32720, always_xy=True)
    regions = sd.load_regions()
    for name, region in regions.items():  # every region mixes forest, pasture and crops
        mask = rasterio.features.geometry_mask([region], landcover.shape, transform, invert=True)
        share = np.bincount(landcover[mask], minlength=7) / mask.sum()
        assert share[sd.FOREST] > 0.4 and share[sd.PASTURE] > 0.05 and share[sd.CROPS] > 0.01, name
    events = json.loads(sample.deforestation_path.read_text())["features"]
    assert 8 <= len(events) <= 12
    assert sum(e["properties"]["region"] is not None for e in events) >= len(events) - 2
    for event in events:
        props = event["properties"]
        assert dt.date(2021, 3, 1) <= dt.date.fromisoformat(props["date_cleared"]) <= dt.date(
            2022, 9, 30)
        polygon = transform_coords(shape(event["geometry"]),
                                   lambda xy: np.column_stack(to_utm.transform(*xy.T)))
        assert polygon.is_valid and 5 <= props["area_ha"] <= 60
        assert polygon.area / 1e4 == pytest.approx(props["area_ha"], rel=1e-3)
        assert props["region"] in (None, *regions)
        if props["region"]:
            assert regions[props["region"]].contains(polygon)
        inside = rasterio.features.geometry_mask([polygon], landcover.shape, transform,
                                                 invert=True)
        assert (landcover[inside] == sd.FOREST).all()  # forest at the start


def test_the_tiles_overlap_on_identical_ground(sample, items):
    day = sample.dates[0]
    a, b = (item_on(items, tile, day) for tile in sd.TILES)
    half = sd.TILE_OVERLAP_PIXELS // 2
    assert np.array_equal(read(a, "scl")[:, -half:], read(b, "scl")[:, :half])
    nir_a = read(a, "nir")[:, -2 * half :].astype(float)
    nir_b = read(b, "nir")[:, : 2 * half].astype(float)
    assert not np.array_equal(nir_a, nir_b)  # own sensor noise ...
    assert np.abs(nir_a - nir_b).mean() < 0.03 * nir_a.mean()  # ... on the same ground
    assert np.corrcoef(nir_a.ravel(), nir_b.ravel())[0, 1] > 0.9


def test_spectra_are_plausible_on_clear_pixels(sample, items):
    item = item_on(items, "20LMQ", sample.dates[0])
    landcover = landcover_of(sample, "20LMQ")
    clear = np.repeat(np.repeat(np.isin(read(item, "scl"), (4, 5, 6)), 2, 0), 2, 1)
    red, nir = read(item, "red").astype(float), read(item, "nir").astype(float)
    forest = clear & (landcover == sd.FOREST)
    assert np.mean(nir[forest] > 3 * red[forest]) > 0.99
    water = clear & (landcover == sd.WATER)
    assert water.sum() > 100 and np.median(nir[water]) < 1000
    bare = clear & (landcover == sd.BARE)
    assert np.median(nir[bare]) > np.median(red[bare]) > np.median(red[forest])


def test_cleared_forest_changes_after_its_clearing_date(sample, items):
    landcover = landcover_of(sample, "20LMQ")
    events = json.loads(sample.deforestation_path.read_text())["features"]
    world = sd.world_for(0, T)
    first, last = item_on(items, "20LMQ", sample.dates[0]), item_on(items, "20LMQ",
                                                                    sample.dates[-2])
    swir = [read(i, "swir22").astype(float) for i in (first, last)]
    clear = [np.isin(read(i, "scl"), (4, 5)) for i in (first, last)]
    checked = 0
    for index, event in enumerate(events, start=1):
        cleared = dt.date.fromisoformat(event["properties"]["date_cleared"])
        inside = (world.event_index[:, : T] == index)[::2, ::2] & clear[0] & clear[1]
        if cleared < sample.dates[-2] and inside.sum() > 20:
            assert swir[1][inside].mean() > 1.4 * swir[0][inside].mean()
            checked += 1
    assert checked >= 2
    assert (landcover[world.event_index[:, :T] > 0] == sd.FOREST).all()


def test_the_ground_is_rebuilt_identically_from_the_seed(sample):
    world = sd.build_world(0, T)  # not the cached one
    with rasterio.open(sample.landcover_path) as ds:
        assert np.array_equal(ds.read(1), world.landcover)
    other = sd.build_world(1, T)
    assert not np.array_equal(other.landcover, world.landcover)


def test_generation_replaces_the_folder_only_once_complete(tmp_path, monkeypatch):
    out = tmp_path / "sample"
    out.mkdir()
    (out / "old.txt").write_text("the previous sample")
    with pytest.raises(ValueError, match="choose one of tiny, demo, bench"):
        generate_sample(out, size="huge")
    one_date = sd.plan_acquisitions(SIZE_PRESETS["tiny"], seed=0)[:1]
    monkeypatch.setattr(sd, "plan_acquisitions", lambda preset, seed: one_date)

    def full_disk(root: Path, items: list[pystac.Item]) -> Path:
        raise OSError("no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(sd, "build_catalog", full_disk)
        with pytest.raises(OSError, match="no space"):
            generate_sample(out, size="tiny", processes=1)
    assert (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["sample"]
    sample = generate_sample(out, size="tiny", processes=1)
    assert not (out / "old.txt").exists() and len(sample.item_ids) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]
    assert len(list(pystac.Catalog.from_file(str(sample.catalog_path)).get_items(recursive=True))) == 2
