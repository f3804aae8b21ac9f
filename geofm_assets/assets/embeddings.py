"""``embeddings``: one vector per kept chip, computed by the external worker (Dagster Pipes)."""

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

from geofm_assets.assets.chips import chips
from geofm_assets.automation import follows_upstream_partition
from geofm_assets.geo.geoparquet import read_json_metadata
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE
from geofm_assets.models.quality import check_embeddings
from geofm_assets.partitions import ONE_PARTITION_PER_RUN, region_and_date, region_date_partitions
from geofm_assets.resources.encoder import EmbeddingLauncher, EncoderResource
from geofm_assets.resources.lake import LakeResource

# Dimensions fixed by the published architectures; other encoders report their own.
PUBLISHED_DIMS = {"clay-v1": 768, "clay-v1.5": 1024}

EMBEDDING_CHECKS = (
    ("one_vector_per_kept_chip", "a vector for every kept chip and no other"),
    ("vectors_finite", "no NaN or infinite component"),
    ("vectors_nonzero", "no zero vector"),
    ("dimension_matches_model", "vector size is the model's dimension"),
)


@asset(
    partitions_def=region_date_partitions,
    backfill_policy=ONE_PARTITION_PER_RUN,
    automation_condition=follows_upstream_partition(),
    deps=[chips],
    group_name="embed",
    kinds={"pytorch", "geoparquet"},
    pool="gpu",
    description=(
        "One embedding per kept chip from the configured encoder (rcf by default; Clay v1/v1.5 "
        "or a transformers backbone by configuration), computed outside Dagster's process by "
        "`python -m geofm_assets.workers.embed` through Dagster Pipes: a local subprocess, or "
        "a GPU task on ECS. GeoParquet with a fixed-size float32 `embedding` column and the "
        "model described in the `emb` metadata key."
    ),
    check_specs=[AssetCheckSpec(name, asset="embeddings", description=d) for name, d in EMBEDDING_CHECKS],
)
def embeddings(
    context: AssetExecutionContext,
    encoder: EncoderResource,
    embedding_launcher: EmbeddingLauncher,
    lake: LakeResource,
) -> MaterializeResult:
    region, date = region_and_date(context)
    extras = encoder.worker_extras(lake.uri(), region.name, date.isoformat())
    worker = embedding_launcher.launch(context, extras)
    chips_table = pq.read_table(lake.partition_dir("chips", region.name, date.isoformat()) / CHIPS_TABLE)
    out = lake.partition_dir("embeddings", region.name, date.isoformat()) / EMBEDDINGS_TABLE
    table = pq.read_table(out)
    emb = read_json_metadata(out, "emb") or {}
    metadata: dict[str, Any] = {
        **(worker.metadata or {}),
        "dagster/row_count": table.num_rows,
        "table": MetadataValue.path(str(out)),
        "emb": MetadataValue.json(emb),
    }
    expected_dim = PUBLISHED_DIMS.get(encoder.model, int(emb.get("dim", -1)))
    outcomes = check_embeddings(chips_table, table, expected_dim)
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(check_name=name, passed=passed, metadata={"details": details})
            for name, (passed, details) in outcomes.items()
        ],
    )
