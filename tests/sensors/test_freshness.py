"""chips_up_to_date: chips dates against the newest published scene, per region."""

from __future__ import annotations

import datetime as dt

import pytest
from dagster import AssetCheckSeverity, AssetSelection, DagsterInstance, materialize

from geofm_assets.assets.chips import chips
from geofm_assets.assets.freshness import (
    FRESHNESS_LAG_ENV,
    RegionFreshness,
    chips_up_to_date,
    freshness_checks,
    freshness_lag_days,
)
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.geo.sample_data import SampleCatalog
from geofm_assets.partitions import partition_key


def run_check(instance: DagsterInstance, resources: dict[str, object]):
    result = materialize([sentinel2_tiles, chips, chips_up_to_date], instance=instance,
                         resources=resources, selection=AssetSelection.checks(chips_up_to_date))
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_stale_region_fails_the_check_fresh_region_passes(
    instance: DagsterInstance, resources: dict[str, object], tiny_sample: SampleCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    newest, oldest = tiny_sample.dates[-1], tiny_sample.dates[0]
    for date, region in ((newest, "candeias"), (oldest, "jamari")):
        done = materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                           partition_key=str(partition_key(date, region)))
        assert done.success

    evaluation = run_check(instance, resources)

    assert not evaluation.passed and evaluation.severity == AssetCheckSeverity.WARN
    md = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
    assert md["stale_regions"] == ["jamari"] and md["max_lag_days"] == 10
    assert md["regions"]["candeias"] == {
        "newest_scene": newest.isoformat(), "newest_scene_id": md["regions"]["candeias"]["newest_scene_id"],
        "newest_chips": newest.isoformat(), "lag_days": 0, "fresh": True}
    assert md["regions"]["candeias"]["newest_scene_id"].endswith(f"_{newest:%Y%m%d}_0_L2A")
    jamari = md["regions"]["jamari"]
    assert jamari["newest_chips"] == oldest.isoformat() and not jamari["fresh"]
    assert jamari["lag_days"] == (newest - oldest).days
    assert "| jamari |" in md["table"] and "NO" in md["table"]

    monkeypatch.setenv(FRESHNESS_LAG_ENV, str((newest - oldest).days))
    assert run_check(instance, resources).passed


def test_region_without_chips_is_stale_region_without_scenes_is_fresh() -> None:
    day = dt.date(2022, 9, 29)
    assert not RegionFreshness.judge("r", day, "id", None, 10).fresh
    assert RegionFreshness.judge("r", None, None, None, 10).fresh
    assert RegionFreshness.judge("r", day, "id", day - dt.timedelta(days=10), 10).fresh
    late = RegionFreshness.judge("r", day, "id", day - dt.timedelta(days=11), 10)
    assert not late.fresh and late.lag_days == 11


def test_lag_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FRESHNESS_LAG_ENV, raising=False)
    assert freshness_lag_days() == 10
    monkeypatch.setenv(FRESHNESS_LAG_ENV, "3")
    assert freshness_lag_days() == 3
    monkeypatch.setenv(FRESHNESS_LAG_ENV, "-1")
    with pytest.raises(ValueError, match=FRESHNESS_LAG_ENV):
        freshness_lag_days()
    assert freshness_checks == [chips_up_to_date]
