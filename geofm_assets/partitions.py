"""Region x date partitions: keys ``YYYY-MM-DD|region`` (dimensions in alphabetical order)."""

from __future__ import annotations

import datetime as dt

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    StaticPartitionsDefinition,
)

from geofm_assets.geo.regions import Region, get_region, load_regions
from geofm_assets.lake import checked_date
from geofm_assets.paths import regions_file

DATE_PARTITIONS_NAME = "s2_date"

REGIONS: dict[str, Region] = load_regions(regions_file())

date_partitions = DynamicPartitionsDefinition(name=DATE_PARTITIONS_NAME)
region_partitions = StaticPartitionsDefinition(sorted(REGIONS))
region_date_partitions = MultiPartitionsDefinition(
    {"date": date_partitions, "region": region_partitions}
)
# How backfills (and automation) group region x date partitions into runs:
# - ONE_PARTITION_PER_RUN for the CPU steps (tiles, chips, the land-cover maps): runs are cheap to
#   start, run side by side under the queue's limit, and a failure stays in its partition.
# - PARTITIONS_TOGETHER for the GPU step and the index (embeddings, vector_index): one run per
#   contiguous block of the backfill (e.g. a region's date range), so the embedding worker starts
#   and loads its model once (an ECS GPU task takes minutes to start; a compiled Clay ~20 s to
#   compile) and the index is opened once. The pool serializes GPU work anyway. Each partition
#   still gets its own materialization and check results (logged per partition), and a failed
#   partition fails the run only after the others are written.
# Not multi_run(N > 1): Dagster 1.13 chunks a multi-dimensional key range by position and turns
# each chunk back into a rectangle, so a chunk boundary inside a date's row of regions skips
# partitions (N = 3 over 2 regions x 3 dates runs 4 of the 6).
# vector_index batches like embeddings but under a policy object of its own, so that a backfill
# of both makes separate runs (see assets/batched.py); its ranges are never chunked in practice.
ONE_PARTITION_PER_RUN = BackfillPolicy.multi_run(max_partitions_per_run=1)
PARTITIONS_TOGETHER = BackfillPolicy.single_run()
INDEX_BATCHES = BackfillPolicy.multi_run(max_partitions_per_run=1_000_000)

# A region-level asset (partitioned by region only) depends on every date of its region.
all_dates_of_region = MultiToSingleDimensionPartitionMapping(partition_dimension_name="region")


def partition_key(date: dt.date | str, region: str) -> MultiPartitionKey:
    return MultiPartitionKey({"date": str(date), "region": region})


def region_and_date(context: AssetExecutionContext) -> tuple[Region, dt.date]:
    """The partition's region (validated against the regions file) and date."""
    key = context.partition_key
    if not isinstance(key, MultiPartitionKey):
        raise ValueError(f"expected a region x date partition key, got {key!r}")
    dims = key.keys_by_dimension
    return get_region(REGIONS, dims["region"]), checked_date(dims["date"])


def partition_places(context: AssetExecutionContext) -> list[tuple[str, Region, dt.date]]:
    """(key, region, date) of every region x date partition of the run, in key order: one for a
    single-partition run, several for a run over a key range (``PARTITIONS_TOGETHER``)."""
    out = []
    for key in context.partition_keys:
        parsed = key if isinstance(key, MultiPartitionKey) else (
            region_date_partitions.get_partition_key_from_str(key) if "|" in str(key) else None)
        if not isinstance(parsed, MultiPartitionKey):
            raise ValueError(f"expected a region x date partition key, got {key!r}")
        dims = parsed.keys_by_dimension
        out.append((str(key), get_region(REGIONS, dims["region"]), checked_date(dims["date"])))
    return out


def region_of(context: AssetExecutionContext) -> Region:
    """The region of a region-level (region-partitioned) asset's partition."""
    return get_region(REGIONS, context.partition_key)
