"""A region's embeddings over all its dates, read from the lake in long form.

Every region-level analysis (projections, similarity over time, change maps) starts here:
one row per observation (chip x date where the chip was kept), the chips and dates as sorted
index arrays, and the vectors as one ``[M D]`` float32 matrix.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geofm_assets.lake import EMBEDDINGS_TABLE, checked_date, region_dir
from geofm_assets.models.quality import embedding_matrix


class SeriesError(ValueError):
    """A region's embeddings cannot be read as one time series (mixed models, bad tables)."""


@dataclass(frozen=True, eq=False)
class RegionSeries:
    region: str
    model: str | None  # None when the region has no vectors yet
    checkpoint_digest: str | None
    chip_ids: np.ndarray  # [N] str, sorted
    dates: np.ndarray  # [T] datetime64[D], sorted: the dates with at least one vector
    chip_index: np.ndarray  # [M] int: row of chip_ids for each observation
    date_index: np.ndarray  # [M] int: row of dates for each observation
    vectors: np.ndarray  # [M D] float32
    centroids: np.ndarray  # [N 2] float64 lon, lat of each chip
    geometries: list[bytes]  # [N] WKB footprint (EPSG:4326) of each chip
    partitions_read: int  # date partitions found, empty ones included

    @property
    def n_chips(self) -> int:
        return len(self.chip_ids)

    @property
    def n_dates(self) -> int:
        return len(self.dates)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def observed(self) -> np.ndarray:
        """``[N T]`` bool: whether chip n has a vector on date t."""
        mask = np.zeros((self.n_chips, self.n_dates), bool)
        mask[self.chip_index, self.date_index] = True
        return mask

    def dense(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-observation ``values`` ([M] or [M K]) to ``[N T]`` or ``[N T K]``."""
        shape = (self.n_chips, self.n_dates, *values.shape[1:])
        out = np.full(shape, fill, dtype=np.result_type(values.dtype, np.float32))
        out[self.chip_index, self.date_index] = values
        return out

    def day_numbers(self) -> np.ndarray:
        """``[T]`` float: days since 1970-01-01 of each date."""
        return self.dates.astype("datetime64[D]").astype(np.int64).astype(np.float64)


def embeddings_dir(lake_root: Path, region: str) -> Path:
    return region_dir(lake_root, "embeddings", region)


def load_region_series(lake_root: Path, region: str, dates: list[str] | None = None) -> RegionSeries:
    """Read every materialized ``embeddings`` partition of ``region`` (or only ``dates``).

    All partitions must come from one model and checkpoint: a region embedded partly with one
    encoder and partly with another is an error, not a silently mixed series."""
    base = embeddings_dir(lake_root, region)
    wanted = None if dates is None else {checked_date(d).isoformat() for d in dates}
    tables: list[pa.Table] = []
    found = 0
    for part in sorted(base.glob("date=*")) if base.exists() else []:
        day = part.name.removeprefix("date=")
        if wanted is not None and day not in wanted:
            continue
        path = part / EMBEDDINGS_TABLE
        if not path.exists():
            continue
        found += 1
        table = pq.read_table(
            path, columns=["chip_id", "date", "geometry", "centroid_lon", "centroid_lat",
                           "model", "checkpoint_digest", "embedding"],
        )
        if table.num_rows:
            tables.append(table)
    if not tables:
        return RegionSeries(
            region, None, None, np.array([], dtype=object), np.array([], dtype="datetime64[D]"),
            np.array([], np.int64), np.array([], np.int64), np.zeros((0, 0), np.float32),
            np.zeros((0, 2)), [], found,
        )
    models = sorted({(m, c) for t in tables for m, c in zip(
        t.column("model").to_pylist(), t.column("checkpoint_digest").to_pylist(), strict=True)})
    if len(models) > 1:
        raise SeriesError(
            f"region {region!r} has embeddings from more than one model/checkpoint "
            f"({', '.join(f'{m} {c[:12]}' for m, c in models)}): materialize its embeddings again "
            "with one encoder before analysing the series"
        )
    dims = {t.schema.field("embedding").type.list_size for t in tables}
    if len(dims) > 1:
        raise SeriesError(f"region {region!r} has embeddings of different sizes {sorted(dims)}")
    table = pa.concat_tables(tables)
    chip_col = np.asarray(table.column("chip_id").to_pylist(), dtype=object)
    date_col = np.asarray(table.column("date").to_numpy(), dtype="datetime64[D]")
    chip_ids, chip_index = np.unique(chip_col, return_inverse=True)
    day_values, date_index = np.unique(date_col, return_inverse=True)
    first = np.zeros(len(chip_ids), np.int64)
    first[chip_index[::-1]] = np.arange(len(chip_index))[::-1]
    lon = table.column("centroid_lon").to_numpy()
    lat = table.column("centroid_lat").to_numpy()
    geoms = table.column("geometry").to_pylist()
    model, digest = models[0]
    return RegionSeries(
        region=region, model=model, checkpoint_digest=digest,
        chip_ids=chip_ids, dates=day_values,
        chip_index=chip_index.astype(np.int64), date_index=date_index.astype(np.int64),
        vectors=embedding_matrix(table), centroids=np.stack([lon[first], lat[first]], axis=1),
        geometries=[geoms[i] for i in first], partitions_read=found,
    )


def as_dates(values: np.ndarray) -> list[dt.date]:
    return [d.item() for d in values.astype("datetime64[D]")]


# --- Spatial features: a grid of cells inside each chip -----------------------------------------
SPATIAL_FILE = "spatial.npy"  # the embedding worker's file names (geofm_assets.workers.embed)
SPATIAL_VALID_FILE = "spatial_valid.npy"


@dataclass(frozen=True, eq=False)
class SpatialPartition:
    """One date's cell features, rows in the embeddings table's order (memory-mapped)."""

    date: np.datetime64  # [D]
    chip_ids: np.ndarray  # [n] str
    features: np.ndarray  # [n g g D] float16, memory-mapped
    clear: np.ndarray  # [n g g] float16: clear-pixel fraction of each cell


@dataclass(frozen=True, eq=False)
class RegionSpatial:
    """A region's cell features over its dates (``load_region_spatial``)."""

    region: str
    grid: int  # g: cells per chip side (0 when no partition has spatial features)
    dim: int
    partitions: list[SpatialPartition]  # sorted by date
    missing: list[str]  # dates with an embeddings table but no spatial features

    @property
    def n_cells(self) -> int:
        return self.grid * self.grid


def load_region_spatial(lake_root: Path, region: str, dates: list[str] | None = None) -> RegionSpatial:
    """The ``spatial.npy`` / ``spatial_valid.npy`` files of every ``embeddings`` partition of
    ``region`` (or only ``dates``), memory-mapped, with the dates that have a table but no
    spatial features listed in ``missing`` (the caller decides whether that is an error).

    All partitions must share one grid and width."""
    base = embeddings_dir(lake_root, region)
    wanted = None if dates is None else {checked_date(d).isoformat() for d in dates}
    parts: list[SpatialPartition] = []
    missing: list[str] = []
    shapes: set[tuple[int, int]] = set()
    for part in sorted(base.glob("date=*")) if base.exists() else []:
        day = part.name.removeprefix("date=")
        if (wanted is not None and day not in wanted) or not (part / EMBEDDINGS_TABLE).exists():
            continue
        table = pq.read_table(part / EMBEDDINGS_TABLE, columns=["chip_id"])
        if not (part / SPATIAL_FILE).exists() or not (part / SPATIAL_VALID_FILE).exists():
            missing.append(day)
            continue
        features = np.load(part / SPATIAL_FILE, mmap_mode="r")  # [n g g D]
        clear = np.load(part / SPATIAL_VALID_FILE)  # [n g g]
        n = table.num_rows
        if features.ndim != 4 or features.shape[0] != n or clear.shape != features.shape[:3]:
            raise SeriesError(
                f"{part}: {SPATIAL_FILE} {features.shape} / {SPATIAL_VALID_FILE} {clear.shape} do not "
                f"match the table's {n} rows as [N g g D] / [N g g]: materialize these embeddings again"
            )
        shapes.add((int(features.shape[1]), int(features.shape[3])))
        parts.append(SpatialPartition(
            np.datetime64(day, "D"), np.asarray(table.column("chip_id").to_pylist(), dtype=object),
            features, clear,
        ))
    if len(shapes) > 1:
        raise SeriesError(
            f"region {region!r} has spatial features of different (grid, dim) {sorted(shapes)}: "
            "materialize its embeddings again with one spatial_grid"
        )
    grid, dim = next(iter(shapes)) if shapes else (0, 0)
    return RegionSpatial(region, grid, dim, parts, missing)
