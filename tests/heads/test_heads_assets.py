"""The heads' assets on a copy of the tiny lake: train, then map a partition; a head used with
another encoder's embeddings fails clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
from dagster import Definitions, materialize

from geofm_assets.assets.heads import (
    HEAD_ASSETS,
    landcover_classifier,
    landcover_map,
    landcover_segmentation,
    landcover_segmentation_map,
)
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.partitions import REGIONS, partition_key
from geofm_assets.resources.encoder import EncoderResource
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource


@pytest.fixture
def lake_copy(tiny_lake, tmp_path):
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake.root, root)
    return root


@pytest.fixture
def head_resources(lake_copy, tiny_lake):
    return {"lake": LocalLakeResource(root=str(lake_copy)),
            "stac": StacResource(catalog=str(tiny_lake.sample.catalog_path)),
            "encoder": EncoderResource(model="rcf", device="cpu")}


def test_the_head_assets_load_into_definitions(head_resources):
    defs = Definitions(assets=HEAD_ASSETS, resources=head_resources)
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} >= {
        "landcover_classifier", "landcover_map", "landcover_segmentation", "landcover_segmentation_map"}
    assert all(a.group_names_by_key[k] == "heads" for a in HEAD_ASSETS for k in a.keys)


@pytest.mark.slow
def test_classifier_then_map(lake_copy, head_resources, instance, tiny_lake):
    result = materialize([landcover_classifier], instance=instance, resources=head_resources,
                         run_config={"ops": {"landcover_classifier": {"config": {"min_share": 0.7}}}})
    assert result.success
    meta = result.asset_materializations_for_node("landcover_classifier")[0].metadata
    assert meta["cv_accuracy"].value > meta["baseline_accuracy"].value
    assert meta["encoder"].value == "rcf" and "data:image/png;base64" in meta["confusion_matrix"].value
    assert {"forest", "mixed"} == set(meta["classes"].value)
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    saved = lake_copy / "landcover_classifier"
    assert {p.name for p in saved.iterdir()} == {"model.npz", "model.json", "confusion_matrix.png", "cv.json"}
    assert json.loads((saved / "model.json").read_text())["encoder"]["model"] == "rcf"

    date = tiny_lake.dates[0]
    key = str(partition_key(date, "jamari"))
    result = materialize([landcover_map], instance=instance, resources=head_resources, partition_key=key)
    assert result.success
    out = lake_copy / "landcover_map" / "region=jamari" / f"date={date}"
    doc = json.loads((out / "landcover_map.geojson").read_text())
    chips_meta = result.asset_materializations_for_node("landcover_map")[0].metadata
    assert len(doc["features"]) == chips_meta["chips"].value > 0
    props = doc["features"][0]["properties"]
    assert props["class"] in ("forest", "mixed") and 0.5 <= props["probability"] <= 1
    grid = ChipGrid.for_region(REGIONS["jamari"])
    with rasterio.open(out / "landcover_map.tif") as ds:
        codes = ds.read(1)
        assert codes.shape == (grid.n_rows, grid.n_cols) and ds.res == (2560.0, 2560.0)
        assert ds.tags()["CLASS_1"] == "forest" and ds.nodata == 0
    assert (codes > 0).sum() == len(doc["features"])  # chips without embeddings stay nodata
    assert (out / "landcover_map.png").read_bytes()[:4] == b"\x89PNG"
    assert all(c.passed for c in result.get_asset_check_evaluations())

    # the same classifier on another encoder's embeddings: a clear failure
    meta_path = saved / "model.json"
    doc = json.loads(meta_path.read_text())
    doc["encoder"] = {"model": "clay-v1.5", "checkpoint_digest": "sha256:0"}
    meta_path.write_text(json.dumps(doc))
    result = materialize([landcover_map], instance=instance, resources=head_resources, partition_key=key,
                         raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("landcover_map")
    assert failure is not None and "trained on clay-v1.5" in str(failure.error)


@pytest.mark.slow
def test_segmentation_then_pixel_map(lake_copy, head_resources, instance, tiny_lake):
    date = "2020-07-16"
    config = {"regions": ["candeias"], "dates": [date], "hidden": 8, "epochs": 2}
    result = materialize([landcover_segmentation], instance=instance, resources=head_resources,
                         run_config={"ops": {"landcover_segmentation": {"config": config}}})
    assert result.success
    meta = result.asset_materializations_for_node("landcover_segmentation")[0].metadata
    assert 0 <= meta["mean_iou"].value <= 1 and meta["encoder"].value == "rcf"
    saved = lake_copy / "landcover_segmentation"
    assert {"decoder.pt", "decoder.json", "metrics.json"} <= {p.name for p in saved.iterdir()}

    result = materialize([landcover_segmentation_map], instance=instance, resources=head_resources,
                         partition_key=str(partition_key(date, "candeias")))
    assert result.success
    out = lake_copy / "landcover_segmentation_map" / "region=candeias" / f"date={date}"
    grid = ChipGrid.for_region(REGIONS["candeias"])
    with rasterio.open(out / "landcover_pixels.tif") as ds:
        assert (ds.height, ds.width, ds.count) == (grid.height, grid.width, 2) and ds.res == (10.0, 10.0)
        codes = ds.read(1)
    n_chips = result.asset_materializations_for_node("landcover_segmentation_map")[0].metadata["chips"].value
    assert (codes > 0).sum() == n_chips * 256 * 256
    assert set(np.unique(codes)) <= {0, 1, 2, 3, 4, 5, 6}
