"""A run over several region x date partitions (how backfills run embeddings and vector_index):
one worker for all of them, a materialization and check results per partition, and a partition
that fails fails the run only after the others are recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, materialize

from geofm_assets.assets.chips import chips
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.assets.vector_index import vector_index
from geofm_assets.partitions import partition_key
from geofm_assets.resources.encoder import EncoderResource, SubprocessEmbeddingLauncher
from geofm_assets.resources.vector_store import VectorStoreResource
from geofm_assets.search.faiss_store import FaissStore

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


@pytest.fixture
def batch_resources(resources, tmp_path):
    return {**resources,
            "encoder": EncoderResource(model="rcf", batch_size=8, device="cpu", spatial_grid=0),
            "embedding_launcher": SubprocessEmbeddingLauncher(),
            "vector_store": VectorStoreResource(root=str(tmp_path / "lake" / "vector_index"))}


def partition_events(instance, asset: str) -> dict[str, dict]:
    records = instance.fetch_materializations(AssetKey(asset), limit=100).records
    return {r.partition_key: {k: getattr(v, "value", v) for k, v in r.asset_materialization.metadata.items()}
            for r in records}


def check_statuses(instance, asset: str, check: str) -> dict[str, str]:
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey(asset), check), limit=100)
    return {r.partition: r.status.value for r in history}


def test_a_run_over_a_date_range_embeds_and_indexes_each_partition_once(tiny_sample, instance,
                                                                      batch_resources):
    dates = [d.isoformat() for d in tiny_sample.dates[:3]]
    keys = [str(partition_key(d, "candeias")) for d in dates]
    for key in keys:
        assert materialize([sentinel2_tiles, chips], instance=instance, resources=batch_resources,
                           partition_key=key).success
    # as a backfill runs them: embeddings over the range, then vector_index over it
    for asset in (embeddings, vector_index):
        assert materialize([asset], instance=instance, resources=batch_resources,
                           tags={RANGE_START: keys[0], RANGE_END: keys[-1]}).success
    lake = Path(batch_resources["lake"].root)
    emb = partition_events(instance, "embeddings")
    idx = partition_events(instance, "vector_index")
    assert set(emb) == set(idx) == set(keys)
    for key, date in zip(keys, dates, strict=True):
        assert emb[key]["partitions_in_run"] == emb[key]["worker_partitions"] == 3  # one worker
        assert emb[key]["dagster/row_count"] == emb[key]["count"]  # its own numbers, not a copy
        assert (lake / f"embeddings/region=candeias/date={date}/embeddings.parquet").exists()
    assert len({emb[k]["table"] for k in keys}) == 3
    for check in ("one_vector_per_kept_chip", "vectors_finite", "vectors_nonzero", "dimension_matches_model"):
        assert check_statuses(instance, "embeddings", check) == dict.fromkeys(keys, "SUCCEEDED")
    assert check_statuses(instance, "vector_index", "index_count_matches_embeddings") == \
        dict.fromkeys(keys, "SUCCEEDED")
    store = FaissStore(lake / "vector_index")
    assert store.count("rcf", "candeias") == sum(emb[k]["count"] for k in keys)


def test_a_failed_partition_fails_the_run_after_the_others_are_recorded(tiny_sample, instance,
                                                                      batch_resources):
    dates = [d.isoformat() for d in tiny_sample.dates[:2]]
    keys = [str(partition_key(d, "candeias")) for d in dates]
    # chips for the first date only: the second has nothing to embed
    assert materialize([sentinel2_tiles, chips], instance=instance, resources=batch_resources,
                       partition_key=keys[0]).success
    result = materialize([embeddings], instance=instance, resources=batch_resources,
                         tags={RANGE_START: keys[0], RANGE_END: keys[1]}, raise_on_error=False)
    assert not result.success
    assert set(partition_events(instance, "embeddings")) == {keys[0]}
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.event_specific_data.error.message)
    assert "1 of 2 partitions" in message and keys[1] in message and "materialize chips" in message
    lake = Path(batch_resources["lake"].root)
    assert (lake / f"embeddings/region=candeias/date={dates[0]}/embeddings.parquet").exists()
    assert not (lake / f"embeddings/region=candeias/date={dates[1]}").exists()
