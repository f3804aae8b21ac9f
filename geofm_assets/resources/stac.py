"""Scenes from a static STAC catalog (the embedded default) or a STAC API."""

from __future__ import annotations

import datetime as dt

from dagster import ConfigurableResource
from pydantic import Field

from geofm_assets.geo.catalog import open_catalog
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

    def search(self, region: Region, start: dt.date, end: dt.date):  # -> list[pystac.Item]
        return open_catalog(self.catalog, self.collection).search(
            region.bounds, start, end, self.max_cloud_cover
        )

    def scenes_on(self, region: Region, date: dt.date) -> list[Scene]:
        """Validated scenes over ``region`` acquired on ``date`` (UTC), least cloudy first."""
        return scenes_on_date(self.search(region, date, date), date)
