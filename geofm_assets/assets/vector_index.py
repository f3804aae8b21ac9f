"""``vector_index``: a partition's embeddings upserted into the vector store."""

from typing import Any

import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from geofm_assets.assets.embeddings import embeddings
from geofm_assets.automation import follows_upstream_partition
from geofm_assets.geo.geoparquet import read_json_metadata
from geofm_assets.lake import EMBEDDINGS_TABLE
from geofm_assets.partitions import ONE_PARTITION_PER_RUN, region_and_date, region_date_partitions
from geofm_assets.resources.lake import LakeResource
from geofm_assets.resources.vector_store import VectorStoreResource
from geofm_assets.search.records import records_from_embeddings


@asset(
    partitions_def=region_date_partitions,
    backfill_policy=ONE_PARTITION_PER_RUN,
    automation_condition=follows_upstream_partition(),
    deps=[embeddings],
    group_name="search",
    kinds={"faiss", "opensearch"},
    description=(
        "The partition's vectors upserted into the vector store (FAISS files in the lake by "
        "default, OpenSearch k-NN by configuration) with deterministic ids: materializing a "
        "partition again replaces its vectors and never duplicates them."
    ),
    check_specs=[
        AssetCheckSpec("index_count_matches_embeddings", asset="vector_index",
                       description="the store holds exactly the partition's embeddings"),
    ],
)
def vector_index(
    context: AssetExecutionContext, vector_store: VectorStoreResource, lake: LakeResource
) -> MaterializeResult:
    region, date = region_and_date(context)
    path = lake.partition_dir("embeddings", region.name, date.isoformat()) / EMBEDDINGS_TABLE
    if not path.exists():
        raise FileNotFoundError(
            f"embeddings have not been materialized for {date}|{region.name} ({path} is missing)"
        )
    table = pq.read_table(path)
    emb = read_json_metadata(path, "emb") or {}
    model = emb.get("model")
    if not model:
        raise ValueError(f"{path} has no `emb` metadata naming its model: materialize embeddings again")
    store = vector_store.store()
    written = store.upsert_partition(model, region.name, date, records_from_embeddings(table))
    in_partition = store.count(model, region.name, date)
    metadata: dict[str, Any] = {
        "vectors_written": written,
        "index_size": store.count(model),
        "store": vector_store.kind,
        "model": model,
        "index": MetadataValue.json(store.describe(model)),
    }
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(
                check_name="index_count_matches_embeddings",
                passed=in_partition == table.num_rows,
                metadata={"in_index": in_partition, "embeddings": table.num_rows},
            )
        ],
    )
