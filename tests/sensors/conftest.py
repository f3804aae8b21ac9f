"""A writable copy of the tiny sample's STAC catalog, and items written into it with pystac."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pystac
import pytest

from geofm_assets.geo.sample_data import COLLECTION_ID, SampleCatalog


@dataclass(frozen=True)
class CatalogCopy:
    """The tiny sample's catalog JSON copied (the COGs linked, they are never written), so a
    test can publish new items into it the way a provider would."""

    root: Path

    @property
    def path(self) -> Path:
        return self.root / "catalog.json"

    def _open(self) -> tuple[pystac.Catalog, pystac.Collection]:
        catalog = pystac.Catalog.from_file(str(self.path))
        collection = catalog.get_child(COLLECTION_ID)
        assert isinstance(collection, pystac.Collection)
        return catalog, collection

    def _save(self, catalog: pystac.Catalog) -> None:
        catalog.normalize_hrefs(str(self.path))
        catalog.make_all_asset_hrefs_relative()
        catalog.save(pystac.CatalogType.SELF_CONTAINED)

    def item(self, item_id: str) -> pystac.Item:
        _, collection = self._open()
        item = collection.get_item(item_id)
        assert item is not None, item_id
        return item

    def publish(self, template_id: str, new_id: str, acquired: dt.datetime, published: dt.datetime,
                drop_assets: Sequence[str] = ()) -> pystac.Item:
        """Add an item like ``template_id`` (same footprint and COGs) acquired at ``acquired``
        and published (``created``/``updated``) at ``published``."""
        catalog, collection = self._open()
        template = collection.get_item(template_id)
        assert template is not None, template_id
        template.make_asset_hrefs_absolute()
        item = template.clone()
        item.id = new_id
        item.datetime = acquired
        item.properties["created"] = item.properties["updated"] = pystac.utils.datetime_to_str(published)
        for name in drop_assets:
            del item.assets[name]
        collection.add_item(item)
        self._save(catalog)
        return item

    def withdraw(self, item_id: str) -> None:
        catalog, collection = self._open()
        collection.remove_item(item_id)
        self._save(catalog)


def _copy_json_link_rest(src: str, dst: str) -> None:
    if src.endswith(".json"):
        shutil.copy2(src, dst)
    else:
        os.symlink(src, dst)


@pytest.fixture
def catalog_copy(tiny_sample: SampleCatalog, tmp_path: Path) -> CatalogCopy:
    root = tmp_path / "catalog"
    shutil.copytree(tiny_sample.root, root, copy_function=_copy_json_link_rest)
    return CatalogCopy(root)
