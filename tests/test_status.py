"""`geofm status`: what the instance in DAGSTER_HOME holds, per asset and region."""

import json
from pathlib import Path

import pytest
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetSelection,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    asset,
    materialize,
)

from geofm_assets.assets.chips import chips
from geofm_assets.assets.freshness import chips_up_to_date
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.cli import main
from geofm_assets.geo.sample_data import SampleCatalog
from geofm_assets.partitions import (
    DATE_PARTITIONS_NAME,
    REGIONS,
    all_dates_of_region,
    partition_key,
    region_partitions,
)
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource
from geofm_assets.status import collect_status, format_table


@asset(
    partitions_def=region_partitions,
    deps=[AssetDep("chips", partition_mapping=all_dates_of_region)],
    check_specs=[AssetCheckSpec("has_dates", asset="region_summary")],
)
def region_summary(context: AssetExecutionContext) -> MaterializeResult:
    """A region-level asset like embedding_projections: passes its check on candeias only."""
    region = context.partition_key
    return MaterializeResult(check_results=[
        AssetCheckResult(check_name="has_dates", passed=region == "candeias")])


@pytest.fixture
def populated(dagster_home: Path, tiny_sample: SampleCatalog, tmp_path: Path):
    """The instance in DAGSTER_HOME: tiles + chips of the first date materialized for candeias,
    failed for jamari (its catalog is gone)."""
    instance = DagsterInstance.get()
    dates = [d.isoformat() for d in tiny_sample.dates]
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, dates)
    lake = LocalLakeResource(root=str(dagster_home / "lake"))
    good = {"stac": StacResource(catalog=str(tiny_sample.catalog_path)), "lake": lake}
    broken = {"stac": StacResource(catalog=str(tmp_path / "gone" / "catalog.json")), "lake": lake}
    ok = materialize([sentinel2_tiles, chips], instance=instance, resources=good,
                     partition_key=str(partition_key(dates[0], "candeias")))
    failed = materialize([sentinel2_tiles, chips], instance=instance, resources=broken,
                         partition_key=str(partition_key(dates[0], "jamari")), raise_on_error=False)
    assert ok.success and not failed.success
    yield instance, dates, good, failed.run_id
    instance.dispose()


def rows_by(doc: dict, asset_name: str) -> dict[str, dict]:
    return {r["region"]: r for r in doc["rows"] if r["asset"] == asset_name}


@pytest.mark.slow
def test_status_json_reports_newest_missing_failed_and_checks(
    populated, capsys: pytest.CaptureFixture[str]
) -> None:
    _instance, dates, _resources, failed_run = populated

    assert main(["status", "--format", "json"]) == 0

    doc = json.loads(capsys.readouterr().out)
    assert doc["registered_dates"] == len(dates) and doc["regions"] == sorted(REGIONS)
    assets = {r["asset"] for r in doc["rows"]}
    assert {"sentinel2_tiles", "chips", "embeddings", "vector_index"} <= assets
    for name in ("sentinel2_tiles", "chips"):
        rows = rows_by(doc, name)
        candeias, jamari = rows["candeias"], rows["jamari"]
        assert candeias["partitioning"] == "region x date"
        assert (candeias["newest_date"], candeias["materialized"], candeias["expected"]) == (
            dates[0], 1, len(dates))
        assert candeias["missing"] == dates[1:] and candeias["failed"] == [] and not candeias["ok"]
        assert jamari["newest_date"] is None and jamari["materialized"] == 0
        assert jamari["failed"] == [dates[0]] and jamari["missing"] == dates[1:]
    assert rows_by(doc, "sentinel2_tiles")["jamari"]["failed_runs"] == {dates[0]: failed_run}
    checks = {c["check"]: c for c in rows_by(doc, "chips")["candeias"]["checks"]}
    assert set(checks) == {"datacubes_finite", "reflectance_plausible", "chip_ids_on_grid"}
    for c in checks.values():
        assert c["latest_status"] == "passed" and c["latest_partition"] == dates[0]
        assert c["counts"] == {"passed": 1} and c["failing"] == []
    tiles_jamari = rows_by(doc, "sentinel2_tiles")["jamari"]["checks"][0]
    assert tiles_jamari["check"] == "mosaic_is_valid_cog"
    assert tiles_jamari["latest_status"] == "execution_failed" and tiles_jamari["failing"] == [dates[0]]
    embeddings = rows_by(doc, "embeddings")["candeias"]
    assert embeddings["materialized"] == 0 and embeddings["missing"] == dates

    assert main(["status", "--region", "jamari"]) == 0  # the table, one region
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("chips ")]
    assert len(lines) == 1 and "jamari" in lines[0] and dates[0] in lines[0]
    assert "candeias" not in out
    assert main(["status", "--region", "atlantis"]) == 2
    assert "unknown region(s) atlantis" in capsys.readouterr().err


@pytest.mark.slow
def test_region_level_assets_and_whole_asset_checks(populated) -> None:
    instance, _dates, resources, _run = populated
    defs = Definitions(assets=[sentinel2_tiles, chips, region_summary], asset_checks=[chips_up_to_date],
                       resources=resources)
    for region in sorted(REGIONS):
        assert materialize([region_summary], instance=instance, partition_key=region,
                           ).success
    assert materialize([sentinel2_tiles, chips, chips_up_to_date], instance=instance, resources=resources,
                       selection=AssetSelection.checks(chips_up_to_date)).success

    report = collect_status(instance, defs, sorted(REGIONS))

    rows = {(r.asset, r.region): r for r in report.rows}
    summary = rows["region_summary", "candeias"]
    assert summary.partitioning == "region" and (summary.materialized, summary.expected) == (1, 1)
    assert summary.newest_date is None and summary.last_materialized_at is not None
    assert [c.latest_status for c in summary.checks] == ["passed"]
    jamari = rows["region_summary", "jamari"]
    assert jamari.checks[0].latest_status == "failed" and jamari.checks[0].failing == ["jamari"]
    (fresh,) = report.asset_checks["chips"]
    assert fresh.check == "chips_up_to_date" and fresh.latest_status == "warned"
    assert fresh.metadata is not None and fresh.metadata["stale_regions"] == sorted(REGIONS)
    assert rows["chips", "candeias"].checks and all(
        c.check != "chips_up_to_date" for c in rows["chips", "candeias"].checks)
    table = format_table(report)
    assert "has_dates FAILING on jamari" in table
    assert "check chips.chips_up_to_date (whole asset): warned" in table
