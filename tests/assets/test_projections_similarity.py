"""embedding_projections and similarity_metrics over every date of a region of the tiny lake."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    evaluate_automation_conditions,
    materialize,
)

from geofm_assets.assets.chips import chips
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.projections import embedding_projections
from geofm_assets.assets.similarity import similarity_metrics
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.lake import lake_connection
from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
from geofm_assets.resources.encoder import EncoderResource, SubprocessEmbeddingLauncher
from geofm_assets.resources.lake import LocalLakeResource

PROJECTIONS = "embedding_projections/region={}/projections.parquet"
SIMILARITY = "similarity_metrics/region={}/similarity.parquet"


@pytest.fixture
def lake_root(tiny_lake, tmp_path: Path) -> Path:
    """A writable lake holding the tiny lake's embeddings (the only input of these assets)."""
    root = tmp_path / "lake"
    shutil.copytree(tiny_lake.root / "embeddings", root / "embeddings")
    return root


def run_region(root: Path, instance: DagsterInstance, region: str = "jamari",
               projections: dict[str, Any] | None = None,
               similarity: dict[str, Any] | None = None) -> ExecuteInProcessResult:
    # one t-SNE thread: on a small shared machine OpenMP threads mostly spin
    return materialize(
        [embedding_projections, similarity_metrics], partition_key=region, instance=instance,
        resources={"lake": LocalLakeResource(root=str(root))},
        run_config={"ops": {
            "embedding_projections": {"config": {"tsne_threads": 1, **(projections or {})}},
            "similarity_metrics": {"config": similarity or {}},
        }},
    )


def metadata_of(result: ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.step_materialization_data.materialization.asset_key == AssetKey(asset)]
    return {k: getattr(v, "value", v)
            for k, v in event.step_materialization_data.materialization.metadata.items()}


def checks_of(result: ExecuteInProcessResult) -> dict[tuple[str, str], bool]:
    return {(e.asset_key.to_user_string(), e.check_name): e.passed
            for e in result.get_asset_check_evaluations()}


def embeddings_table(root: Path, region: str) -> pa.Table:
    parts = sorted((root / "embeddings" / f"region={region}").glob("date=*/embeddings.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=["chip_id", "date"]) for p in parts])


@pytest.mark.slow
def test_region_assets_cover_every_observation_and_rerun_replaces(lake_root, instance):
    result = run_region(lake_root, instance)
    assert result.success
    checks = checks_of(result)
    assert len(checks) == 7 and all(checks.values()), checks

    source = embeddings_table(lake_root, "jamari")
    expected_keys = sorted(zip(source.column("chip_id").to_pylist(), source.column("date").to_pylist(),
                               strict=True))
    first_date = min(d for _, d in expected_keys)

    proj = pq.read_table(lake_root / PROJECTIONS.format("jamari"))
    assert proj.column_names == ["chip_id", "region", "date", *(f"pc{i}" for i in range(1, 9)),
                                 "tsne_x", "tsne_y"]
    assert proj.schema.field("date").type == pa.date32()
    keys = list(zip(proj.column("chip_id").to_pylist(), proj.column("date").to_pylist(), strict=True))
    assert keys == expected_keys  # one row per observation, sorted by chip and date
    assert proj.column("tsne_x").null_count == 0  # 46 vectors: below tsne_max_points, no subsample
    md = metadata_of(result, "embedding_projections")
    assert md["dagster/row_count"] == len(expected_keys) and md["chips"] == 12 and md["model"] == "rcf"
    assert md["first_date"] == first_date.isoformat() and md["n_dates"] == len({d for _, d in keys})
    ratio = md["explained_variance_ratio"]
    assert len(ratio) == 8 and sum(ratio) <= 1 and ratio == sorted(ratio, reverse=True)
    assert md["tsne_subsampled"] is False and md["tsne_points"] == len(expected_keys)
    assert md["plot"].startswith("![projections jamari](data:image/png;base64,")
    assert (lake_root / "embedding_projections/region=jamari/projections.png").read_bytes()[:4] == b"\x89PNG"

    sim = pq.read_table(lake_root / SIMILARITY.format("jamari"))
    assert sim.column_names == ["chip_id", "region", "date", "cos_baseline", "cos_previous",
                                "previous_date", "in_baseline", "n_baseline_obs"]
    assert list(zip(sim.column("chip_id").to_pylist(), sim.column("date").to_pylist(),
                    strict=True)) == expected_keys
    in_default_baseline = [d <= first_date + dt.timedelta(days=364) for _, d in expected_keys]
    assert sim.column("in_baseline").to_pylist() == in_default_baseline
    for name in ("cos_baseline", "cos_previous"):
        values = pc.drop_null(sim.column(name)).to_numpy()
        assert np.isfinite(values).all() and (np.abs(values) <= 1).all()
    # a chip's first observation has no previous one; every other has
    assert sim.column("previous_date").null_count == len({c for c, _ in expected_keys})
    smd = metadata_of(result, "similarity_metrics")
    assert smd["baseline_start"] == first_date.isoformat() and smd["baseline_source"] == "default"
    assert smd["baseline_end"] == (first_date + dt.timedelta(days=364)).isoformat()
    assert smd["dagster/row_count"] == len(expected_keys)

    again = run_region(lake_root, instance)
    assert again.success
    assert pq.read_table(lake_root / SIMILARITY.format("jamari")).num_rows == len(expected_keys)
    assert pq.read_table(lake_root / PROJECTIONS.format("jamari")).num_rows == len(expected_keys)
    assert sorted(p.name for p in (lake_root / "embedding_projections").iterdir()) == ["region=jamari"]
    assert sorted(p.name for p in (lake_root / "similarity_metrics/region=jamari").iterdir()) == [
        "similarity.parquet"]

    con = lake_connection(lake_root)
    joined = con.execute(
        "SELECT count(*), count(s.cos_baseline), max(abs(p.pc1)) > 0 "
        "FROM similarity_metrics s JOIN embedding_projections p USING (region, chip_id, date) "
        "WHERE region = 'jamari'"
    ).fetchone()
    assert joined == (len(expected_keys), len(expected_keys), True)
    lowest = con.execute(
        "SELECT chip_id, date FROM similarity_metrics ORDER BY cos_baseline ASC NULLS LAST LIMIT 1"
    ).fetchone()
    assert lowest is not None and (lowest[0], lowest[1]) in set(expected_keys)


@pytest.mark.slow
def test_configuration_subsamples_tsne_and_moves_the_baseline(lake_root, instance):
    first = "2020-07-16"
    result = run_region(
        lake_root, instance,
        projections={"n_components": 3, "tsne_max_points": 10, "seed": 3},
        similarity={"baseline_start": first, "baseline_end": first},
    )
    assert result.success and all(checks_of(result).values())
    proj = pq.read_table(lake_root / PROJECTIONS.format("jamari"))
    assert [c for c in proj.column_names if c.startswith("pc")] == ["pc1", "pc2", "pc3"]
    assert proj.num_rows - proj.column("tsne_x").null_count == 10
    md = metadata_of(result, "embedding_projections")
    assert md["tsne_subsampled"] is True and md["tsne_left_out"] == proj.num_rows - 10

    seen_first = set(pq.read_table(lake_root / f"embeddings/region=jamari/date={first}/embeddings.parquet")
                     .column("chip_id").to_pylist())
    sim = pq.read_table(lake_root / SIMILARITY.format("jamari")).to_pylist()
    all_chips = {r["chip_id"] for r in sim}
    assert seen_first < all_chips  # the tiny lake has chips that were cloudy on the first date
    for row in sim:
        assert (row["cos_baseline"] is None) == (row["chip_id"] not in seen_first)
        assert row["in_baseline"] == (row["date"].isoformat() == first)
    smd = metadata_of(result, "similarity_metrics")
    assert smd["chips_without_baseline"] == len(all_chips - seen_first)
    assert (smd["baseline_start"], smd["baseline_end"], smd["baseline_source"]) == (first, first, "config")


def test_region_without_embeddings_gives_empty_labelled_tables(tmp_path, instance):
    root = tmp_path / "lake"
    result = run_region(root, instance, region="candeias")
    assert result.success and all(checks_of(result).values())
    for asset, path in (("embedding_projections", PROJECTIONS), ("similarity_metrics", SIMILARITY)):
        assert pq.read_table(root / path.format("candeias")).num_rows == 0
        md = metadata_of(result, asset)
        assert md["dagster/row_count"] == 0 and "no embeddings for region 'candeias'" in md["status"]
    assert not (root / "embedding_projections/region=candeias/projections.png").exists()
    assert lake_connection(root).execute("SELECT count(*) FROM similarity_metrics").fetchone() == (0,)


def test_region_assets_load_in_definitions_with_the_pipeline(resources):
    defs = Definitions(
        assets=[sentinel2_tiles, chips, embeddings, embedding_projections, similarity_metrics],
        resources={**resources, "encoder": EncoderResource(model="rcf"),
                   "embedding_launcher": SubprocessEmbeddingLauncher()},
    )
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for key in (AssetKey("embedding_projections"), AssetKey("similarity_metrics")):
        node = graph.get(key)
        assert node.parent_keys == {AssetKey("embeddings")}
        assert node.group_name == "analysis"
        assert node.automation_condition is not None
        assert node.automation_condition.get_label() == "after any new date of the region"


def test_a_new_date_of_a_region_requests_that_region_only():
    defs = Definitions(
        assets=[embeddings, embedding_projections, similarity_metrics],
        resources={"lake": LocalLakeResource(root="unused"), "encoder": EncoderResource(model="rcf"),
                   "embedding_launcher": SubprocessEmbeddingLauncher()},
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, ["2021-06-01", "2022-05-22"])
    first = evaluate_automation_conditions(defs=defs, instance=instance)
    assert first.total_requested == 0
    instance.report_runless_asset_event(
        AssetMaterialization("embeddings", partition=str(partition_key("2022-05-22", "jamari"))))
    second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    for asset in ("embedding_projections", "similarity_metrics"):
        assert second.get_requested_partitions(AssetKey(asset)) == {"jamari"}
    third = evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert third.total_requested == 0
