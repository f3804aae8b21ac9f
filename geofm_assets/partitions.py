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
# Backfills run one region x date per run. Dagster 1.13 can chunk a multi-partition backfill into
# key ranges, but a run over a range reports one MaterializeResult (its metadata copied to every
# partition) and asset-check results without a partition; the per-partition metadata and checks
# that `geofm status` and the UI show would be lost. One partition per run also confines a
# failure to its partition. Runs queue (2 at a time here) and the embedding step is pooled.
ONE_PARTITION_PER_RUN = BackfillPolicy.multi_run(max_partitions_per_run=1)

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


def region_of(context: AssetExecutionContext) -> Region:
    """The region of a region-level (region-partitioned) asset's partition."""
    return get_region(REGIONS, context.partition_key)
