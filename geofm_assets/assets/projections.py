"""``embedding_projections``: PCA and t-SNE of a region's embeddings over all its dates."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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

from geofm_assets.analysis.projections import (
    DEFAULT_N_COMPONENTS,
    DEFAULT_TSNE_MAX_POINTS,
    PROJECTIONS_PLOT,
    PROJECTIONS_TABLE,
    RegionProjections,
    project_region,
    projection_plot,
)
from geofm_assets.analysis.series import RegionSeries, load_region_series
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.tiles import md_image
from geofm_assets.automation import follows_new_dates_of_region
from geofm_assets.lake import EMBEDDINGS_TABLE, region_dir
from geofm_assets.partitions import all_dates_of_region, region_of, region_partitions
from geofm_assets.resources.lake import LakeResource

PROJECTION_CHECKS = (
    ("one_row_per_observation", "a row for every vector in the region's embeddings partitions, no other"),
    ("projections_finite", "PCA scores finite; t-SNE coordinates finite for exactly the sampled rows"),
    ("explained_variance_valid", "explained variance ratios in [0, 1], non-increasing, summing to <= 1"),
)


class ProjectionsConfig(Config):
    n_components: int = Field(
        default=DEFAULT_N_COMPONENTS, ge=1,
        description="principal components to keep (capped by the data: vectors - 1 and dimension)",
    )
    tsne_max_points: int = Field(
        default=DEFAULT_TSNE_MAX_POINTS, ge=5,
        description="t-SNE runs on a seeded subsample of this many vectors when the region has more",
    )
    seed: int = Field(default=0, description="seed of the t-SNE subsample, t-SNE and randomized PCA")
    tsne_threads: int | None = Field(
        default=None, ge=1,
        description="cap on t-SNE's threads (unset: all cores; 1 is often faster on a busy machine)",
    )


# What the region-level analyses read: the embeddings tables (``readable_root``'s ``files``).
SERIES_FILES = {"embeddings": [EMBEDDINGS_TABLE]}


def embeddings_row_count(lake_root: Path, region: str) -> int:
    """Rows in every ``embeddings`` partition of ``region`` under ``lake_root`` (a
    ``LakeResource.readable_root``), counted from the Parquet footers (independently of the
    series loader)."""
    base = region_dir(lake_root, "embeddings", region)
    return sum(pq.read_metadata(p).num_rows for p in base.glob(f"date=*/{EMBEDDINGS_TABLE}"))


def series_metadata(series: RegionSeries, rows: int) -> dict[str, Any]:
    """Metadata shared by the region-level analysis assets."""
    dates = [str(d) for d in series.dates.astype("datetime64[D]")]
    return {
        "dagster/row_count": rows,
        "chips": series.n_chips,
        "dates": MetadataValue.json(dates),
        "n_dates": series.n_dates,
        "first_date": dates[0] if dates else "",
        "last_date": dates[-1] if dates else "",
        "date_partitions_read": series.partitions_read,
        "model": series.model or "",
    }


def projection_checks(
    result: RegionProjections, table: pa.Table, expected_rows: int
) -> list[AssetCheckResult]:
    pcs = [c for c in table.column_names if re.fullmatch(r"pc\d+", c)]
    scores = (np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in pcs], axis=1)
              if pcs and table.num_rows else np.zeros((table.num_rows, 0), np.float32))  # [M K]
    pca_ran = result.pca.scores is not None
    tsne_x = table.column("tsne_x")
    tsne_valid = tsne_x.is_valid().to_numpy(zero_copy_only=False)  # [M] bool
    tsne_xy = np.stack([tsne_x.to_numpy(zero_copy_only=False),
                        table.column("tsne_y").to_numpy(zero_copy_only=False)], axis=1)  # [M 2]
    ratio = result.pca.explained_variance_ratio
    return [
        AssetCheckResult(
            check_name="one_row_per_observation",
            passed=table.num_rows == expected_rows,
            metadata={"rows": table.num_rows, "embeddings_rows": expected_rows},
        ),
        AssetCheckResult(
            check_name="projections_finite",
            passed=bool((np.isfinite(scores).all() if pca_ran else True)
                        and np.isfinite(tsne_xy[tsne_valid]).all()
                        and int(tsne_valid.sum()) == result.tsne.n_points),
            metadata={"pca_ran": pca_ran,
                      "non_finite_scores": int((~np.isfinite(scores)).sum()) if pca_ran else 0,
                      "tsne_rows": int(tsne_valid.sum()), "tsne_points": result.tsne.n_points},
        ),
        AssetCheckResult(
            check_name="explained_variance_valid",
            passed=bool(((ratio >= 0) & (ratio <= 1)).all() and (np.diff(ratio) <= 1e-9).all()
                        and ratio.sum() <= 1 + 1e-6),
            metadata={"explained_variance_ratio": MetadataValue.json([float(r) for r in ratio]),
                      "sum": float(ratio.sum())},
        ),
    ]


@asset(
    partitions_def=region_partitions,
    deps=[AssetDep(embeddings, partition_mapping=all_dates_of_region)],
    automation_condition=follows_new_dates_of_region(),
    group_name="analysis",
    kinds={"scikit-learn", "parquet"},
    description=(
        "PCA (fitted on all the region's vectors, every chip x date) and a 2-D t-SNE (seeded, on "
        "a subsample above `tsne_max_points`) of the region's embeddings over all its dates: one "
        "row per chip x date with pc1..pcK, tsne_x, tsne_y (null outside the t-SNE sample), and a "
        "scatter plot coloured by date."
    ),
    check_specs=[AssetCheckSpec(name, asset="embedding_projections", description=d)
                 for name, d in PROJECTION_CHECKS],
)
def embedding_projections(
    context: AssetExecutionContext, config: ProjectionsConfig, lake: LakeResource
) -> MaterializeResult:
    region = region_of(context)
    root = lake.readable_root(["embeddings"], region.name, files=SERIES_FILES)
    series = load_region_series(root, region.name)
    result = project_region(series, config.n_components, config.tsne_max_points, config.seed,
                            config.tsne_threads)
    table = result.table()
    png = projection_plot(result)
    with lake.write_region("embedding_projections", region.name) as staging:
        pq.write_table(table, staging / PROJECTIONS_TABLE)
        if png is not None:
            (staging / PROJECTIONS_PLOT).write_bytes(png)
    out = lake.region_dir("embedding_projections", region.name)
    summary = result.summary()
    metadata: dict[str, Any] = {
        **series_metadata(series, table.num_rows),
        "status": summary["status"],
        "table": MetadataValue.path(str(out / PROJECTIONS_TABLE)),
        "pca_components": summary["pca_components"],
        "explained_variance_ratio": MetadataValue.json(summary["explained_variance_ratio"]),
        "explained_variance_total": summary["explained_variance_total"],
        "pca_skipped": summary["pca_skipped"] or "",
        "tsne_points": summary["tsne_points"],
        "tsne_subsampled": summary["tsne_subsampled"],
        "tsne_left_out": summary["tsne_left_out"],
        "tsne_perplexity": summary["tsne_perplexity"] or 0.0,
        "tsne_skipped": summary["tsne_skipped"] or "",
        "seed": config.seed,
    }
    if png is not None:
        metadata["plot"] = md_image(png, f"projections {region.name}")
        metadata["plot_path"] = MetadataValue.path(str(out / PROJECTIONS_PLOT))
    return MaterializeResult(
        metadata=metadata,
        check_results=projection_checks(result, table, embeddings_row_count(root, region.name)),
    )
