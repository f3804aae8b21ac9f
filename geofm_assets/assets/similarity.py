"""``similarity_metrics``: per chip x date, cosine similarity to the chip's baseline and to its
previous observed date, over all dates of a region."""

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from geofm_assets.analysis.series import load_region_series
from geofm_assets.analysis.similarity import (
    DEFAULT_BASELINE_DAYS,
    SIMILARITY_TABLE,
    RegionSimilarity,
    region_similarity,
)
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.projections import SERIES_FILES, embeddings_row_count, series_metadata
from geofm_assets.automation import follows_new_dates_of_region
from geofm_assets.partitions import all_dates_of_region, region_of, region_partitions
from geofm_assets.resources.lake import LakeResource

SIMILARITY_CHECKS = (
    ("one_row_per_observation", "a row for every vector in the region's embeddings partitions, no other"),
    ("similarities_in_range", "every non-null cosine is finite and in [-1, 1]; no NaN is stored"),
    ("baseline_nulls_explained", "cos_baseline is null exactly where the chip has no baseline observation"),
    ("previous_date_precedes", "previous_date is earlier than date wherever it is set"),
)


class SimilarityConfig(Config):
    baseline_start: str | None = Field(
        default=None,
        description="first day of the baseline period (YYYY-MM-DD); default: the region's first date",
    )
    baseline_end: str | None = Field(
        default=None,
        description=f"last day of the baseline period (YYYY-MM-DD, inclusive); default: "
                    f"{DEFAULT_BASELINE_DAYS} days from the start",
    )
    baseline_days: int = Field(
        default=DEFAULT_BASELINE_DAYS, ge=1,
        description="length of the baseline period when baseline_end is not given",
    )


def cosine_in_range(column: pa.ChunkedArray) -> tuple[bool, dict[str, Any]]:
    values = pc.drop_null(column).to_numpy(zero_copy_only=False)  # [K] float32
    finite = np.isfinite(values)
    inside = finite & (values >= -1.0) & (values <= 1.0)
    return bool(inside.all()), {
        "non_null": len(values),
        "nan_or_inf": int((~finite).sum()),
        "out_of_range": int((finite & ~inside).sum()),
        "min": float(values.min()) if len(values) else None,
        "max": float(values.max()) if len(values) else None,
    }


def similarity_checks(
    result: RegionSimilarity, table: pa.Table, expected_rows: int
) -> list[AssetCheckResult]:
    ok_b, details_b = cosine_in_range(table.column("cos_baseline"))
    ok_p, details_p = cosine_in_range(table.column("cos_previous"))
    null_b = table.column("cos_baseline").is_null().to_numpy(zero_copy_only=False)  # [M]
    no_base = table.column("n_baseline_obs").to_numpy() == 0  # [M]
    invalid = ~result.valid[result.order]  # [M]
    has_prev = table.column("previous_date").is_valid().to_numpy(zero_copy_only=False)
    date_days = table.column("date").to_numpy().astype("datetime64[D]")
    prev_days = pc.fill_null(table.column("previous_date"), table.column("date")).to_numpy()
    precedes = prev_days.astype("datetime64[D]") < date_days  # [M]
    return [
        AssetCheckResult(
            check_name="one_row_per_observation",
            passed=table.num_rows == expected_rows,
            metadata={"rows": table.num_rows, "embeddings_rows": expected_rows},
        ),
        AssetCheckResult(
            check_name="similarities_in_range",
            passed=ok_b and ok_p,
            metadata={"cos_baseline": MetadataValue.json(details_b),
                      "cos_previous": MetadataValue.json(details_p)},
        ),
        AssetCheckResult(
            check_name="baseline_nulls_explained",
            passed=bool((null_b == (no_base | invalid)).all()),
            metadata={"null_cos_baseline": int(null_b.sum()),
                      "rows_of_chips_without_baseline": int(no_base.sum()),
                      "invalid_vectors": int(invalid.sum())},
        ),
        AssetCheckResult(
            check_name="previous_date_precedes",
            passed=bool(precedes[has_prev].all()),
            metadata={"rows_with_previous": int(has_prev.sum()),
                      "not_earlier": int((~precedes[has_prev]).sum())},
        ),
    ]


@asset(
    partitions_def=region_partitions,
    deps=[AssetDep(embeddings, partition_mapping=all_dates_of_region)],
    automation_condition=follows_new_dates_of_region(),
    group_name="analysis",
    kinds={"numpy", "parquet"},
    description=(
        "Per chip x date: cosine similarity to the chip's baseline (the mean of its embeddings "
        "over a baseline period, by default the first 365 days from the region's first date) and "
        "to its previous observed date. Null, never NaN, where a chip has no baseline or no "
        "earlier observation."
    ),
    check_specs=[AssetCheckSpec(name, asset="similarity_metrics", description=d)
                 for name, d in SIMILARITY_CHECKS],
)
def similarity_metrics(
    context: AssetExecutionContext, config: SimilarityConfig, lake: LakeResource
) -> MaterializeResult:
    region = region_of(context)
    root = lake.readable_root(["embeddings"], region.name, files=SERIES_FILES)
    series = load_region_series(root, region.name)
    result = region_similarity(series, config.baseline_start, config.baseline_end, config.baseline_days)
    table = result.table()
    with lake.write_region("similarity_metrics", region.name) as staging:
        pq.write_table(table, staging / SIMILARITY_TABLE)
    out = lake.region_dir("similarity_metrics", region.name) / SIMILARITY_TABLE
    summary = result.summary()
    period = summary["baseline_period"] or {}
    metadata: dict[str, Any] = {
        **series_metadata(series, table.num_rows),
        "status": summary["status"],
        "table": MetadataValue.path(str(out)),
        "baseline_start": period.get("start", ""),
        "baseline_end": period.get("end", ""),
        "baseline_source": period.get("source", ""),
        "baseline_observations": summary["baseline_observations"],
        "chips_without_baseline": summary["chips_without_baseline"],
        "chips_without_baseline_ids": MetadataValue.json(summary["chips_without_baseline_ids"]),
        "rows_without_previous": summary["rows_without_previous"],
        "invalid_vectors": summary["invalid_vectors"],
        "lowest_cos_baseline": MetadataValue.json(summary["lowest_cos_baseline"]),
    }
    if summary["cos_baseline_mean"] is not None:
        metadata["cos_baseline_mean"] = summary["cos_baseline_mean"]
    return MaterializeResult(
        metadata=metadata,
        check_results=similarity_checks(result, table, embeddings_row_count(root, region.name)),
    )
