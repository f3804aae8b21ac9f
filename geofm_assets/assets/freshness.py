"""``chips_up_to_date``: an asset check that the chips keep up with the catalog, per region.

It fails when, for some region, the newest materialized ``chips`` date is older than the
newest scene the STAC catalog has published over that region by more than
``GEOFM_FRESHNESS_LAG_DAYS`` days (default 10), or when a region with scenes has no chips at
all. Scenes cloudier than the scene sensor's limit are left out, as the sensor leaves them.
"""

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    asset_check,
)

from geofm_assets.assets.chips import chips
from geofm_assets.partitions import REGIONS, region_date_partitions
from geofm_assets.resources.stac import StacResource
from geofm_assets.sensors.scene_sensor import sensor_max_cloud_cover
from geofm_assets.status import materialized_dates_by_region

FRESHNESS_LAG_ENV = "GEOFM_FRESHNESS_LAG_DAYS"
DEFAULT_FRESHNESS_LAG_DAYS = 10


def freshness_lag_days() -> int:
    raw = os.environ.get(FRESHNESS_LAG_ENV)
    if raw is None or raw == "":
        return DEFAULT_FRESHNESS_LAG_DAYS
    if not raw.isdigit():
        raise ValueError(f"{FRESHNESS_LAG_ENV}={raw!r} must be a whole number of days (0 or more)")
    return int(raw)


@dataclass(frozen=True)
class RegionFreshness:
    region: str
    newest_scene: dt.date | None  # newest acquisition the catalog has published
    newest_scene_id: str | None
    newest_chips: dt.date | None  # newest materialized chips partition
    lag_days: int | None  # newest_scene - newest_chips, None when either is missing
    fresh: bool

    @classmethod
    def judge(cls, region: str, newest_scene: dt.date | None, newest_scene_id: str | None,
              newest_chips: dt.date | None, max_lag_days: int) -> "RegionFreshness":
        if newest_scene is None:
            return cls(region, None, None, newest_chips, None, True)
        if newest_chips is None:
            return cls(region, newest_scene, newest_scene_id, None, None, False)
        lag = max((newest_scene - newest_chips).days, 0)
        return cls(region, newest_scene, newest_scene_id, newest_chips, lag, lag <= max_lag_days)

    def to_dict(self) -> dict[str, Any]:
        return {
            "newest_scene": self.newest_scene.isoformat() if self.newest_scene else None,
            "newest_scene_id": self.newest_scene_id,
            "newest_chips": self.newest_chips.isoformat() if self.newest_chips else None,
            "lag_days": self.lag_days,
            "fresh": self.fresh,
        }


def freshness_table(results: list[RegionFreshness]) -> str:
    lines = ["| region | newest scene | newest chips | lag (days) | fresh |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.region} | {r.newest_scene or '-'} | {r.newest_chips or 'none'} | "
                     f"{'-' if r.lag_days is None else r.lag_days} | {'yes' if r.fresh else 'NO'} |")
    return "\n".join(lines)


@asset_check(
    asset=chips,
    name="chips_up_to_date",
    description=(
        "For every region, the newest materialized chips date is within "
        f"${FRESHNESS_LAG_ENV} (default {DEFAULT_FRESHNESS_LAG_DAYS}) days of the newest scene the "
        "STAC catalog has published over it (scenes over the scene sensor's cloud limit left out)."
    ),
)
def chips_up_to_date(context: AssetCheckExecutionContext, stac: StacResource) -> AssetCheckResult:
    max_lag = freshness_lag_days()
    max_cloud_cover = sensor_max_cloud_cover()
    newest_chips = materialized_dates_by_region(context.instance, AssetKey("chips"), region_date_partitions)
    results = []
    for name in sorted(REGIONS):
        item = stac.newest(REGIONS[name], max_cloud_cover)
        scene_date = item.datetime.astimezone(dt.UTC).date() if item is not None and item.datetime else None
        dates = newest_chips.get(name, [])
        results.append(RegionFreshness.judge(
            name, scene_date, item.id if item is not None else None, dates[-1] if dates else None, max_lag))
    stale = [r.region for r in results if not r.fresh]
    return AssetCheckResult(
        passed=not stale,
        severity=AssetCheckSeverity.WARN,
        description=(f"chips behind the catalog by more than {max_lag} days in {', '.join(stale)}"
                     if stale else f"every region within {max_lag} days of its newest scene"),
        metadata={
            "max_lag_days": max_lag,
            "max_cloud_cover": max_cloud_cover,
            "stale_regions": MetadataValue.json(stale),
            "regions": MetadataValue.json({r.region: r.to_dict() for r in results}),
            "table": MetadataValue.md(freshness_table(results)),
        },
    )


freshness_checks = [chips_up_to_date]
