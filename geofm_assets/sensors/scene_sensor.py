"""``scene_sensor``: new Sentinel-2 scenes in the STAC catalog become date partitions and runs.

Each tick asks the catalog, per region, for the items *published* since the region's cursor
(``updated``, else ``created``, else acquisition time: a late or reprocessed item for an old
date is picked up too), registers their dates in the ``s2_date`` dynamic partitions and
requests a run of ``sentinel2_tiles`` and ``chips`` for each new region x date. Embeddings,
the vector index and the region-level products follow by declarative automation.

The cursor is JSON, one entry per region: the newest publication time requested so far and
the items seen within ``SEEN_WINDOW`` of it (so items published with the same stamp, or
indexed by the API a little late, are neither repeated nor missed), and the cloud-cover limit
it was requested under. It advances only past what the tick requested. When the limit is
raised, a region's cursor starts again from the beginning of its catalog: the scenes that were
too cloudy before are requested, and the dates whose items have not changed get the run keys
they had, which Dagster does not run twice (the rescan takes a few ticks at the per-tick
limit). Lowering the limit changes nothing already requested. Run keys name the region, the
date and a digest of that date's items and their publication stamps: requesting the same
scenes again is a no-op for Dagster, a new or reprocessed item for the date is a new run.

Settings (read at each tick): ``GEOFM_SENSOR_MAX_CLOUD_COVER`` (percent, default 80: items
cloudier over their whole MGRS tile are not worth a run) and ``GEOFM_SENSOR_MAX_RUNS_PER_TICK``
(default 25: the first tick over a long archive is spread over several ticks).
"""

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pystac
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from geofm_assets.assets.chips import chips
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.geo.catalog import CatalogUnavailableError, published_at
from geofm_assets.geo.regions import Region
from geofm_assets.geo.scenes import MalformedItemError, scene_from_item
from geofm_assets.partitions import DATE_PARTITIONS_NAME, REGIONS, date_partitions, partition_key
from geofm_assets.resources.stac import StacResource

CURSOR_VERSION = 1
# Items published this long before a region's newest requested stamp are asked for again and
# told apart by the ids the cursor remembers: equal stamps and late API indexing are safe.
SEEN_WINDOW = dt.timedelta(hours=2)
MAX_CLOUD_COVER_ENV = "GEOFM_SENSOR_MAX_CLOUD_COVER"
MAX_RUNS_ENV = "GEOFM_SENSOR_MAX_RUNS_PER_TICK"
DEFAULT_MAX_CLOUD_COVER = 80.0
DEFAULT_MAX_RUNS_PER_TICK = 25
MINIMUM_INTERVAL_SECONDS = 300


def sensor_max_cloud_cover() -> float:
    """Item-level cloud cover limit (percent) of the scene sensor and the freshness check."""
    raw = os.environ.get(MAX_CLOUD_COVER_ENV)
    if raw is None or raw == "":
        return DEFAULT_MAX_CLOUD_COVER
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{MAX_CLOUD_COVER_ENV}={raw!r} must be a percentage from 0 to 100")
    return value


def sensor_max_runs_per_tick() -> int:
    raw = os.environ.get(MAX_RUNS_ENV)
    if raw is None or raw == "":
        return DEFAULT_MAX_RUNS_PER_TICK
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_RUNS_ENV}={raw!r} must be a whole number of runs, at least 1")
    return int(raw)


def stamp(item: pystac.Item) -> str:
    """The item's publication time as the cursor and run keys write it (UTC, ISO 8601)."""
    return published_at(item).astimezone(dt.UTC).isoformat()


@dataclass
class RegionCursor:
    """How far one region has been requested: the newest publication time, and the items seen
    from ``SEEN_WINDOW`` before it on (id -> publication stamp)."""

    published: dt.datetime | None = None
    seen: dict[str, str] = field(default_factory=dict)
    max_cloud_cover: float | None = None  # the limit requested under (None: not recorded)

    def query_since(self) -> dt.datetime | None:
        return None if self.published is None else self.published - SEEN_WINDOW

    def is_new(self, item: pystac.Item) -> bool:
        return self.seen.get(item.id) != stamp(item)

    def advanced(self, requested: Sequence[pystac.Item]) -> "RegionCursor":
        """This cursor moved past ``requested`` (and nothing else)."""
        if not requested:
            return self
        newest = max(published_at(i) for i in requested)
        published = newest if self.published is None else max(self.published, newest)
        seen = {**self.seen, **{i.id: stamp(i) for i in requested}}
        floor = published - SEEN_WINDOW
        return RegionCursor(
            published, {k: v for k, v in seen.items() if dt.datetime.fromisoformat(v) >= floor},
            self.max_cloud_cover,
        )


@dataclass
class SceneCursor:
    regions: dict[str, RegionCursor] = field(default_factory=dict)

    def region(self, name: str) -> RegionCursor:
        return self.regions.get(name, RegionCursor())

    def to_json(self) -> str:
        return json.dumps({
            "version": CURSOR_VERSION,
            "regions": {
                name: {"published": rc.published.isoformat() if rc.published else None,
                       "seen": dict(sorted(rc.seen.items())), "max_cloud_cover": rc.max_cloud_cover}
                for name, rc in sorted(self.regions.items())
            },
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "SceneCursor":
        if not text:
            return cls()
        try:
            doc = json.loads(text)
            if doc.get("version") != CURSOR_VERSION:
                raise ValueError(f"cursor version {doc.get('version')!r}, expected {CURSOR_VERSION}")
            regions = {}
            for name, entry in doc["regions"].items():
                published = entry.get("published")
                limit = entry.get("max_cloud_cover")  # absent in cursors written before it was kept
                regions[name] = RegionCursor(
                    dt.datetime.fromisoformat(published) if published else None,
                    {str(k): str(v) for k, v in entry.get("seen", {}).items()},
                    None if limit is None else float(limit),
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"scene_sensor cursor {text[:200]!r} cannot be read ({exc}); clear the sensor's "
                "cursor in the UI (Automation -> scene_sensor -> Set cursor value) to start over"
            ) from None
        return cls(regions)


@dataclass(frozen=True)
class PartitionRequest:
    """One region x date to (re)materialize and the items that make it due."""

    region: str
    date: dt.date
    new_items: tuple[pystac.Item, ...]
    date_items: tuple[pystac.Item, ...]  # every item over the region on that date

    @property
    def run_key(self) -> str:
        """Region, date and a digest of the date's items with their publication stamps."""
        stamps = sorted({f"{i.id}@{stamp(i)}" for i in (*self.date_items, *self.new_items)})
        digest = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]
        return f"{self.region}|{self.date.isoformat()}|{digest}"

    def run_request(self) -> RunRequest:
        ids = sorted({i.id for i in (*self.date_items, *self.new_items)})
        return RunRequest(
            run_key=self.run_key,
            partition_key=str(partition_key(self.date, self.region)),
            tags={"geofm/scene_ids": ",".join(ids)[:1000],
                  "geofm/new_scene_ids": ",".join(sorted(i.id for i in self.new_items))[:1000]},
        )


@dataclass(frozen=True)
class ScenePlan:
    requests: list[PartitionRequest]
    cursor: SceneCursor
    pending: int  # new items left for a later tick (the per-tick limit was reached)
    rescanned: dict[str, float] = field(default_factory=dict)  # region -> the lower limit it had


def plan_tick(
    stac: StacResource,
    regions: Mapping[str, Region],
    cursor: SceneCursor,
    max_cloud_cover: float,
    max_runs: int,
) -> ScenePlan:
    """What one tick requests and where the cursor goes. Raises ``CatalogUnavailableError`` or
    ``MalformedItemError`` (the tick is then skipped and the cursor kept)."""
    requests: list[PartitionRequest] = []
    regions_cursor = dict(cursor.regions)
    pending = 0
    rescanned: dict[str, float] = {}
    for name in sorted(regions):
        region = regions[name]
        rc = cursor.region(name)
        if rc.max_cloud_cover is not None and max_cloud_cover > rc.max_cloud_cover:
            # scenes skipped under the lower limit lie behind the cursor: start it again
            rescanned[name] = rc.max_cloud_cover
            rc = RegionCursor()
        new = [i for i in stac.published_since(region, rc.query_since(), max_cloud_cover)
               if rc.is_new(i)]
        for item in new:
            scene_from_item(item)  # a malformed item stops the tick before anything is requested
        by_date: dict[dt.date, list[pystac.Item]] = {}
        requested: list[pystac.Item] = []
        for item in new:  # publication order: stop at the first item over the limit
            assert item.datetime is not None  # scene_from_item checked it
            day = item.datetime.astimezone(dt.UTC).date()
            if day not in by_date and len(requests) + len(by_date) >= max_runs:
                pending += len(new) - len(requested)
                break
            by_date.setdefault(day, []).append(item)
            requested.append(item)
        for day, items in sorted(by_date.items()):
            on_date = stac.search(region, day, day, max_cloud_cover)
            requests.append(PartitionRequest(name, day, tuple(items), tuple(on_date)))
        if requested or rc.max_cloud_cover != max_cloud_cover:  # a rescanned cursor has no limit yet
            regions_cursor[name] = replace(rc.advanced(requested), max_cloud_cover=max_cloud_cover)
    return ScenePlan(requests, SceneCursor(regions_cursor), pending, rescanned)


@sensor(
    name="scene_sensor",
    target=[sentinel2_tiles, chips],
    minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "Polls the STAC catalog for Sentinel-2 items published since the last tick (per region, "
        "by publication time, so late items for old dates count), registers their dates as "
        "partitions and runs sentinel2_tiles + chips for each new region x date. Items cloudier "
        f"than ${MAX_CLOUD_COVER_ENV} (default {DEFAULT_MAX_CLOUD_COVER:g}%) are ignored. "
        "An unreachable catalog or a malformed item skips the tick and keeps the cursor."
    ),
)
def scene_sensor(context: SensorEvaluationContext, stac: StacResource) -> SensorResult | SkipReason:
    cursor = SceneCursor.from_json(context.cursor)
    max_cloud_cover = sensor_max_cloud_cover()
    try:
        plan = plan_tick(stac, REGIONS, cursor, max_cloud_cover, sensor_max_runs_per_tick())
    except CatalogUnavailableError as exc:
        message = f"STAC catalog {stac.catalog} is unavailable, tick skipped (cursor kept): {exc}"
        context.log.warning(message)
        return SkipReason(message)
    except MalformedItemError as exc:
        message = (f"STAC catalog {stac.catalog} returned a malformed item, tick skipped (cursor "
                   f"kept; fix or remove the item and the next tick retries): {exc}")
        context.log.warning(message)
        return SkipReason(message)
    for name, lower in sorted(plan.rescanned.items()):
        context.log.info(
            f"cloud-cover limit raised from {lower:g}% to {max_cloud_cover:g}%: {name}'s catalog is "
            "scanned again from the start for the scenes skipped before (dates whose items did not "
            "change keep their run keys and are not run again)"
        )
    if not plan.requests:
        if plan.cursor.to_json() != cursor.to_json():
            return SensorResult(
                skip_reason=f"no new Sentinel-2 item (cloud cover <= {max_cloud_cover:g}%) over "
                f"{', '.join(sorted(REGIONS))}; cursor updated",
                cursor=plan.cursor.to_json(),
            )
        return SkipReason(
            f"no new Sentinel-2 item (cloud cover <= {max_cloud_cover:g}%) published over "
            f"{', '.join(sorted(REGIONS))} since the last tick"
        )
    known = set(context.instance.get_dynamic_partitions(DATE_PARTITIONS_NAME))
    new_dates = sorted({r.date.isoformat() for r in plan.requests} - known)
    context.log.info(
        f"{len(plan.requests)} run(s) for {sum(len(r.new_items) for r in plan.requests)} new "
        f"item(s); {len(new_dates)} new date(s); {plan.pending} item(s) left for the next tick"
    )
    return SensorResult(
        run_requests=[r.run_request() for r in plan.requests],
        dynamic_partitions_requests=[date_partitions.build_add_request(new_dates)] if new_dates else [],
        cursor=plan.cursor.to_json(),
    )
