"""``vector_index``: a partition's embeddings upserted into the vector store."""

from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetSpec, MetadataValue, multi_asset

from geofm_assets.assets.batched import partition_check_specs, partition_results
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.automation import follows_upstream_partition
from geofm_assets.geo.geoparquet import read_json_metadata
from geofm_assets.lake import EMBEDDINGS_TABLE
from geofm_assets.partitions import INDEX_BATCHES, partition_places, region_date_partitions
from geofm_assets.resources.lake import LakeResource
from geofm_assets.resources.vector_store import VectorStoreResource
from geofm_assets.search.records import records_from_embeddings

INDEX_CHECKS = (
    ("index_count_matches_embeddings", "the store holds exactly the partition's embeddings"),
)


@multi_asset(
    name="vector_index",
    specs=[AssetSpec(
        "vector_index",
        partitions_def=region_date_partitions,
        automation_condition=follows_upstream_partition(),
        deps=[embeddings],
        group_name="search",
        kinds={"faiss", "opensearch"},
        description=(
            "The partition's vectors upserted into the vector store (FAISS files in the lake by "
            "default, OpenSearch k-NN by configuration) with deterministic ids: materializing a "
            "partition again replaces its vectors and never duplicates them. A backfill upserts "
            "a block of partitions in one run, each recorded and checked on its own."
        ),
    )],
    check_specs=partition_check_specs("vector_index", INDEX_CHECKS),
    can_subset=True,  # the per-partition results are logged, not returned
    backfill_policy=INDEX_BATCHES,
)
def vector_index(
    context: AssetExecutionContext, vector_store: VectorStoreResource, lake: LakeResource
) -> Iterator[Any]:
    places = partition_places(context)
    store = vector_store.store()
    recorded = []
    failures: dict[str, str] = {}
    for key, region, date in places:
        path = lake.partition_dir("embeddings", region.name, date.isoformat()) / EMBEDDINGS_TABLE
        if not path.exists():
            failures[key] = (f"embeddings have not been materialized for {date}|{region.name} "
                             f"({path} is missing)")
            continue
        table = pq.read_table(path)
        emb = read_json_metadata(path, "emb") or {}
        model = emb.get("model")
        if not model:
            failures[key] = f"{path} has no `emb` metadata naming its model: materialize embeddings again"
            continue
        written = store.upsert_partition(model, region.name, date, records_from_embeddings(table))
        in_partition = store.count(model, region.name, date)
        metadata: dict[str, Any] = {
            "vectors_written": written,
            "index_size": store.count(model),
            "store": vector_store.kind,
            "model": model,
            "index": MetadataValue.json(store.describe(model)),
            "partitions_in_run": len(places),
        }
        recorded.append((key, metadata, {
            "index_count_matches_embeddings": (
                in_partition == table.num_rows, {"in_index": in_partition, "embeddings": table.num_rows}),
        }))
    yield from partition_results(context, "vector_index", recorded, failures, len(places))
