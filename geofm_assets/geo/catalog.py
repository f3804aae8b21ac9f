"""Finding Sentinel-2 L2A items: a static STAC catalog on disk (pystac) or a STAC API
(pystac-client), behind one search interface."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pystac
from pystac.errors import STACError

from geofm_assets.geo.scenes import MalformedItemError

BBox = tuple[float, float, float, float]


class CatalogUnavailableError(RuntimeError):
    """The catalog or STAC API cannot be reached or read."""


def _intersects(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def _in_window(item: pystac.Item, start: dt.date, end: dt.date) -> bool:
    return item.datetime is not None and start <= item.datetime.date() <= end


class StaticCatalog:
    """A self-contained static catalog (``catalog.json``); items are read once per process
    and re-read when the catalog file changes."""

    _cache: dict[str, tuple[float, list[pystac.Item]]] = {}  # noqa: RUF012
    _lock = threading.Lock()

    def __init__(self, path: str | Path, collection: str = "sentinel-2-l2a") -> None:
        self.path = Path(path)
        self.collection = collection

    def items(self) -> list[pystac.Item]:
        if not self.path.exists():
            raise CatalogUnavailableError(
                f"STAC catalog {self.path} does not exist; run `geofm sample-data` to write the "
                "sample catalog, or point GEOFM_STAC_CATALOG at a catalog.json or a STAC API URL"
            )
        key = str(self.path.resolve())
        stamp = self._stamp()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[0] == stamp:
                return cached[1]
        try:
            catalog = pystac.Catalog.from_file(str(self.path))
            child = catalog.get_child(self.collection)
            source = child if child is not None else catalog
            items = list(source.get_items(recursive=True))
        except (STACError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MalformedItemError(
                f"STAC catalog {self.path} holds a malformed catalog or item: {exc}. Fix or "
                "remove that item (`geofm sample-data` rewrites the sample catalog)"
            ) from exc
        except OSError as exc:
            raise CatalogUnavailableError(f"cannot read STAC catalog {self.path}: {exc}") from exc
        with self._lock:
            self._cache[key] = (stamp, items)
        return items

    def _stamp(self) -> float:
        """Newest modification time of the catalog and its collection's item folders."""
        stamp = self.path.stat().st_mtime
        collection_dir = self.path.parent / self.collection
        if collection_dir.is_dir():
            stamp = max(stamp, collection_dir.stat().st_mtime)
            stamp = max([stamp, *(p.stat().st_mtime for p in collection_dir.iterdir())])
        return stamp

    def search(
        self, bbox: BBox, start: dt.date, end: dt.date, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        out = []
        for item in self.items():
            if item.bbox is None or not _intersects(item.bbox, bbox):
                continue
            if not _in_window(item, start, end):
                continue
            if float(item.properties.get("eo:cloud_cover", 0.0)) > max_cloud_cover:
                continue
            out.append(item)
        return sorted(out, key=lambda i: (i.datetime, i.id))


class ApiCatalog:
    """A STAC API (Earth Search ``https://earth-search.aws.element84.com/v1`` and the like)."""

    def __init__(self, url: str, collection: str = "sentinel-2-l2a") -> None:
        self.url = url
        self.collection = collection

    def search(
        self, bbox: BBox, start: dt.date, end: dt.date, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        from pystac_client import Client
        from pystac_client.exceptions import APIError

        try:
            client = Client.open(self.url)
            search = client.search(
                collections=[self.collection],
                bbox=list(bbox),
                datetime=f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z",
                query={"eo:cloud_cover": {"lte": max_cloud_cover}},
                max_items=10_000,
            )
            items = list(search.items())
        except APIError as exc:
            raise CatalogUnavailableError(f"STAC API {self.url} failed: {exc}") from exc
        except OSError as exc:
            raise CatalogUnavailableError(f"STAC API {self.url} is unreachable: {exc}") from exc
        return sorted(items, key=lambda i: (i.datetime, i.id))


def open_catalog(location: str, collection: str = "sentinel-2-l2a") -> StaticCatalog | ApiCatalog:
    if location.startswith(("http://", "https://")) and not location.endswith(".json"):
        return ApiCatalog(location, collection)
    return StaticCatalog(location, collection)
