"""vector_index and `geofm search` / `geofm sql` on the tiny sample, through the real assets."""

from __future__ import annotations

import json

import pytest
from dagster import materialize

from geofm_assets import definitions
from geofm_assets.cli import main
from geofm_assets.partitions import partition_key

SEARCH_PATH = [definitions.sentinel2_tiles, definitions.chips, definitions.embeddings,
               definitions.vector_index]


@pytest.fixture
def indexed(dagster_home, tiny_sample, instance, monkeypatch):
    """jamari on two clear dates, materialized through vector_index (rcf, FAISS)."""
    monkeypatch.setenv("GEOFM_STAC_CATALOG", str(tiny_sample.catalog_path))
    resources = definitions.resources_for("local")
    dates = [tiny_sample.dates[0], tiny_sample.dates[1]]
    results = []
    for date in dates:
        results.append(materialize(SEARCH_PATH, instance=instance, resources=resources,
                                   partition_key=str(partition_key(date, "jamari"))))
        assert results[-1].success
    return resources, dates, results


def test_vector_index_is_idempotent_and_checked(indexed, instance):
    resources, dates, results = indexed
    checks = {e.check_name: e.passed for e in results[-1].get_asset_check_evaluations()}
    assert checks["index_count_matches_embeddings"]
    store = resources["vector_store"].store()
    before = store.count("rcf")
    assert before > 0
    again = materialize([definitions.vector_index], instance=instance, resources=resources,
                        partition_key=str(partition_key(dates[0], "jamari")))
    assert again.success
    assert store.count("rcf") == before


def test_search_json_table_and_geojson(indexed, capsys):
    _, dates, _ = indexed
    assert main(["sql", "SELECT chip_id FROM embeddings ORDER BY chip_id LIMIT 1", "--format", "json"]) == 0
    chip = json.loads(capsys.readouterr().out)[0]["chip_id"]

    assert main(["search", "--chip", chip, "--date", str(dates[0]), "--k", "5", "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    scores = [r["score"] for r in answer["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert answer["results"][0]["chip_id"] == chip and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert set(answer["results"][0]) == {"chip_id", "date", "region", "score", "lon", "lat", "thumbnail"}

    assert main(["search", "--chip", chip, "--k", "3", "--exclude-self", "--format", "json"]) == 0
    others = json.loads(capsys.readouterr().out)["results"]
    assert len(others) == 3 and all(r["chip_id"] != chip for r in others)

    assert main(["search", "--chip", chip, "--k", "3", "--from", str(dates[1]), "--format", "geojson"]) == 0
    fc = json.loads(capsys.readouterr().out)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 3
    assert all(f["properties"]["date"] >= str(dates[1]) for f in fc["features"])
    assert fc["features"][0]["geometry"]["type"] == "Polygon"

    assert main(["search", "--chip", chip, "--k", "2"]) == 0
    assert chip in capsys.readouterr().out

    assert main(["sql", f"SELECT centroid_lon, centroid_lat FROM chips WHERE chip_id = '{chip}' "
                 f"AND date = DATE '{dates[0]}'", "--format", "csv"]) == 0
    lon, lat = capsys.readouterr().out.split()[1].split(",")
    assert main(["search", f"--point={lon},{lat}", "--date", str(dates[0]), "--k", "1",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["query"]["chips"][0]["chip_id"] == chip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--chip", "jamari_r0099_c0099", "--k", "3"], "no rcf embedding"),
        (["search", "--chip", "CHIP", "--date", "2019-01-01"], "no rcf embedding on 2019-01-01"),
        (["search", "--chip", "CHIP", "--model", "clay-v1.5"], "no clay-v1.5 embedding"),
        (["search", "--point=-63.8,-9.1"], "--point needs --date"),
    ],
)
def test_search_errors_are_clear(indexed, capsys, argv, message):
    assert main(["sql", "SELECT chip_id FROM embeddings LIMIT 1", "--format", "csv"]) == 0
    chip = capsys.readouterr().out.split()[1]
    code = main([a.replace("CHIP", chip) for a in argv])
    assert code != 0
    assert message in capsys.readouterr().err


def test_sql_over_the_lake(indexed, capsys):
    assert main(["sql", "SELECT count(*) AS n FROM chips", "--format", "csv"]) == 0
    assert int(capsys.readouterr().out.split()[1]) > 0
    assert main(["sql", "SELECT * FROM nowhere"]) == 2
    assert "query failed" in capsys.readouterr().err
