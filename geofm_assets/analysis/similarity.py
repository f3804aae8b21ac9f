"""How much each chip's embedding moves over time: cosine similarity to a baseline and to the
previous observation (no Dagster imports).

For every observation (chip x date with a vector):

* ``cos_baseline`` — cosine similarity to the chip's baseline, the mean of its vectors over a
  baseline period (by default the first 365 days from the region's first date with vectors).
  A chip never observed in the baseline period has no baseline: null, never NaN.
* ``cos_previous`` — cosine similarity to the chip's previous *observed* date (dates where the
  chip was dropped for cloud or had no scene are skipped), with that ``previous_date``.

Everything is computed at once over the long-form ``[M D]`` matrix (sparse indicator products
and row-wise dot products): no per-chip Python loop.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import sparse

from geofm_assets.analysis.series import RegionSeries, as_dates

SIMILARITY_TABLE = "similarity.parquet"
DEFAULT_BASELINE_DAYS = 365
NORM_EPS = 1e-12


class SimilarityError(ValueError):
    """Similarity inputs or parameters that cannot be used (say which and what to do)."""


@dataclass(frozen=True)
class BaselinePeriod:
    start: dt.date
    end: dt.date  # inclusive
    source: str  # "default" (first DEFAULT_BASELINE_DAYS days) or "config"

    def contains(self, days: np.ndarray) -> np.ndarray:
        """``[K]`` bool for ``days`` ``[K]`` datetime64[D]."""
        return (days >= np.datetime64(self.start, "D")) & (days <= np.datetime64(self.end, "D"))

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "source": self.source}


def _config_date(name: str, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise SimilarityError(f"{name} {value!r} is not an ISO date: give YYYY-MM-DD") from None


def baseline_period(
    first_date: dt.date | None,
    start: str | None = None,
    end: str | None = None,
    days: int = DEFAULT_BASELINE_DAYS,
) -> BaselinePeriod | None:
    """The baseline period: ``start``..``end`` (inclusive ISO dates) where given, otherwise
    ``days`` days from ``first_date`` (the region's first date). None when nothing fixes a
    start (no ``start`` and no data)."""
    if days < 1:
        raise SimilarityError(f"baseline days must be at least 1, got {days}")
    if start is None and first_date is None:
        return None
    begin = _config_date("baseline_start", start) if start is not None else first_date
    assert begin is not None
    finish = _config_date("baseline_end", end) if end is not None else begin + dt.timedelta(days=days - 1)
    if finish < begin:
        raise SimilarityError(
            f"baseline period ends ({finish}) before it starts ({begin}): set baseline_end on or "
            "after baseline_start"
        )
    source = "config" if start is not None or end is not None else "default"
    return BaselinePeriod(begin, finish, source)


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vectors`` ``[M D]`` scaled to unit length (``[M D]`` float32) and ``[M]`` bool valid:
    finite with a non-zero norm (invalid rows are left zero)."""
    finite = np.isfinite(vectors).all(axis=1)  # [M]
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)  # [M]
    valid = finite & (norms > NORM_EPS)
    unit = np.zeros(vectors.shape, np.float32)
    unit[valid] = vectors[valid] / norms[valid, None]
    return unit, valid


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[K]`` dot products of unit rows ``a`` ``[K D]`` and ``b`` ``[K D]``, clipped to [-1, 1]
    (rounding can put a unit-vector dot product a hair past 1)."""
    return np.clip(np.einsum("kd,kd->k", a, b, dtype=np.float64), -1.0, 1.0).astype(np.float32)


def cosine_to_baseline(
    vectors: np.ndarray, chip_index: np.ndarray, n_chips: int, member: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each observation to its chip's baseline: the mean of the chip's vectors where
    ``member`` is true.

    vectors ``[M D]``, chip_index ``[M]`` int, member ``[M]`` bool (invalid vectors are never
    members). Returns cos ``[M]`` float32 (NaN where the chip has no baseline or the vector is
    invalid) and the number of baseline observations of each chip ``[N]`` int64."""
    unit, valid = unit_rows(vectors)
    rows = np.flatnonzero(member & valid)  # [B]
    counts = np.bincount(chip_index[rows], minlength=n_chips).astype(np.int64)  # [N]
    indicator = sparse.csr_matrix(
        (np.ones(len(rows), np.float32), (chip_index[rows], rows)), shape=(n_chips, len(vectors))
    )  # [N M]
    sums = np.asarray(indicator @ np.where(valid[:, None], vectors, 0).astype(np.float32))  # [N D]
    baseline_unit, has_baseline = unit_rows(sums)  # [N D], [N]: the mean's direction is the sum's
    cos = np.full(len(vectors), np.nan, np.float32)
    ok = valid & has_baseline[chip_index]  # [M]
    cos[ok] = rowwise_cosine(unit[ok], baseline_unit[chip_index[ok]])
    return cos, counts


def cosine_to_previous(
    vectors: np.ndarray, chip_index: np.ndarray, date_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each observation to the same chip's previous valid observation.

    vectors ``[M D]``, chip_index/date_index ``[M]`` int (date_index orders dates). Returns cos
    ``[M]`` float32 (NaN for a chip's first valid observation and for invalid vectors) and
    ``[M]`` int64, the row of that previous observation (-1 where none)."""
    unit, valid = unit_rows(vectors)
    rows = np.flatnonzero(valid)
    ordered = rows[np.lexsort((date_index[rows], chip_index[rows]))]  # [V] by chip, then date
    same_chip = chip_index[ordered[1:]] == chip_index[ordered[:-1]]  # [V-1]
    current, previous = ordered[1:][same_chip], ordered[:-1][same_chip]
    prev_row = np.full(len(vectors), -1, np.int64)
    prev_row[current] = previous
    cos = np.full(len(vectors), np.nan, np.float32)
    cos[current] = rowwise_cosine(unit[current], unit[previous])
    return cos, prev_row


@dataclass(frozen=True, eq=False)
class RegionSimilarity:
    series: RegionSeries
    period: BaselinePeriod | None  # None when the region has no vectors and none was configured
    cos_baseline: np.ndarray  # [M] float32, NaN = null
    cos_previous: np.ndarray  # [M] float32, NaN = null
    previous_row: np.ndarray  # [M] int64, -1 = none
    in_baseline: np.ndarray  # [M] bool: the observation is one of its chip's baseline
    n_baseline_obs: np.ndarray  # [N] int64 per chip
    valid: np.ndarray  # [M] bool: finite, non-zero vector
    order: np.ndarray  # [M] int: observations sorted by chip, then date (the table's row order)

    @property
    def status(self) -> str:
        s = self.series
        if len(self.order) == 0:
            return (f"no embeddings for region {s.region!r} yet ({s.partitions_read} date "
                    "partitions read): materialize `embeddings` for its dates first; this table is "
                    "empty until then")
        return f"{len(self.order)} observations of {s.n_chips} chips over {s.n_dates} dates"

    def table(self) -> pa.Table:
        """One row per observation (chip x date), sorted by chip and date; nulls, never NaN."""
        s, o = self.series, self.order
        prev = self.previous_row[o]
        prev_dates = as_dates(s.dates[s.date_index[np.where(prev >= 0, prev, 0)]]) if len(o) else []
        table = pa.table({
            "chip_id": pa.array(s.chip_ids[s.chip_index[o]].tolist(), pa.string()),
            "region": pa.array([s.region] * len(o), pa.string()),
            "date": pa.array(as_dates(s.dates[s.date_index[o]]), pa.date32()),
            "cos_baseline": pa.array(self.cos_baseline[o], pa.float32(), mask=np.isnan(self.cos_baseline[o])),
            "cos_previous": pa.array(self.cos_previous[o], pa.float32(), mask=np.isnan(self.cos_previous[o])),
            "previous_date": pa.array(prev_dates, pa.date32(), mask=prev < 0),
            "in_baseline": pa.array(self.in_baseline[o], pa.bool_()),
            "n_baseline_obs": pa.array(self.n_baseline_obs[s.chip_index[o]], pa.int32()),
        })
        return table.replace_schema_metadata({b"similarity": json.dumps(self.summary()).encode()})

    def summary(self, most_changed: int = 5) -> dict[str, Any]:
        """What was computed, for the table's metadata and the asset's."""
        s = self.series
        observed_chips = np.bincount(s.chip_index, minlength=s.n_chips) > 0  # [N]
        no_baseline = observed_chips & (self.n_baseline_obs == 0)
        finite_b = ~np.isnan(self.cos_baseline)
        ranked = np.argsort(self.cos_baseline[finite_b], kind="stable")
        lowest = np.flatnonzero(finite_b)[ranked][:most_changed]
        return {
            "region": s.region,
            "status": self.status,
            "model": s.model,
            "observations": len(self.order),
            "chips": s.n_chips,
            "dates": [d.isoformat() for d in as_dates(s.dates)],
            "baseline_period": None if self.period is None else self.period.as_dict(),
            "baseline_observations": int(self.in_baseline.sum()),
            "chips_without_baseline": int(no_baseline.sum()),
            "chips_without_baseline_ids": s.chip_ids[no_baseline][:20].tolist(),
            "rows_without_baseline": int((~finite_b).sum()),
            "rows_without_previous": int(np.isnan(self.cos_previous).sum()),
            "invalid_vectors": int((~self.valid).sum()),
            "cos_baseline_mean": float(self.cos_baseline[finite_b].mean()) if finite_b.any() else None,
            "lowest_cos_baseline": [
                {"chip_id": str(s.chip_ids[s.chip_index[i]]),
                 "date": as_dates(s.dates[s.date_index[i : i + 1]])[0].isoformat(),
                 "cos_baseline": round(float(self.cos_baseline[i]), 4)}
                for i in lowest
            ],
        }


def region_similarity(
    series: RegionSeries,
    baseline_start: str | None = None,
    baseline_end: str | None = None,
    baseline_days: int = DEFAULT_BASELINE_DAYS,
) -> RegionSimilarity:
    """Cosine similarity of every observation of ``series`` to its chip's baseline and to its
    previous observed date (see the module docstring)."""
    m = len(series.chip_index)
    keys = series.chip_index * max(series.n_dates, 1) + series.date_index  # [M]
    if len(np.unique(keys)) != m:
        raise SimilarityError(
            f"region {series.region!r} has more than one vector for some chip and date: "
            "materialize the affected embeddings partitions again (their `one_vector_per_kept_chip` "
            "check fails)"
        )
    first = as_dates(series.dates[:1])[0] if series.n_dates else None
    period = baseline_period(first, baseline_start, baseline_end, baseline_days)
    vectors = series.vectors  # [M D]
    _, valid = unit_rows(vectors)
    obs_days = series.dates[series.date_index]  # [M] datetime64[D]
    member = valid & (period.contains(obs_days) if period is not None else np.zeros(m, bool))
    cos_b, counts = cosine_to_baseline(vectors, series.chip_index, series.n_chips, member)
    cos_p, prev = cosine_to_previous(vectors, series.chip_index, series.date_index)
    return RegionSimilarity(
        series=series, period=period, cos_baseline=cos_b, cos_previous=cos_p, previous_row=prev,
        in_baseline=member, n_baseline_obs=counts, valid=valid,
        order=np.lexsort((series.date_index, series.chip_index)),
    )
