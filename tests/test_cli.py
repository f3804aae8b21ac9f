"""The `geofm` command on the tiny sample, against a temporary DAGSTER_HOME."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from geofm_assets.cli import main
from geofm_assets.partitions import DATE_PARTITIONS_NAME


@pytest.fixture
def cli_env(dagster_home, tiny_sample, monkeypatch):
    monkeypatch.setenv("GEOFM_STAC_CATALOG", str(tiny_sample.catalog_path))
    return dagster_home


def test_dates_sync_add_list_and_materialize(cli_env, tiny_sample, capsys):
    assert main(["dates", "sync"]) == 0
    assert f"registered {len(tiny_sample.dates)} new date(s)" in capsys.readouterr().out
    assert main(["dates", "add", "2019-01-01"]) == 0
    assert main(["dates", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "2019-01-01" in listed and tiny_sample.dates[0].isoformat() in listed

    date = tiny_sample.dates[0].isoformat()
    assert main(["materialize", "--region", "candeias", "--date", date]) == 0
    out = capsys.readouterr().out
    assert f"{date}|candeias" in out and "ok" in out
    table = pq.read_table(cli_env / "lake" / "chips" / "region=candeias" / f"date={date}" / "chips.parquet")
    assert table.num_rows > 0
    # the run is recorded on the instance in DAGSTER_HOME, as the UI will show it
    instance = DagsterInstance.get()
    assert instance.get_latest_materialization_event(
        __import__("dagster").AssetKey("chips")
    ) is not None
    assert date in instance.get_dynamic_partitions(DATE_PARTITIONS_NAME)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["materialize", "--region", "atlantis", "--date", "2021-06-01"], "unknown region 'atlantis'"),
        (["materialize", "--region", "jamari", "--date", "2021-06-02"], "not a registered partition date"),
        (["materialize", "--region", "jamari", "--date", "../../etc"], "not a YYYY-MM-DD"),
        (["dates", "add", "2021/06/01"], "not a YYYY-MM-DD"),
    ],
)
def test_bad_partition_keys_get_clear_errors(cli_env, capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err


def test_missing_catalog_says_what_to_run(cli_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOFM_STAC_CATALOG", str(tmp_path / "nowhere" / "catalog.json"))
    assert main(["dates", "sync"]) == 2
    assert "geofm sample-data" in capsys.readouterr().err


def test_sample_data_command_writes_a_catalog(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert main(["sample-data", "--size", "tiny", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "catalog.json").exists()
    assert "12 items" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "s")


def test_contiguous_blocks_follow_the_dynamic_partition_order():
    from geofm_assets.cli import contiguous_blocks

    order = ["2021-01-01", "2021-03-01", "2021-02-01", "2021-04-01"]  # a late item's date added last
    assert contiguous_blocks(["2021-01-01", "2021-02-01", "2021-03-01"], order) == [
        ["2021-01-01", "2021-03-01", "2021-02-01"]]
    assert contiguous_blocks(["2021-01-01", "2021-04-01"], order) == [["2021-01-01"], ["2021-04-01"]]


def test_materialize_batches_embeddings_and_the_index_per_region_date_block(cli_env, tiny_sample, capsys):
    assert main(["dates", "sync"]) == 0
    dates = [d.isoformat() for d in tiny_sample.dates[:2]]
    argv = ["materialize", "--region", "candeias",
            "--select", "sentinel2_tiles,chips,embeddings,vector_index"]
    assert main([*argv, "--date", dates[0], "--date", dates[1]]) == 0
    out = capsys.readouterr().out
    for d in dates:  # tiles and chips: one run per partition
        assert f"ok  sentinel2_tiles, chips {d}|candeias" in out
    # embeddings, then the index: one run each over the two dates
    assert f"ok  embeddings {dates[0]}..{dates[1]}|candeias: 2 partitions in one run" in out
    assert f"ok  vector_index {dates[0]}..{dates[1]}|candeias: 2 partitions in one run" in out
    instance = DagsterInstance.get()
    from dagster import AssetKey

    for asset in ("embeddings", "vector_index"):
        records = instance.fetch_materializations(AssetKey(asset), limit=10).records
        assert sorted(r.partition_key for r in records) == [f"{d}|candeias" for d in dates]
