"""StaticCatalog reads items once per process and again when any item changes, however it was
written: added, replaced by a rename, or rewritten in place."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING

from geofm_assets.geo.catalog import StaticCatalog
from geofm_assets.geo.sample_data import COLLECTION_ID, SampleCatalog

if TYPE_CHECKING:
    from conftest import CatalogCopy  # tests/sensors/conftest.py


def cloud_cover(catalog: StaticCatalog, item_id: str) -> float:
    return float(next(i for i in catalog.items() if i.id == item_id).properties["eo:cloud_cover"])


def test_an_item_rewritten_in_place_is_read_again(
    catalog_copy: CatalogCopy, tiny_sample: SampleCatalog
) -> None:
    catalog = StaticCatalog(catalog_copy.path)
    item_id = tiny_sample.item_ids[0]
    before = cloud_cover(catalog, item_id)
    assert catalog.items() is catalog.items()  # cached while nothing changes
    path = catalog_copy.root / COLLECTION_ID / item_id / f"{item_id}.json"
    doc = json.loads(path.read_text())
    doc["properties"]["eo:cloud_cover"] = before + 7.5
    time.sleep(0.05)  # a later write than the catalog's, on filesystems with coarse timestamps
    with path.open("r+") as f:  # same file, same folder entry: the folder's mtime does not move
        f.write(json.dumps(doc))
        f.truncate()
    assert cloud_cover(catalog, item_id) == before + 7.5


def test_a_published_item_is_read(catalog_copy: CatalogCopy, tiny_sample: SampleCatalog) -> None:
    catalog = StaticCatalog(catalog_copy.path)
    n = len(catalog.items())
    time.sleep(0.05)
    at = dt.datetime(2023, 3, 1, 14, 25, tzinfo=dt.UTC)
    catalog_copy.publish(tiny_sample.item_ids[0], "S2B_20LMQ_20230301_0_L2A", at, at)
    assert len(catalog.items()) == n + 1
