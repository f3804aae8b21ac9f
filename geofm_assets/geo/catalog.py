"""Finding Sentinel-2 L2A items: a static STAC catalog on disk (pystac) or a STAC API
(pystac-client), behind one search interface."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pystac
from pystac.errors import STACError

from geofm_assets.geo.scenes import MalformedItemError

if TYPE_CHECKING:
    from pystac_client.stac_api_io import StacApiIO

BBox = tuple[float, float, float, float]


class CatalogUnavailableError(RuntimeError):
    """The catalog or STAC API cannot be reached or read."""


def _intersects(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def _in_window(item: pystac.Item, start: dt.date, end: dt.date) -> bool:
    return item.datetime is not None and start <= item.datetime.date() <= end


def published_at(item: pystac.Item) -> dt.datetime:
    """When the catalog published ``item`` (UTC): its ``updated`` property, else ``created``,
    else its acquisition ``datetime``. A late or reprocessed item for an old date has an old
    acquisition time but a new publication time; that is what a scene sensor must follow."""
    for name in ("updated", "created"):
        value = item.properties.get(name)
        if value is None:
            continue
        try:
            stamp = pystac.utils.str_to_datetime(str(value))
        except ValueError as exc:
            raise MalformedItemError(
                f"STAC item {item.id!r} has an unreadable {name!r} time {value!r}: {exc}; it must "
                "be an RFC 3339 date-time"
            ) from exc
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
    if item.datetime is None:
        raise MalformedItemError(
            f"STAC item {item.id!r} has no datetime and no created/updated time"
        )
    return item.datetime if item.datetime.tzinfo else item.datetime.replace(tzinfo=dt.UTC)


def _cloud_cover_ok(item: pystac.Item, max_cloud_cover: float) -> bool:
    return float(item.properties.get("eo:cloud_cover", 0.0)) <= max_cloud_cover


class StaticCatalog:
    """A self-contained static catalog (``catalog.json``); items are read once per process
    and re-read when the catalog file changes."""

    _cache: dict[str, tuple[tuple[int, int], list[pystac.Item]]] = {}  # noqa: RUF012
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

    def _stamp(self) -> tuple[int, int]:
        """(files, newest modification time in ns) over the catalog, its collection folder, the
        item folders and the JSON files in them: an item added, removed, replaced or rewritten
        in place changes it."""
        mtimes = [self.path.stat().st_mtime_ns]
        collection_dir = self.path.parent / self.collection
        if collection_dir.is_dir():
            mtimes.append(collection_dir.stat().st_mtime_ns)
            with os.scandir(collection_dir) as entries:
                for entry in entries:
                    mtimes.append(entry.stat().st_mtime_ns)
                    if entry.is_dir():
                        with os.scandir(entry.path) as files:
                            mtimes.extend(f.stat().st_mtime_ns for f in files if f.name.endswith(".json"))
        return len(mtimes), max(mtimes)

    def search(
        self, bbox: BBox, start: dt.date, end: dt.date, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        out = []
        for item in self.items():
            if item.bbox is None or not _intersects(item.bbox, bbox):
                continue
            if not _in_window(item, start, end):
                continue
            if not _cloud_cover_ok(item, max_cloud_cover):
                continue
            out.append(item)
        return sorted(out, key=lambda i: (i.datetime, i.id))

    def published_since(
        self, bbox: BBox, since: dt.datetime | None, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        """Items over ``bbox`` published at or after ``since`` (all when None), whatever their
        acquisition date, in publication order (see ``published_at``)."""
        out = [
            item for item in self.items()
            if item.bbox is not None and _intersects(item.bbox, bbox)
            and _cloud_cover_ok(item, max_cloud_cover)
            and (since is None or published_at(item) >= since)
        ]
        return sorted(out, key=lambda i: (published_at(i), i.id))

    def newest(self, bbox: BBox, max_cloud_cover: float = 100.0) -> pystac.Item | None:
        """The item over ``bbox`` with the latest acquisition time, or None."""
        found = [
            item for item in self.items()
            if item.bbox is not None and _intersects(item.bbox, bbox) and item.datetime is not None
            and _cloud_cover_ok(item, max_cloud_cover)
        ]
        return max(found, key=lambda i: (i.datetime, i.id), default=None)


# Query-extension operators and their CQL2 counterparts.
_CQL2_OPS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "eq": "="}
_TIME_PROPERTIES = frozenset({"datetime", "start_datetime", "end_datetime", "created", "updated"})
# statuses a STAC API answers when it is overloaded or restarting: retried with backoff
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_ITEMS = 10_000

Query = dict[str, dict[str, object]]


def _cql2_filter(query: Query) -> dict[str, object]:
    """A query-extension dict (``{"eo:cloud_cover": {"lte": 20}}``) as CQL2-JSON."""
    args: list[dict[str, object]] = []
    for prop, ops in query.items():
        for op, value in ops.items():
            if op not in _CQL2_OPS:
                raise ValueError(f"query operator {op!r} on {prop!r} has no CQL2 counterpart")
            literal = {"timestamp": value} if prop in _TIME_PROPERTIES else value
            args.append({"op": _CQL2_OPS[op], "args": [{"property": prop}, literal]})
    return args[0] if len(args) == 1 else {"op": "and", "args": args}


def _property_value(item: pystac.Item, prop: str) -> object:
    value = item.properties.get(prop)
    if prop in _TIME_PROPERTIES and value is not None:
        stamp = pystac.utils.str_to_datetime(str(value))
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
    return value


def _matches(item: pystac.Item, query: Query) -> bool:
    """Whether ``item`` passes a query-extension dict; a missing property fails it."""
    compare = {"lt": lambda a, b: a < b, "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b,
               "gte": lambda a, b: a >= b, "eq": lambda a, b: a == b}
    for prop, ops in query.items():
        value = _property_value(item, prop)
        if value is None:
            return False
        for op, bound in ops.items():
            if prop in _TIME_PROPERTIES:
                bound = pystac.utils.str_to_datetime(str(bound))
            if not compare[op](value, bound):
                return False
    return True


def _ordered(items: list[pystac.Item], sortby: str) -> list[pystac.Item]:
    """``items`` in ``sortby`` order (``"-properties.datetime"``: newest first); items without
    the property come last."""
    prop = sortby.lstrip("+-").removeprefix("properties.")
    values = {i.id: _property_value(i, prop) for i in items}
    present = sorted((i for i in items if values[i.id] is not None),
                     key=lambda i: (values[i.id], i.id), reverse=sortby.startswith("-"))
    return present + [i for i in items if values[i.id] is None]


class ApiCatalog:
    """A STAC API (Earth Search ``https://earth-search.aws.element84.com/v1`` and the like).

    Every request has a timeout (``timeout_s``) and is retried up to ``max_retries`` times on
    connection errors, timeouts and 429/5xx answers, waiting ``backoff_s`` x 2^(n-1) seconds
    before retry n > 1 (a ``Retry-After`` header is honoured); after that the call raises
    ``CatalogUnavailableError`` naming the URL, the attempts and the time spent. Searches are
    POSTs (idempotent for STAC item search, so retried as well).

    Property filters (cloud cover, ``updated``) go to the server as a query-extension
    ``query`` when it conforms to it, else as CQL2-JSON when it conforms to the filter
    extension, and are applied again to what comes back, so a server that ignores them still
    gives the right items; when the server can neither filter nor sort as asked, all matching
    items are fetched and filtered and sorted here.
    """

    def __init__(
        self,
        url: str,
        collection: str = "sentinel-2-l2a",
        *,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        page_size: int = 100,
    ) -> None:
        self.url = url
        self.collection = collection
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.page_size = page_size

    def _stac_io(self) -> StacApiIO:
        from pystac_client.stac_api_io import StacApiIO
        from urllib3.util.retry import Retry

        retry = Retry(
            total=self.max_retries, connect=self.max_retries, read=self.max_retries,
            status=self.max_retries, other=0, backoff_factor=self.backoff_s,
            status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False, respect_retry_after_header=True,
        )
        return StacApiIO(timeout=self.timeout_s, max_retries=retry)

    def _items(self, bbox: BBox, query: Query, *, datetime: str | None = None,
               sortby: str | None = None, max_items: int = MAX_ITEMS,
               server_sort: bool = True) -> list[pystac.Item]:
        """Items of the collection over ``bbox`` passing ``query``, ordered by ``sortby``
        (``"-properties.datetime"``, the sort extension's form; when given), at most
        ``max_items``. A server that conforms to the sort extension but rejects the field
        (some want it without ``properties.``) is asked again without sorting, and the
        items are ordered here."""
        from pystac_client import Client
        from pystac_client.conformance import ConformanceClasses
        from pystac_client.exceptions import APIError

        started = time.monotonic()
        params: dict[str, Any] = {"collections": [self.collection], "bbox": list(bbox),
                                  "limit": self.page_size}
        try:
            # Client.open resets the StacApiIO's timeout to its own argument: give it both
            client = Client.open(self.url, stac_io=self._stac_io(), timeout=self.timeout_s)
            if datetime is not None:
                params["datetime"] = datetime
            exact = True
            if query and client.conforms_to(ConformanceClasses.QUERY):
                params["query"] = query
            elif query and client.conforms_to(ConformanceClasses.FILTER):
                params["filter"] = _cql2_filter(query)
                params["filter_lang"] = "cql2-json"
            elif query:
                exact = False
            if sortby is not None:
                if server_sort and client.conforms_to(ConformanceClasses.SORT):
                    params["sortby"] = sortby
                else:
                    exact = False
            params["max_items"] = max_items if exact else MAX_ITEMS
            items = list(client.search(**params).items())
        except (APIError, OSError) as exc:
            if "sortby" in params and getattr(exc, "status_code", None) is not None:
                return self._items(bbox, query, datetime=datetime, sortby=sortby,
                                   max_items=max_items, server_sort=False)
            raise self._unavailable(exc, time.monotonic() - started) from exc
        items = [i for i in items if _matches(i, query)]
        if sortby is not None and not exact:
            items = _ordered(items, sortby)
        return items[:max_items]

    def _unavailable(self, exc: Exception, elapsed_s: float) -> CatalogUnavailableError:
        status = getattr(exc, "status_code", None)
        text = str(exc).strip()
        detail = text.splitlines()[0][:300] if text else type(exc).__name__
        if status is not None and status not in RETRY_STATUSES:
            return CatalogUnavailableError(
                f"STAC API {self.url} rejected the request with HTTP {status}: {detail}. Check "
                f"that it is a STAC API serving the {self.collection!r} collection"
            )
        answer = f"still answered HTTP {status}" if status is not None else "could not be reached"
        return CatalogUnavailableError(
            f"STAC API {self.url} {answer} after {self.max_retries + 1} attempts over "
            f"{elapsed_s:.1f} s (timeout {self.timeout_s:g} s a request, retried on connection "
            f"errors, timeouts and HTTP {'/'.join(map(str, RETRY_STATUSES))} with backoff): "
            f"{detail}. Check the URL and the network, or point GEOFM_STAC_CATALOG at another "
            "catalog"
        )

    def search(
        self, bbox: BBox, start: dt.date, end: dt.date, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        items = self._items(
            bbox, {"eo:cloud_cover": {"lte": max_cloud_cover}},
            datetime=f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z",
        )
        items = [i for i in items if _in_window(i, start, end)]
        return sorted(items, key=lambda i: (i.datetime, i.id))

    def published_since(
        self, bbox: BBox, since: dt.datetime | None, max_cloud_cover: float = 100.0
    ) -> list[pystac.Item]:
        """Items over ``bbox`` whose ``updated`` time is at or after ``since`` (all when None),
        in publication order (Earth Search v1 keeps ``updated`` on every item)."""
        query: Query = {"eo:cloud_cover": {"lte": max_cloud_cover}}
        if since is not None:
            query["updated"] = {"gte": pystac.utils.datetime_to_str(since.astimezone(dt.UTC))}
        items = self._items(bbox, query, sortby="+properties.updated")
        items = [i for i in items if since is None or published_at(i) >= since]
        return sorted(items, key=lambda i: (published_at(i), i.id))

    def newest(self, bbox: BBox, max_cloud_cover: float = 100.0) -> pystac.Item | None:
        """The item over ``bbox`` with the latest acquisition time, or None."""
        items = self._items(bbox, {"eo:cloud_cover": {"lte": max_cloud_cover}},
                            sortby="-properties.datetime", max_items=1)
        return items[0] if items else None


def open_catalog(
    location: str,
    collection: str = "sentinel-2-l2a",
    *,
    timeout_s: float = 30.0,
    max_retries: int = 4,
    backoff_s: float = 1.0,
) -> StaticCatalog | ApiCatalog:
    """A STAC API for an http(s) URL not ending in .json, else a static catalog; the request
    settings apply to an API only (see ``ApiCatalog``)."""
    if location.startswith(("http://", "https://")) and not location.endswith(".json"):
        return ApiCatalog(location, collection, timeout_s=timeout_s, max_retries=max_retries,
                          backoff_s=backoff_s)
    return StaticCatalog(location, collection)
