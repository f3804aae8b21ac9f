"""The vector-store contract shared by every backend: records, filters, hits, errors.

Vectors are L2-normalized on write and the query on read, so an inner product is the cosine
similarity and every store ranks by it, best first.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class StoreError(RuntimeError):
    """Any failure of a vector store, with a message that says what to do about it."""


@dataclass(frozen=True)
class VectorRecord:
    chip_id: str
    date: dt.date
    region: str
    vector: np.ndarray  # [D] float32 (normalized by the store on write)
    lon: float  # chip centroid, EPSG:4326
    lat: float


@dataclass(frozen=True)
class SearchFilter:
    """Which vectors a search may return: regions (any of), an inclusive date range, and
    (chip_id, date) pairs to leave out."""

    regions: tuple[str, ...] | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    exclude: tuple[tuple[str, dt.date], ...] = ()

    def is_empty(self) -> bool:
        return self.regions is None and self.date_from is None and self.date_to is None and not self.exclude

    def matches(self, chip_id: str, date: dt.date, region: str) -> bool:
        if self.regions is not None and region not in self.regions:
            return False
        if self.date_from is not None and date < self.date_from:
            return False
        if self.date_to is not None and date > self.date_to:
            return False
        return (chip_id, date) not in set(self.exclude)


@dataclass(frozen=True)
class SearchHit:
    chip_id: str
    date: dt.date
    region: str
    score: float  # cosine similarity in [-1, 1]
    lon: float
    lat: float


class VectorStore(ABC):
    """Embeddings of one or more models, stored per (model, region, date) partition."""

    @abstractmethod
    def upsert_partition(
        self, model: str, region: str, date: dt.date, records: Sequence[VectorRecord]
    ) -> int:
        """Replace everything stored for (model, region, date) with ``records``; returns
        ``len(records)``. Re-indexing a partition never duplicates; no records empties it."""

    @abstractmethod
    def count(self, model: str, region: str | None = None, date: dt.date | None = None) -> int:
        """How many vectors the store holds for the model (optionally one region and/or date)."""

    @abstractmethod
    def search(
        self, model: str, vector: np.ndarray, k: int, filter: SearchFilter | None = None
    ) -> list[SearchHit]:
        """The ``min(k, matching)`` vectors most cosine-similar to ``vector``, best first."""

    @abstractmethod
    def get_vector(self, model: str, chip_id: str, date: dt.date) -> np.ndarray | None:
        """The stored (normalized) vector of a chip on a date, or None."""

    @abstractmethod
    def dimension(self, model: str) -> int | None:
        """The model's vector dimension in this store, or None when nothing is stored."""

    @abstractmethod
    def describe(self, model: str) -> dict[str, Any]:
        """Store name, index type and parameters and size, for materialization metadata."""


def check_model(model: str) -> None:
    if not isinstance(model, str) or not model.strip():
        raise StoreError(f"a model name must be a non-empty string, got {model!r}")


def normalize_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    """``matrix`` [N D] as C-contiguous float32 rows of unit L2 norm; refuses NaN/inf and zero rows."""
    m = np.ascontiguousarray(matrix, dtype=np.float32)  # [N D]
    if m.ndim != 2:
        raise StoreError(f"{what}: expected a [N D] matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        bad = int(np.flatnonzero(~np.isfinite(m).all(axis=1))[0])
        raise StoreError(f"{what}: row {bad} has NaN or infinite values")
    norms = np.linalg.norm(m, axis=1)  # [N]
    if m.shape[0] and (norms <= 1e-12).any():
        bad = int(np.flatnonzero(norms <= 1e-12)[0])
        raise StoreError(f"{what}: row {bad} is a zero vector, which has no direction to compare")
    return np.ascontiguousarray(m / norms[:, None], dtype=np.float32)


def normalize_query(vector: np.ndarray, model: str, expected_dim: int) -> np.ndarray:
    """The query as one unit-norm float32 vector [D], checked against the model's dimension."""
    q = np.asarray(vector, dtype=np.float32)
    if q.ndim == 2 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 1:
        raise StoreError(f"the query must be one vector [D], got shape {q.shape}")
    if q.shape[0] != expected_dim:
        raise StoreError(
            f"query dimension {q.shape[0]} differs from the dimension {expected_dim} indexed for "
            f"model {model!r}"
        )
    return normalize_rows(q[None, :], "query vector")[0]


def partition_matrix(
    model: str, region: str, date: dt.date, records: Sequence[VectorRecord]
) -> np.ndarray:
    """The records' vectors [N D] normalized, after checking that every record belongs to the
    partition, has one dimension and a unique chip id."""
    check_model(model)
    seen: set[str] = set()
    dims: set[int] = set()
    for r in records:
        if r.region != region or r.date != date:
            raise StoreError(
                f"record {r.chip_id} is for {r.region} {r.date}, not for the partition {region} {date} "
                f"being written"
            )
        if r.chip_id in seen:
            raise StoreError(f"chip {r.chip_id} appears twice in partition {region} {date}")
        seen.add(r.chip_id)
        dims.add(int(np.asarray(r.vector).reshape(-1).shape[0]))
    if len(dims) > 1:
        raise StoreError(
            f"partition {region} {date} of model {model!r} mixes vector dimensions {sorted(dims)}"
        )
    if not records:
        return np.zeros((0, 0), np.float32)
    matrix = np.stack([np.asarray(r.vector, np.float32).reshape(-1) for r in records])  # [N D]
    return normalize_rows(matrix, f"partition {region} {date} of model {model!r}")


def dimension_mismatch(model: str, new_dim: int, stored_dim: int) -> StoreError:
    return StoreError(
        f"vectors of dimension {new_dim} cannot join model {model!r}, which is stored with dimension "
        f"{stored_dim}: index a different model name, or remove the model's vectors first"
    )


def nothing_indexed(model: str) -> StoreError:
    return StoreError(f"nothing is indexed for model {model!r}: materialize vector_index for it first")
