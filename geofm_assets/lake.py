"""Data-lake layout and atomic partition writes (no Dagster imports: the embedding worker
uses this too).

Partitions are hive-style folders, ``{root}/{asset}/region={r}/date={d}/``, so DuckDB and
pyarrow read ``{root}/{asset}/region=*/date=*/*.parquet`` directly.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The table each region x date partition of these assets holds (one name per asset).
CHIPS_TABLE = "chips.parquet"
EMBEDDINGS_TABLE = "embeddings.parquet"

SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PartitionKeyError(ValueError):
    """A partition key that is not a valid region/date (or would escape the lake)."""


def checked_segment(kind: str, value: str) -> str:
    if not SAFE_SEGMENT.match(value) or ".." in value:
        raise PartitionKeyError(
            f"{kind} {value!r} is not a valid partition key segment: use letters, digits, "
            "'-', '_' and '.', with no path separators"
        )
    return value


def checked_date(value: str) -> dt.date:
    try:
        parsed = dt.date.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.isoformat() != value:
        raise PartitionKeyError(f"date {value!r} is not a YYYY-MM-DD partition key")
    return parsed


def partition_dir(root: Path, asset: str, region: str, date: str) -> Path:
    """``{root}/{asset}/region={region}/date={date}`` after validating every segment."""
    checked_date(date)
    return (
        Path(root)
        / checked_segment("asset", asset)
        / f"region={checked_segment('region', region)}"
        / f"date={checked_segment('date', date)}"
    )


def region_dir(root: Path, asset: str, region: str) -> Path:
    """``{root}/{asset}/region={region}``: where a region-level asset (over all of a region's
    dates) keeps its files."""
    return Path(root) / checked_segment("asset", asset) / f"region={checked_segment('region', region)}"


@contextmanager
def write_partition(root: Path, asset: str, region: str, date: str) -> Iterator[Path]:
    """Yield an empty staging directory beside the partition; on success it replaces the
    partition whole, on error it is removed and the previous partition stays as it was."""
    with swap_directory(partition_dir(root, asset, region, date)) as staging:
        yield staging


@contextmanager
def write_region(root: Path, asset: str, region: str) -> Iterator[Path]:
    """``write_partition`` for a region-level asset: the staging directory replaces
    ``region_dir(root, asset, region)`` whole on success."""
    with swap_directory(region_dir(root, asset, region)) as staging:
        yield staging


@contextmanager
def swap_directory(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final``; on success it replaces ``final``
    (two renames), on error it is removed and ``final`` stays as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = final.parent / f".staging-{final.name}-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = final.parent / f".replaced-{final.name}-{token}"
    if final.exists():
        os.rename(final, replaced)
    os.rename(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    remove_abandoned(final)


def remove_abandoned(final: Path) -> list[Path]:
    """Remove what writers of ``final`` that were killed mid-write left beside it (their staging
    directories, or a previous version a killed swap had moved aside). Readers never see these:
    they are hidden names outside the hive layout. Called after a successful write of ``final``."""
    removed = []
    for pattern in (f".staging-{final.name}-*", f".replaced-{final.name}-*"):
        for leftover in final.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


# Tables DuckDB exposes as views, one per asset: (view, glob under the lake root).
SQL_VIEWS = (
    ("chips", f"chips/region=*/date=*/{CHIPS_TABLE}"),
    ("embeddings", f"embeddings/region=*/date=*/{EMBEDDINGS_TABLE}"),
    ("embedding_projections", "embedding_projections/region=*/*.parquet"),
    ("similarity_metrics", "similarity_metrics/region=*/*.parquet"),
    ("change_maps", "change_maps/region=*/*.parquet"),
)


def table_glob(root: Path, view: str) -> str:
    """The glob of ``view``'s Parquet files under the lake ``root`` (see ``SQL_VIEWS``)."""
    return str(Path(root) / dict(SQL_VIEWS)[view])


def lake_connection(root: Path):  # -> duckdb.DuckDBPyConnection
    """An in-memory DuckDB with a view per materialized asset table of the lake at ``root``."""
    import duckdb

    con = duckdb.connect()
    for view, pattern in SQL_VIEWS:
        if next(Path(root).glob(pattern), None) is None:
            continue
        path = str(Path(root) / pattern).replace("'", "''")
        con.execute(
            f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{path}', union_by_name = true)"
        )
    return con
