"""scene_sensor over a copy of the tiny sample catalog, with items published between ticks."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pystac
import pytest
from dagster import (
    DagsterInstance,
    Definitions,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

from geofm_assets.assets.chips import chips
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.geo.catalog import published_at
from geofm_assets.geo.sample_data import SampleCatalog
from geofm_assets.geo.scenes import MalformedItemError
from geofm_assets.partitions import DATE_PARTITIONS_NAME, REGIONS
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource
from geofm_assets.sensors.scene_sensor import (
    MAX_CLOUD_COVER_ENV,
    MAX_RUNS_ENV,
    MINIMUM_INTERVAL_SECONDS,
    SceneCursor,
    scene_sensor,
)

if TYPE_CHECKING:
    from conftest import CatalogCopy  # tests/sensors/conftest.py

OVERPASS = dt.time(14, 25, 29, tzinfo=dt.UTC)


def overcast_date(sample: SampleCatalog) -> dt.date:
    """The tiny sample's third date, 98.5 % cloudy (its target is 2022-02-10)."""
    return sample.dates[2]


def tick(catalog: str | Path, instance: DagsterInstance, cursor: str | None = None):
    context = build_sensor_context(
        cursor=cursor, instance=instance, resources={"stac": StacResource(catalog=str(catalog))}
    )
    return scene_sensor(context)


def register(instance: DagsterInstance, result: SensorResult) -> None:
    """What the daemon does with the result's dynamic partition requests."""
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def keys_by_partition(result: SensorResult) -> dict[str, str]:
    keys = {r.partition_key: r.run_key for r in result.run_requests}
    assert len(keys) == len(result.run_requests), "one run per partition and tick"
    return keys


def test_first_tick_requests_every_clear_date_of_every_region(
    catalog_copy: CatalogCopy, tiny_sample: SampleCatalog
) -> None:
    overcast = overcast_date(tiny_sample)
    overcast_items = [catalog_copy.item(i) for i in tiny_sample.item_ids if f"{overcast:%Y%m%d}" in i]
    assert overcast_items and all(i.properties["eo:cloud_cover"] > 80 for i in overcast_items)
    instance = DagsterInstance.ephemeral()

    result = tick(catalog_copy.path, instance)

    assert isinstance(result, SensorResult)
    clear = sorted(d.isoformat() for d in tiny_sample.dates if d != overcast)
    expected = {f"{d}|{r}" for d in clear for r in REGIONS}
    assert set(keys_by_partition(result)) == expected
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == DATE_PARTITIONS_NAME and sorted(add.partition_keys) == clear
    for request in result.run_requests:
        date, region = request.partition_key.split("|")
        assert request.run_key.startswith(f"{region}|{date}|")
        ids = request.tags["geofm/scene_ids"].split(",")
        assert ids and all(date.replace("-", "") in i for i in ids)
    # candeias lies on 20LMQ only, jamari on both tiles
    by_key = {r.partition_key: r.tags["geofm/scene_ids"] for r in result.run_requests}
    assert "20LNQ" not in by_key[f"{clear[0]}|candeias"] and "20LNQ" in by_key[f"{clear[0]}|jamari"]

    register(instance, result)
    again = tick(catalog_copy.path, instance, result.cursor)
    assert isinstance(again, SkipReason) and "no new Sentinel-2 item" in (again.skip_message or "")


def test_new_date_and_late_item_for_an_old_date(catalog_copy: CatalogCopy) -> None:
    instance = DagsterInstance.ephemeral()
    first = tick(catalog_copy.path, instance)
    assert isinstance(first, SensorResult)
    register(instance, first)
    keys = keys_by_partition(first)

    new_date = dt.date(2022, 10, 9)
    catalog_copy.publish(
        "S2A_20LMQ_20220929_0_L2A", "S2A_20LMQ_20221009_0_L2A",
        dt.datetime.combine(new_date, OVERPASS), dt.datetime(2022, 10, 9, 19, 42, 29, tzinfo=dt.UTC))
    # 20LNQ of 2020-07-16 reprocessed and published two years late: only jamari lies on 20LNQ
    catalog_copy.publish(
        "S2B_20LNQ_20200716_0_L2A", "S2B_20LNQ_20200716_1_L2A",
        dt.datetime.combine(dt.date(2020, 7, 16), OVERPASS),
        dt.datetime(2022, 10, 12, 8, 0, tzinfo=dt.UTC))

    second = tick(catalog_copy.path, instance, first.cursor)

    assert isinstance(second, SensorResult)
    second_keys = keys_by_partition(second)
    assert set(second_keys) == {"2022-10-09|candeias", "2022-10-09|jamari", "2020-07-16|jamari"}
    (add,) = second.dynamic_partitions_requests
    assert list(add.partition_keys) == ["2022-10-09"]  # 2020-07-16 is registered already
    assert second_keys["2020-07-16|jamari"] != keys["2020-07-16|jamari"]
    late = next(r for r in second.run_requests if r.partition_key == "2020-07-16|jamari")
    assert late.tags["geofm/new_scene_ids"] == "S2B_20LNQ_20200716_1_L2A"
    assert set(late.tags["geofm/scene_ids"].split(",")) == {
        "S2B_20LMQ_20200716_0_L2A", "S2B_20LNQ_20200716_0_L2A", "S2B_20LNQ_20200716_1_L2A"}
    register(instance, second)
    assert isinstance(tick(catalog_copy.path, instance, second.cursor), SkipReason)

    # A restart before the cursor was stored repeats the tick with the same run keys (Dagster
    # skips a run key it has seen); a lost cursor asks again only with keys already used.
    repeat = tick(catalog_copy.path, instance, first.cursor)
    assert isinstance(repeat, SensorResult) and keys_by_partition(repeat) == second_keys
    lost = tick(catalog_copy.path, instance, None)
    assert isinstance(lost, SensorResult)
    assert keys_by_partition(lost) == {**keys, **second_keys}


def test_run_limit_spreads_a_backlog_over_ticks_without_repeats_or_gaps(
    catalog_copy: CatalogCopy, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = DagsterInstance.ephemeral()
    everything = tick(catalog_copy.path, instance)
    assert isinstance(everything, SensorResult)
    monkeypatch.setenv(MAX_RUNS_ENV, "3")
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        result = tick(catalog_copy.path, instance, cursor)
        if isinstance(result, SkipReason):
            break
        assert len(result.run_requests) <= 3
        register(instance, result)
        seen += [r.run_key for r in result.run_requests]
        cursor = result.cursor
    assert len(seen) == len(set(seen))
    assert set(seen) == {r.run_key for r in everything.run_requests}
    assert len(seen) // 3 <= math.ceil(len(everything.run_requests) / 3)


def test_cloud_cover_limit_comes_from_the_environment(
    catalog_copy: CatalogCopy, tiny_sample: SampleCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_CLOUD_COVER_ENV, "100")
    result = tick(catalog_copy.path, DagsterInstance.ephemeral())
    assert isinstance(result, SensorResult)
    assert {f"{overcast_date(tiny_sample)}|{r}" for r in REGIONS} <= set(keys_by_partition(result))
    monkeypatch.setenv(MAX_CLOUD_COVER_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_CLOUD_COVER_ENV):
        tick(catalog_copy.path, DagsterInstance.ephemeral())


def test_raising_the_cloud_limit_requests_the_scenes_skipped_before(
    catalog_copy: CatalogCopy, tiny_sample: SampleCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overcast date (98.5 %) is behind the cursor once the archive is requested at 80 %;
    raising the limit to 100 % gets it, and every other date comes back with the run key it had
    (which Dagster does not run twice). Lowering the limit again requests nothing."""
    instance = DagsterInstance.ephemeral()
    first = tick(catalog_copy.path, instance)
    assert isinstance(first, SensorResult) and first.cursor
    register(instance, first)
    overcast = {f"{overcast_date(tiny_sample)}|{r}" for r in REGIONS}
    assert not overcast & set(keys_by_partition(first))
    assert isinstance(tick(catalog_copy.path, instance, first.cursor), SkipReason)  # caught up

    monkeypatch.setenv(MAX_CLOUD_COVER_ENV, "100")
    raised = tick(catalog_copy.path, instance, first.cursor)
    assert isinstance(raised, SensorResult) and raised.cursor
    keys = keys_by_partition(raised)
    assert overcast <= set(keys)
    before = keys_by_partition(first)
    assert {k: keys[k] for k in before} == before  # same run keys: not run again
    assert raised.dynamic_partitions_requests  # the overcast date is a new partition key
    cursor = SceneCursor.from_json(raised.cursor)
    assert {rc.max_cloud_cover for rc in cursor.regions.values()} == {100.0}
    # and once caught up at 100 %, nothing more; lowering the limit rescans nothing
    assert isinstance(tick(catalog_copy.path, instance, raised.cursor), SkipReason)
    monkeypatch.setenv(MAX_CLOUD_COVER_ENV, "50")
    lowered = tick(catalog_copy.path, instance, raised.cursor)
    assert isinstance(lowered, SensorResult) and not lowered.run_requests and lowered.cursor
    assert {rc.max_cloud_cover for rc in SceneCursor.from_json(lowered.cursor).regions.values()} == {50.0}


def test_a_cursor_from_before_the_limit_was_kept_is_read_and_not_rescanned(catalog_copy: CatalogCopy) -> None:
    instance = DagsterInstance.ephemeral()
    first = tick(catalog_copy.path, instance)
    assert isinstance(first, SensorResult) and first.cursor
    old = json.loads(first.cursor)
    for entry in old["regions"].values():
        del entry["max_cloud_cover"]
    again = tick(catalog_copy.path, instance, json.dumps(old))
    assert isinstance(again, SensorResult) and not again.run_requests and again.cursor
    assert {rc.max_cloud_cover for rc in SceneCursor.from_json(again.cursor).regions.values()} == {80.0}


def test_unavailable_catalog_skips_the_tick_and_keeps_the_cursor(
    catalog_copy: CatalogCopy, tmp_path: Path
) -> None:
    instance = DagsterInstance.ephemeral()
    first = tick(catalog_copy.path, instance)
    assert isinstance(first, SensorResult)
    register(instance, first)
    catalog_copy.publish(
        "S2A_20LMQ_20220929_0_L2A", "S2A_20LMQ_20221009_0_L2A",
        dt.datetime.combine(dt.date(2022, 10, 9), OVERPASS), dt.datetime(2022, 10, 10, tzinfo=dt.UTC))
    moved = catalog_copy.root.rename(tmp_path / "away")  # the endpoint goes down

    down = tick(catalog_copy.path, instance, first.cursor)

    assert isinstance(down, SkipReason)
    assert "unavailable" in (down.skip_message or "") and "cursor kept" in (down.skip_message or "")
    moved.rename(catalog_copy.root)  # back up: the scene missed while down is requested now
    back = tick(catalog_copy.path, instance, first.cursor)
    assert isinstance(back, SensorResult)
    assert set(keys_by_partition(back)) == {f"2022-10-09|{r}" for r in REGIONS}


@pytest.mark.slow  # pystac-client retries the refused connection for about 14 s
def test_unreachable_stac_api_skips_the_tick() -> None:
    api = tick("http://127.0.0.1:9/v1", DagsterInstance.ephemeral(), None)  # nothing listens on port 9
    assert isinstance(api, SkipReason)
    assert "unavailable" in (api.skip_message or "") and "127.0.0.1:9" in (api.skip_message or "")


def test_malformed_item_skips_the_tick_until_it_is_fixed(catalog_copy: CatalogCopy) -> None:
    instance = DagsterInstance.ephemeral()
    first = tick(catalog_copy.path, instance)
    assert isinstance(first, SensorResult)
    register(instance, first)
    catalog_copy.publish(
        "S2A_20LMQ_20220929_0_L2A", "S2A_20LMQ_20221009_0_L2A",
        dt.datetime.combine(dt.date(2022, 10, 9), OVERPASS), dt.datetime(2022, 10, 10, tzinfo=dt.UTC),
        drop_assets=["red"])

    bad = tick(catalog_copy.path, instance, first.cursor)

    assert isinstance(bad, SkipReason)
    message = bad.skip_message or ""
    assert "malformed" in message and "S2A_20LMQ_20221009_0_L2A" in message and "red" in message
    catalog_copy.withdraw("S2A_20LMQ_20221009_0_L2A")
    catalog_copy.publish(
        "S2A_20LMQ_20220929_0_L2A", "S2A_20LMQ_20221009_0_L2A",
        dt.datetime.combine(dt.date(2022, 10, 9), OVERPASS), dt.datetime(2022, 10, 11, tzinfo=dt.UTC))
    fixed = tick(catalog_copy.path, instance, first.cursor)
    assert isinstance(fixed, SensorResult)
    assert set(keys_by_partition(fixed)) == {f"2022-10-09|{r}" for r in REGIONS}

    item_file = next((catalog_copy.root / "sentinel-2-l2a").glob("S2B_20LMQ_20200716_0_L2A/*.json"))
    partial = item_file.with_name(".upload.json")
    partial.write_text('{"type": "Feature", "id": ')  # a truncated upload, renamed into place
    os.replace(partial, item_file)
    broken = tick(catalog_copy.path, instance, fixed.cursor)
    assert isinstance(broken, SkipReason) and "malformed" in (broken.skip_message or "")


def test_cursor_round_trip_and_unreadable_cursor(catalog_copy: CatalogCopy) -> None:
    result = tick(catalog_copy.path, DagsterInstance.ephemeral())
    assert isinstance(result, SensorResult) and result.cursor
    cursor = SceneCursor.from_json(result.cursor)
    assert sorted(cursor.regions) == sorted(REGIONS)
    assert SceneCursor.from_json(cursor.to_json()) == cursor
    assert cursor.to_json() == result.cursor
    for region in cursor.regions.values():
        assert region.published == dt.datetime(2022, 9, 29, 19, 42, 29, tzinfo=dt.UTC)
        assert region.seen and all(v == "2022-09-29T19:42:29+00:00" for v in region.seen.values())
    with pytest.raises(ValueError, match="clear the sensor's cursor"):
        SceneCursor.from_json('{"regions": 3}')


def test_sensor_definition() -> None:
    assert scene_sensor.minimum_interval_seconds == MINIMUM_INTERVAL_SECONDS
    assert scene_sensor.default_status.value == "STOPPED"


def test_published_at_prefers_updated_then_created_then_datetime() -> None:
    when = dt.datetime(2021, 6, 1, 14, 25, 29, tzinfo=dt.UTC)
    item = pystac.Item("x", None, None, when, {})
    assert published_at(item) == when
    item.properties["created"] = "2021-06-02T00:00:00Z"
    assert published_at(item) == dt.datetime(2021, 6, 2, tzinfo=dt.UTC)
    item.properties["updated"] = "2023-01-05T10:00:00Z"
    assert published_at(item) == dt.datetime(2023, 1, 5, 10, tzinfo=dt.UTC)
    item.properties["updated"] = "last tuesday"
    with pytest.raises(MalformedItemError, match="updated"):
        published_at(item)


def test_requested_run_materializes_tiles_and_chips(catalog_copy: CatalogCopy, tmp_path: Path) -> None:
    resources = {"stac": StacResource(catalog=str(catalog_copy.path)),
                  "lake": LocalLakeResource(root=str(tmp_path / "lake"))}
    defs = Definitions(assets=[sentinel2_tiles, chips], sensors=[scene_sensor], resources=resources)
    instance = DagsterInstance.ephemeral()
    sensor_def = defs.resolve_sensor_def("scene_sensor")
    result = sensor_def(build_sensor_context(instance=instance, resources=resources, definitions=defs))
    assert isinstance(result, SensorResult)
    register(instance, result)
    request = next(r for r in result.run_requests if r.partition_key.endswith("|candeias"))

    job = defs.resolve_job_def(sensor_def.job_name)
    run = job.execute_in_process(partition_key=request.partition_key, instance=instance, tags=request.tags)

    assert run.success
    materialized = {e.asset_key.to_user_string() for e in run.get_asset_materialization_events()}
    assert materialized == {"sentinel2_tiles", "chips"}
    date = request.partition_key.split("|")[0]
    assert (tmp_path / "lake" / "chips" / "region=candeias" / f"date={date}" / "chips.parquet").exists()
