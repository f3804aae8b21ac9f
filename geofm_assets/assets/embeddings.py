"""``embeddings``: one vector per kept chip, computed by the external worker (Dagster Pipes)."""

from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetSpec, MetadataValue, multi_asset

from geofm_assets.assets.batched import partition_check_specs, partition_results
from geofm_assets.assets.chips import chips
from geofm_assets.automation import follows_upstream_partition
from geofm_assets.geo.geoparquet import read_json_metadata
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE
from geofm_assets.models.quality import check_embeddings
from geofm_assets.partitions import PARTITIONS_TOGETHER, partition_places, region_date_partitions
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


@multi_asset(
    name="embeddings",
    specs=[AssetSpec(
        "embeddings",
        partitions_def=region_date_partitions,
        automation_condition=follows_upstream_partition(),
        deps=[chips],
        group_name="embed",
        kinds={"pytorch", "geoparquet"},
        description=(
            "One embedding per kept chip from the configured encoder (rcf by default; Clay "
            "v1/v1.5 or a transformers backbone by configuration), computed outside Dagster's "
            "process by `python -m geofm_assets.workers.embed` through Dagster Pipes: a local "
            "subprocess, or a GPU task on ECS. GeoParquet with a fixed-size float32 `embedding` "
            "column and the model described in the `emb` metadata key. A backfill embeds a "
            "block of partitions in one run and one worker (the model loaded once); each "
            "partition is recorded and checked on its own."
        ),
    )],
    check_specs=partition_check_specs("embeddings", EMBEDDING_CHECKS),
    can_subset=True,  # the per-partition results are logged, not returned
    backfill_policy=PARTITIONS_TOGETHER,
    pool="gpu",
)
def embeddings(
    context: AssetExecutionContext,
    encoder: EncoderResource,
    embedding_launcher: EmbeddingLauncher,
    lake: LakeResource,
) -> Iterator[Any]:
    places = partition_places(context)
    pairs = [(region.name, date.isoformat()) for _key, region, date in places]
    extras = encoder.worker_extras(lake.uri(), pairs)
    reports = {(r["region"], r["date"]): r for r in embedding_launcher.launch(context, extras)}
    recorded = []
    failures: dict[str, str] = {}
    for key, region, date in places:
        report = reports.get((region.name, date.isoformat()))
        if report is None or not report.get("ok"):
            failures[key] = (report or {}).get("error", "the worker reported nothing for it")
            continue
        chips_table = pq.read_table(lake.partition_dir("chips", region.name, date.isoformat()) / CHIPS_TABLE)
        out = lake.partition_dir("embeddings", region.name, date.isoformat()) / EMBEDDINGS_TABLE
        table = pq.read_table(out)
        emb = read_json_metadata(out, "emb") or {}
        metadata: dict[str, Any] = {
            **report.get("metadata", {}),
            "dagster/row_count": table.num_rows,
            "table": MetadataValue.path(str(out)),
            "emb": MetadataValue.json(emb),
            "partitions_in_run": len(places),
        }
        expected_dim = PUBLISHED_DIMS.get(encoder.model, int(emb.get("dim", -1)))
        outcomes = check_embeddings(chips_table, table, expected_dim)
        checks = {name: (passed, {"details": details}) for name, (passed, details) in outcomes.items()}
        recorded.append((key, metadata, checks))
    yield from partition_results(context, "embeddings", recorded, failures, len(places))
