"""Scenes from a static STAC catalog (the embedded default) or a STAC API."""

from __future__ import annotations

import datetime as dt

from dagster import ConfigurableResource
from pydantic import Field

from geofm_assets.geo.catalog import ApiCatalog, StaticCatalog, open_catalog
from geofm_assets.geo.regions import Region
from geofm_assets.geo.scenes import Scene, scenes_on_date


class StacResource(ConfigurableResource):
    """``catalog`` is a path to a static ``catalog.json`` or the URL of a STAC API."""

    catalog: str
    collection: str = "sentinel-2-l2a"
    max_cloud_cover: float = Field(
        default=100.0,
        description=(
            "Item-level cloud cover limit (percent). An item's cloud cover is for its whole "
            "MGRS tile, so the default keeps every item and leaves cloud filtering to the "
            "chips' own SCL fractions."
        ),
    )
    api_timeout_s: float = Field(default=30.0, description="STAC API: timeout of one request (s).")
    api_max_retries: int = Field(
        default=4,
        description="STAC API: retries of a request that failed to connect, timed out or got 429/5xx.",
    )
    api_backoff_s: float = Field(
        default=1.0, description="STAC API: backoff factor; retry n > 1 waits this x 2^(n-1) s."
    )

    def _catalog(self) -> StaticCatalog | ApiCatalog:
        return open_catalog(self.catalog, self.collection, timeout_s=self.api_timeout_s,
                            max_retries=self.api_max_retries, backoff_s=self.api_backoff_s)

    def search(
        self, region: Region, start: dt.date, end: dt.date, max_cloud_cover: float | None = None
    ):  # -> list[pystac.Item]
        """Items over ``region`` acquired from ``start`` to ``end`` (UTC dates, inclusive), with
        at most ``max_cloud_cover`` (default: this resource's limit)."""
        limit = self.max_cloud_cover if max_cloud_cover is None else max_cloud_cover
        return self._catalog().search(region.bounds, start, end, limit)

    def published_since(
        self, region: Region, since: dt.datetime | None, max_cloud_cover: float | None = None
    ):  # -> list[pystac.Item]
        """Items over ``region`` published at or after ``since`` (all when None), in
        publication order, whatever their acquisition date (``geo.catalog.published_at``)."""
        limit = self.max_cloud_cover if max_cloud_cover is None else max_cloud_cover
        return self._catalog().published_since(region.bounds, since, limit)

    def newest(self, region: Region, max_cloud_cover: float | None = None):  # -> pystac.Item | None
        """The item over ``region`` with the latest acquisition time, or None."""
        limit = self.max_cloud_cover if max_cloud_cover is None else max_cloud_cover
        return self._catalog().newest(region.bounds, limit)

    def scenes_on(self, region: Region, date: dt.date) -> list[Scene]:
        """Validated scenes over ``region`` acquired on ``date`` (UTC), least cloudy first."""
        return scenes_on_date(self.search(region, date, date), date)
