"""The embedded vector store: Parquet partitions in the lake, searched in memory with FAISS.

Layout under ``root`` (hive style, so DuckDB reads it directly)::

    model={quoted model}/region={quoted region}/date=YYYY-MM-DD/vectors.parquet
    model={quoted model}/_changes                             # rewritten by every upsert
    model={quoted model}/_ann/index.faiss + manifest.json     # only past ``exact_limit`` vectors

The Parquet files are the source of truth (columns chip_id, region, date, lon, lat, vector as a
fixed-size float32 list, L2-normalized; the original model name in the file metadata). Model
and region names are percent-encoded (``hf:org/vit`` -> ``model=hf%3Aorg%2Fvit``), which is
reversible and keeps names like ``clay-v1.5`` readable.

Search loads all of a model's partitions once into one contiguous float32 matrix [N D] whose
rows follow the sorted partition paths, so each (region, date) partition is one contiguous
block of rows and a region / date-range filter becomes a few row ranges: an exact filtered
search is one matrix-vector product per range over views of the matrix (no mask over N rows,
no copy of the subset) and an ``argpartition`` top-k. The loaded matrix is invalidated when a
partition changes: an upsert through any ``FaissStore`` rewrites the model's ``_changes``
marker, which every search checks with one ``stat``; the partition files themselves are
re-listed at most every ``rescan_s`` seconds, so a change made to them by anything else is seen
within that delay.

Exact inner-product search while the model holds at most ``exact_limit`` vectors; beyond that
an ANN index chosen by size: HNSW (M=16, efConstruction=80) up to ``hnsw_limit`` vectors,
IVF-Flat beyond. The ANN index is persisted under ``_ann/`` with a manifest of the partition
files it was built from, reused after a restart and rebuilt when they change. Building it takes
minutes at 1M vectors (HNSW, 768 dims, both threads of a 2-core VM: see bench/README.md), with
faiss's OpenMP threads as the process has them, so call :meth:`FaissStore.build_index`
after upserting; otherwise the first search after a change builds it inside that search
(logged as a warning), or, with ``ann_in_background=True``, in a background thread while
searches are answered exactly. A filtered HNSW search raises efSearch in proportion to
1 / selectivity (``HNSW_EF_PER_MATCH`` x k x N / matching rows; see :func:`hnsw_ef_search`): the
graph walk visits rows of every partition, and only about selectivity x efSearch of the rows it
keeps as candidates match, so a fixed efSearch loses recall as the filter narrows (measured at
1M x 768, M=16, a filter letting 8% of the rows through: recall@10 0.937 at efSearch 80, 0.962
at 96, 0.988 at 128; this rule gives 150). A filtered search is answered exactly over its subset
when the subset holds at most ``exact_limit`` vectors and scanning it costs no more than that
HNSW walk (``HNSW_ROWS_PER_EF`` rows scanned an efSearch step; see :meth:`FaissStore.uses_ann`),
or when the ANN returns fewer than k matching hits: k results always come back when k vectors
match. At 1M vectors and k = 10 the crossover is near 17k matching rows (exact: ~2 ms).

Memory, per loaded model of N vectors of D dims: the matrix, 4 D bytes a vector, plus ~100
bytes for its chip id and coordinates; HNSW adds ~8 M = 128 bytes a vector (its graph) and
shares the matrix (the store searches the index's own float32 storage); IVF-Flat keeps a
second copy in its inverted lists (another 4 D bytes). 1M x 768: ~3.3 GB with HNSW. At most
``max_models`` models are held (least recently searched dropped first).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import faiss as _faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geofm_assets.search.base import (
    SearchFilter,
    SearchHit,
    StoreError,
    VectorRecord,
    VectorStore,
    check_model,
    dimension_mismatch,
    normalize_query,
    nothing_indexed,
    partition_matrix,
)

# faiss's bundled type stubs lack SearchParametersHNSW and the numpy-friendly constructors
faiss: Any = _faiss

log = logging.getLogger(__name__)

PARTITION_FILE = "vectors.parquet"
METADATA_KEY = b"geofm_search"
ANN_DIR = "_ann"
CHANGES_FILE = "_changes"
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # 1M x 768, M=16: recall@10 0.934 unfiltered at 64, >= 0.95 from 96
# a filtered HNSW search walks with efSearch >= HNSW_EF_PER_MATCH x k / selectivity (hnsw_ef_search)
HNSW_EF_PER_MATCH = 1.25
# one efSearch step of an M=16 walk costs about as much as scanning this many rows exactly
# (measured at 1M x 768, one thread: ~2.7 us a step, ~0.125 us a row; both grow with D)
HNSW_ROWS_PER_EF = 24
IVF_NPROBE = 32

# (path relative to the model folder, mtime_ns, size, inode) of every partition file
Fingerprint = tuple[tuple[str, int, int, int], ...]
# (mtime_ns, size, inode) of the model's _changes marker, None while it does not exist
Marker = tuple[int, int, int] | None


def hnsw_ef_search(k: int, fetch: int, n: int, n_match: int) -> int:
    """efSearch of an HNSW search for ``k`` results among ``n_match`` of the index's ``n`` rows,
    fetching ``fetch`` candidates: at least ``HNSW_EF_SEARCH`` and twice ``fetch``, and, for a
    selective filter, ``HNSW_EF_PER_MATCH`` x k / selectivity (selectivity = n_match / n), so
    that the walk's candidate list holds about 1.25 k matching rows however narrow the filter is.
    The store walks the HNSW for a subset only past ``exact_limit`` rows or when the walk costs
    less than scanning the subset (:meth:`FaissStore.uses_ann`), which bounds this."""
    if not 0 < n_match <= n:
        raise StoreError(f"hnsw_ef_search: {n_match} matching rows of {n}; expected 1..{n}")
    by_filter = math.ceil(HNSW_EF_PER_MATCH * k * n / n_match)
    return max(HNSW_EF_SEARCH, 2 * fetch, by_filter)


def encode_name(name: str) -> str:
    """A model or region name as one safe, reversible path component."""
    return quote(name, safe="")


@dataclass(frozen=True)
class _PartitionFile:
    path: Path
    region: str
    date: dt.date
    key: tuple[str, int, int, int]


@dataclass(frozen=True)
class _Selection:
    """The rows a filter lets through: sorted, disjoint row ranges minus excluded rows."""

    ranges: np.ndarray  # [R 2] int64 (start, stop), ascending, disjoint, non-adjacent
    excluded: np.ndarray  # [X] int64, sorted unique rows inside the ranges
    count: int

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """[C] bool: which of ``rows`` [C] the selection holds."""
        r = np.searchsorted(self.ranges[:, 0], rows, side="right") - 1  # [C]
        ok = (r >= 0) & (rows < self.ranges[np.maximum(r, 0), 1])
        if self.excluded.size:
            ok &= ~np.isin(rows, self.excluded)
        return ok

    def mask(self, n: int) -> np.ndarray:
        """[n] bool."""
        out = np.zeros(n, bool)
        for start, stop in self.ranges.tolist():
            out[start:stop] = True
        out[self.excluded] = False
        return out


@dataclass
class _Loaded:
    """A model's vectors in memory, in the order of its sorted partition files (one contiguous
    block of rows a partition); row = faiss id."""

    fingerprint: Fingerprint
    marker: Marker
    checked_at: float  # time.monotonic() of the last full check against the partition files
    vectors: np.ndarray  # [N D] float32, unit rows, C-contiguous
    chip_ids: np.ndarray  # [N] object (str)
    lon: np.ndarray  # [N] float64
    lat: np.ndarray  # [N] float64
    starts: np.ndarray  # [P+1] int64: partition p holds rows starts[p]:starts[p+1]
    block_region: np.ndarray  # [P] int32, into region_names
    block_date: np.ndarray  # [P] datetime64[D]
    region_names: list[str]
    ann: Any = None  # faiss.Index over all rows, when the model is past exact_limit
    ann_info: dict[str, Any] = field(default_factory=dict)
    _chip_rows: dict[int, dict[str, int]] = field(default_factory=dict)  # per partition, lazily

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held for this model: vectors, ids, coordinates and the ANN index."""
        ids = sum(len(c) + 49 for c in self.chip_ids[: min(self.size, 1000)].tolist())
        per_id = ids / max(1, min(self.size, 1000)) + 8
        ann = 0
        if self.ann is not None:  # HNSW: its graph (the vectors are shared); IVF-Flat: a second copy
            hnsw = self.ann_info.get("type") == "hnsw_flat"
            ann = self.size * 2 * HNSW_M * 4 if hnsw else self.vectors.nbytes
        return int(self.vectors.nbytes + per_id * self.size + self.lon.nbytes + self.lat.nbytes + ann)

    def rows_of(self, chip_id: str, date: dt.date) -> list[int]:
        rows = []
        for p in np.flatnonzero(self.block_date == np.datetime64(date, "D")).tolist():
            lookup = self._chip_rows.get(p)
            if lookup is None:
                start, stop = int(self.starts[p]), int(self.starts[p + 1])
                lookup = {c: start + i for i, c in enumerate(self.chip_ids[start:stop].tolist())}
                self._chip_rows[p] = lookup
            if chip_id in lookup:
                rows.append(lookup[chip_id])
        return rows

    def select(self, flt: SearchFilter | None) -> _Selection | None:
        """The rows ``flt`` lets through; None when it lets every row through."""
        if flt is None or flt.is_empty():
            return None
        keep = np.ones(self.block_date.shape[0], bool)  # [P]
        if flt.regions is not None:
            wanted = [i for i, name in enumerate(self.region_names) if name in set(flt.regions)]
            keep &= np.isin(self.block_region, np.asarray(wanted, np.int32))
        if flt.date_from is not None:
            keep &= self.block_date >= np.datetime64(flt.date_from, "D")
        if flt.date_to is not None:
            keep &= self.block_date <= np.datetime64(flt.date_to, "D")
        blocks = np.flatnonzero(keep & (self.starts[1:] > self.starts[:-1]))  # [B] non-empty partitions
        if blocks.size:
            # merge partitions that follow one another into one range
            first = np.concatenate([[True], blocks[1:] != blocks[:-1] + 1])  # [B]
            last = np.concatenate([blocks[1:] != blocks[:-1] + 1, [True]])
            ranges = np.stack([self.starts[blocks[first]], self.starts[blocks[last] + 1]], axis=1)
        else:
            ranges = np.zeros((0, 2), np.int64)
        ranges = ranges.astype(np.int64)  # [R 2]
        count = int((ranges[:, 1] - ranges[:, 0]).sum())
        excluded = np.zeros(0, np.int64)
        if flt.exclude and count:
            rows = np.asarray(sorted({r for c, d in flt.exclude for r in self.rows_of(c, d)}), np.int64)
            sel = _Selection(ranges, np.zeros(0, np.int64), count)
            excluded = rows[sel.contains(rows)] if rows.size else rows
        return _Selection(ranges, excluded, count - int(excluded.size))

    def hit(self, row: int, score: float) -> SearchHit:
        p = int(np.searchsorted(self.starts, row, side="right")) - 1
        return SearchHit(
            chip_id=str(self.chip_ids[row]), date=self.block_date[p].item(),
            region=self.region_names[int(self.block_region[p])], score=float(score),
            lon=float(self.lon[row]), lat=float(self.lat[row]),
        )


def _inner_products(block: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """``out`` [M] = ``block`` [M D] @ ``q`` [D], on the calling thread: faiss's SIMD loop over a
    contiguous block, not BLAS, whose worker threads cost more than this memory-bound product
    (8k x 768 rows: ~1 ms on one core; ~16 ms through 2 OpenBLAS threads on a busy 2-core VM)."""
    if not (block.flags.c_contiguous and block.dtype == np.float32 and q.flags.c_contiguous
            and q.dtype == np.float32 and out.flags.c_contiguous and out.dtype == np.float32):
        np.matmul(block, q, out=out)
        return
    if block.shape[0]:
        faiss.fvec_inner_products_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(block),
                                     block.shape[1], block.shape[0])


def _fetched(k: int, n_match: int, filtered: bool) -> int:
    """ANN candidates fetched for k results: 2 k, 4 k under a filter (re-checked, re-scored)."""
    return min(n_match, k * (4 if filtered else 2))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first (ties: lower position first)."""
    n = scores.shape[0]
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    return part[np.lexsort((part, -scores[part]))]


class FaissStore(VectorStore):
    """See the module docstring. ``exact_limit``: largest model (and largest filtered subset)
    searched exactly (a filtered subset below it goes through HNSW when that is cheaper);
    ``hnsw_limit``: largest model indexed with HNSW (IVF-Flat beyond);
    ``rescan_s``: longest a change to the partition files made by anything but a ``FaissStore``
    goes unseen; ``max_models``: models held in memory at once; ``ann_in_background``: build a
    missing ANN index in a thread (searches answered exactly meanwhile) instead of inside the
    search that finds it missing."""

    def __init__(
        self, root: str | Path, exact_limit: int = 50_000, hnsw_limit: int = 2_000_000,
        rescan_s: float = 2.0, max_models: int = 2, ann_in_background: bool = False,
    ) -> None:
        if max_models < 1:
            raise StoreError(f"max_models must be at least 1, got {max_models}")
        self.root = Path(root)
        self.exact_limit = int(exact_limit)
        self.hnsw_limit = int(hnsw_limit)
        self.rescan_s = float(rescan_s)
        self.max_models = int(max_models)
        self.ann_in_background = bool(ann_in_background)
        self._cache: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.RLock()
        self._builders: dict[str, threading.Thread] = {}

    # -- layout -------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        check_model(model)
        return self.root / f"model={encode_name(model)}"

    def partition_path(self, model: str, region: str, date: dt.date) -> Path:
        return (self.model_dir(model) / f"region={encode_name(region)}" / f"date={date.isoformat()}"
                / PARTITION_FILE)

    def _partitions(self, model: str) -> list[_PartitionFile]:
        base = self.model_dir(model)
        found = []
        for path in sorted(base.glob(f"region=*/date=*/{PARTITION_FILE}")):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by a concurrent upsert
                continue
            region = unquote(path.parent.parent.name.removeprefix("region="))
            try:
                date = dt.date.fromisoformat(path.parent.name.removeprefix("date="))
            except ValueError as exc:
                raise StoreError(f"unexpected partition folder {path.parent}: not date=YYYY-MM-DD") from exc
            key = (path.relative_to(base).as_posix(), st.st_mtime_ns, st.st_size, st.st_ino)
            found.append(_PartitionFile(path, region, date, key))
        return found

    @staticmethod
    def _fingerprint(parts: Sequence[_PartitionFile]) -> Fingerprint:
        return tuple(p.key for p in parts)

    def _marker(self, model: str) -> Marker:
        try:
            st = (self.model_dir(model) / CHANGES_FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _mark_changed(self, model: str) -> None:
        """Rewrite the model's ``_changes`` marker (atomically: a new inode every time)."""
        marker = self.model_dir(model) / CHANGES_FILE
        tmp = marker.with_name(f".{CHANGES_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{dt.datetime.now(dt.UTC).isoformat()} {uuid.uuid4().hex}\n")
            os.replace(tmp, marker)
        finally:
            tmp.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------------------------

    def upsert_partition(
        self, model: str, region: str, date: dt.date, records: Sequence[VectorRecord]
    ) -> int:
        matrix = partition_matrix(model, region, date, records)  # [N D]
        path = self.partition_path(model, region, date)
        with self._lock:
            self._cache.pop(model, None)
            try:
                if not records:
                    if path.exists():
                        path.unlink(missing_ok=True)
                        self._mark_changed(model)
                    return 0
                stored = self.dimension(model)
                if stored is not None and stored != matrix.shape[1]:
                    raise dimension_mismatch(model, matrix.shape[1], stored)
                path.parent.mkdir(parents=True, exist_ok=True)
                table = self._partition_table(model, region, date, records, matrix)
                tmp = path.with_name(f".{PARTITION_FILE}.{uuid.uuid4().hex}.tmp")
                try:
                    pq.write_table(table, tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                self._mark_changed(model)
            except OSError as exc:
                raise StoreError(f"could not write {path} for model {model!r}: {exc}") from exc
        return len(records)

    @staticmethod
    def _partition_table(
        model: str, region: str, date: dt.date, records: Sequence[VectorRecord], matrix: np.ndarray
    ) -> pa.Table:
        n, dim = matrix.shape
        meta = {"model": model, "region": region, "date": date.isoformat(), "dimension": dim,
                "normalized": "l2", "count": n}
        schema = pa.schema(
            [("chip_id", pa.string()), ("region", pa.string()), ("date", pa.date32()),
             ("lon", pa.float64()), ("lat", pa.float64()), ("vector", pa.list_(pa.float32(), dim))],
            metadata={METADATA_KEY: json.dumps(meta).encode()},
        )
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim)
        return pa.Table.from_arrays(
            [pa.array([r.chip_id for r in records], pa.string()), pa.array([region] * n, pa.string()),
             pa.array([date] * n, pa.date32()), pa.array([float(r.lon) for r in records], pa.float64()),
             pa.array([float(r.lat) for r in records], pa.float64()), vectors],
            schema=schema,
        )

    # -- reading ------------------------------------------------------------------------------

    def count(self, model: str, region: str | None = None, date: dt.date | None = None) -> int:
        total = 0
        for p in self._partitions(model):
            if (region is None or p.region == region) and (date is None or p.date == date):
                total += self._read_metadata(p.path).num_rows
        return total

    def dimension(self, model: str) -> int | None:
        parts = self._partitions(model)
        if not parts:
            return None
        return self._dimension_of(parts[0].path)

    @staticmethod
    def _read_metadata(path: Path) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read vector partition {path}: {exc}") from exc

    @staticmethod
    def _dimension_of(path: Path) -> int:
        try:
            vtype = pq.read_schema(path).field("vector").type
        except (OSError, KeyError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read the vector column of {path}: {exc}") from exc
        if not isinstance(vtype, pa.FixedSizeListType):
            raise StoreError(f"{path}: the vector column is {vtype}, not a fixed-size float32 list")
        return int(vtype.list_size)

    def get_vector(self, model: str, chip_id: str, date: dt.date) -> np.ndarray | None:
        loaded = self._load(model)
        if loaded is None:
            return None
        rows = loaded.rows_of(chip_id, date)
        return loaded.vectors[rows[0]].copy() if rows else None

    def _load(self, model: str) -> _Loaded | None:
        """The model's vectors in memory (None when it has none): the cached copy while the
        ``_changes`` marker is unchanged and the last full check is under ``rescan_s`` old,
        else re-listed and re-read when any partition file changed."""
        with self._lock:
            cached = self._cache.get(model)
            marker = self._marker(model)
            if (cached is not None and cached.marker == marker
                    and time.monotonic() - cached.checked_at < self.rescan_s):
                self._cache.move_to_end(model)
                self._ensure_background_ann(model, cached)
                return cached
            for _ in range(5):
                marker = self._marker(model)  # before listing: a later change moves it again
                checked_at = time.monotonic()
                parts = self._partitions(model)
                fingerprint = self._fingerprint(parts)
                if cached is not None and cached.fingerprint == fingerprint:
                    cached.marker, cached.checked_at = marker, checked_at
                    self._cache.move_to_end(model)
                    self._ensure_background_ann(model, cached)
                    return cached
                if not parts:
                    self._cache.pop(model, None)
                    return None
                loaded = self._read_partitions(model, parts, fingerprint, marker, checked_at)
                if self._fingerprint(self._partitions(model)) != fingerprint:
                    continue  # a partition changed while it was read: read again
                self._cache.pop(model, None)  # the old copy can go before the index is built
                if loaded.size > self.exact_limit:
                    self._attach_ann(model, loaded, background=self.ann_in_background)
                self._cache[model] = loaded
                while len(self._cache) > self.max_models:
                    self._cache.popitem(last=False)
                return loaded
            raise StoreError(f"the partitions of model {model!r} keep changing while being read")

    def _read_partitions(
        self, model: str, parts: Sequence[_PartitionFile], fingerprint: Fingerprint, marker: Marker,
        checked_at: float,
    ) -> _Loaded:
        tables: list[pa.Table] = []
        dim: int | None = None
        for p in parts:
            try:
                table = pq.read_table(p.path, columns=["chip_id", "lon", "lat", "vector"])
                meta = json.loads((pq.read_schema(p.path).metadata or {}).get(METADATA_KEY, b"{}"))
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read vector partition {p.path}: {exc}") from exc
            if meta.get("model", model) != model:
                raise StoreError(f"{p.path} holds model {meta.get('model')!r}, not {model!r}")
            vtype = table.schema.field("vector").type
            if not isinstance(vtype, pa.FixedSizeListType):
                raise StoreError(f"{p.path}: the vector column is {vtype}, not a fixed-size list")
            d = int(vtype.list_size)
            if dim is not None and d != dim:
                raise StoreError(
                    f"model {model!r} holds vectors of dimensions {dim} and {d} ({p.path}): "
                    f"re-index that partition"
                )
            dim = d
            tables.append(table)
        assert dim is not None
        sizes = np.asarray([t.num_rows for t in tables], np.int64)  # [P]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [P+1]
        n = int(starts[-1])
        vectors = np.empty((n, dim), np.float32)  # [N D], filled partition by partition
        chip_ids = np.empty(n, object)
        lon = np.empty(n, np.float64)
        lat = np.empty(n, np.float64)
        for table, start, stop in zip(tables, starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            flat = table.column("vector").combine_chunks().flatten()
            vectors[start:stop] = flat.to_numpy(zero_copy_only=False).reshape(stop - start, dim)
            chip_ids[start:stop] = table.column("chip_id").to_pylist()
            lon[start:stop] = table.column("lon").to_numpy()
            lat[start:stop] = table.column("lat").to_numpy()
        tables.clear()
        region_names: list[str] = []
        region_index: dict[str, int] = {}
        for p in parts:
            region_index.setdefault(p.region, len(region_index))
            if len(region_names) < len(region_index):
                region_names.append(p.region)
        return _Loaded(
            fingerprint=fingerprint, marker=marker, checked_at=checked_at,
            vectors=vectors, chip_ids=chip_ids, lon=lon, lat=lat, starts=starts,
            block_region=np.asarray([region_index[p.region] for p in parts], np.int32),
            block_date=np.asarray([np.datetime64(p.date, "D") for p in parts], "datetime64[D]"),
            region_names=region_names,
        )

    # -- the ANN index ------------------------------------------------------------------------

    def index_plan(self, n: int) -> dict[str, Any]:
        """The index a model of ``n`` vectors is searched with, and its parameters."""
        if n <= self.exact_limit:
            return {"type": "exact", "metric": "inner_product"}
        if n <= self.hnsw_limit:
            return {"type": "hnsw_flat", "metric": "inner_product", "M": HNSW_M,
                    "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH,
                    "efSearch_per_match": HNSW_EF_PER_MATCH}
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points a list
        return {"type": "ivf_flat", "metric": "inner_product", "nlist": nlist, "nprobe": IVF_NPROBE}

    def build_index(self, model: str) -> dict[str, Any]:
        """Load the model and make its ANN index current now (read when persisted and current,
        else built and persisted): call it after upserting, so that no search has to. Returns
        the index plan with ``reused`` / ``persisted`` and ``vectors``; ``{"type": "exact"}``
        while the model is small enough to be searched exactly."""
        with self._lock:
            loaded = self._load(model)
            if loaded is None:
                raise nothing_indexed(model)
            if loaded.size > self.exact_limit and loaded.ann is None:
                self._attach_ann(model, loaded, background=False)
            info = dict(loaded.ann_info) if loaded.ann is not None else self.index_plan(loaded.size)
            return {**info, "vectors": loaded.size}

    def _ann_paths(self, model: str) -> tuple[Path, Path]:
        folder = self.model_dir(model) / ANN_DIR
        return folder / "index.faiss", folder / "manifest.json"

    def _manifest_matches(self, model: str, fingerprint: Fingerprint, plan: dict[str, Any], n: int) -> bool:
        index_path, manifest_path = self._ann_paths(model)
        if not (index_path.exists() and manifest_path.exists()):
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            return False
        return (
            manifest.get("model") == model and manifest.get("index") == plan and manifest.get("ntotal") == n
            and [tuple(k) for k in manifest.get("built_from", [])] == list(fingerprint)
        )

    def _attach_ann(self, model: str, loaded: _Loaded, background: bool) -> None:
        """Give ``loaded`` its ANN index: the persisted one when current (read here), else a new
        one, built here (logged: minutes at 1M vectors) or, with ``background``, in a thread
        while searches go exact."""
        plan = self.index_plan(loaded.size)
        index_path, _ = self._ann_paths(model)
        if self._manifest_matches(model, loaded.fingerprint, plan, loaded.size):
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError:
                index = None  # unreadable: rebuilt below
            if index is not None and index.ntotal == loaded.size and index.d == loaded.vectors.shape[1]:
                self._install_ann(loaded, index, {**plan, "reused": True, "persisted": True})
                return
        if background:
            running = self._builders.get(model)
            if running is not None and running.is_alive():
                return  # the thread building the previous version drops its result; next load retries
            loaded.ann_info = {**plan, "state": "building in the background"}
            thread = threading.Thread(target=self._build_in_background, args=(model, loaded, plan),
                                      name=f"faiss-ann-{model}", daemon=True)
            self._builders[model] = thread
            thread.start()
            return
        log.warning("building the %s index of model %r over %d vectors now, inside this call (minutes at "
                    "1M vectors); to keep builds out of searches call FaissStore.build_index after upserts",
                    plan["type"], model, loaded.size)
        self._finish_ann(model, loaded, plan)

    def _ensure_background_ann(self, model: str, loaded: _Loaded) -> None:
        """With ``ann_in_background``, start the build that an older, then still running build
        kept from starting."""
        if not self.ann_in_background or loaded.ann is not None or loaded.size <= self.exact_limit:
            return
        if str(loaded.ann_info.get("state", "")).startswith("build failed"):
            return  # logged once; the next change to the partitions tries again
        running = self._builders.get(model)
        if running is None or not running.is_alive():
            self._attach_ann(model, loaded, background=True)

    def _build_in_background(self, model: str, loaded: _Loaded, plan: dict[str, Any]) -> None:
        try:
            self._finish_ann(model, loaded, plan)
        except Exception as exc:  # reported and kept in ann_info; searches stay exact meanwhile
            loaded.ann_info = {**plan, "state": f"build failed: {exc}"}
            log.error("building the ANN index of model %r failed: %s", model, exc)

    def _finish_ann(self, model: str, loaded: _Loaded, plan: dict[str, Any]) -> None:
        index_path, manifest_path = self._ann_paths(model)
        t0 = time.perf_counter()
        index = self._build_ann(plan, loaded.vectors)
        build_s = round(time.perf_counter() - t0, 2)
        persisted = self._persist_ann(model, index, plan, loaded, index_path, manifest_path)
        with self._lock:
            self._install_ann(loaded, index, {**plan, "reused": False, "persisted": persisted,
                                              "build_s": build_s})

    @staticmethod
    def _install_ann(loaded: _Loaded, index: Any, info: dict[str, Any]) -> None:
        """Attach ``index``; with HNSW, search the index's own float32 storage instead of a
        second copy of the vectors (same values, same row order)."""
        if info["type"] == "hnsw_flat":
            storage = faiss.downcast_index(index.storage)
            view = faiss.rev_swig_ptr(storage.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
            if view.dtype == np.float32 and np.array_equal(view[:: max(1, index.ntotal // 64)],
                                                           loaded.vectors[:: max(1, index.ntotal // 64)]):
                loaded.vectors = view  # alive while loaded.ann holds the index
        loaded.ann = index
        loaded.ann_info = info

    @staticmethod
    def _build_ann(plan: dict[str, Any], vectors: np.ndarray) -> Any:
        n, dim = vectors.shape
        if plan["type"] == "hnsw_flat":
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
            index.add(vectors)
            return index
        index = faiss.index_factory(dim, f"IVF{plan['nlist']},Flat", faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, 256 * int(plan["nlist"]))
        rng = np.random.default_rng(0)
        train = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(train)
        index.add(vectors)
        faiss.extract_index_ivf(index).nprobe = IVF_NPROBE
        return index

    @staticmethod
    def _persist_ann(
        model: str, index: Any, plan: dict[str, Any], loaded: _Loaded, index_path: Path, manifest_path: Path
    ) -> bool:
        manifest = {
            "model": model, "index": plan, "ntotal": loaded.size, "dimension": int(loaded.vectors.shape[1]),
            "built_from": [list(k) for k in loaded.fingerprint],
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        token = uuid.uuid4().hex
        tmp_index = index_path.with_name(f".index.{token}.tmp")
        tmp_manifest = manifest_path.with_name(f".manifest.{token}.tmp")
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            manifest_path.unlink(missing_ok=True)  # never leave a manifest beside another index
            faiss.write_index(index, str(tmp_index))
            os.replace(tmp_index, index_path)
            tmp_manifest.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp_manifest, manifest_path)
            return True
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"the ANN index of model {model!r} could not be saved under {index_path.parent} "
                          f"({exc}); it is kept in memory only", stacklevel=3)
            return False
        finally:
            tmp_index.unlink(missing_ok=True)
            tmp_manifest.unlink(missing_ok=True)

    # -- search -------------------------------------------------------------------------------

    def search(
        self, model: str, vector: np.ndarray, k: int, filter: SearchFilter | None = None
    ) -> list[SearchHit]:
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        loaded = self._load(model)
        if loaded is None:
            raise nothing_indexed(model)
        q = normalize_query(vector, model, int(loaded.vectors.shape[1]))  # [D]
        sel = loaded.select(filter)
        n_match = loaded.size if sel is None else sel.count
        if n_match == 0:
            return []
        k = min(k, n_match)
        if self.uses_ann(loaded, k, n_match, filtered=sel is not None):
            hits = self._ann_search(loaded, q, k, sel)
            if hits is not None:
                return hits
        return self._exact_search(loaded, q, k, sel)

    def uses_ann(self, loaded: _Loaded, k: int, n_match: int, filtered: bool) -> bool:
        """Whether a search for ``k`` of ``n_match`` matching rows goes through the ANN index:
        always past ``exact_limit`` rows; below it only a filtered HNSW search, and only when
        its walk (``HNSW_ROWS_PER_EF`` x efSearch rows' worth) costs less than scanning the
        subset."""
        if loaded.ann is None:
            return False
        if n_match > self.exact_limit:
            return True
        if not filtered or loaded.ann_info.get("type") != "hnsw_flat":
            return False
        ef = hnsw_ef_search(k, _fetched(k, n_match, filtered), loaded.size, n_match)
        return n_match > HNSW_ROWS_PER_EF * ef

    @staticmethod
    def _exact_search(loaded: _Loaded, q: np.ndarray, k: int, sel: _Selection | None) -> list[SearchHit]:
        vectors = loaded.vectors
        if sel is None:
            scores = np.empty(vectors.shape[0], np.float32)  # [N]
            _inner_products(vectors, q, scores)
            best = _top_k(scores, k)
            return [loaded.hit(int(i), float(scores[i])) for i in best]
        lengths = sel.ranges[:, 1] - sel.ranges[:, 0]  # [R]
        offsets = np.concatenate([[0], np.cumsum(lengths)])  # [R+1] position of each range in scores
        scores = np.empty(int(offsets[-1]), np.float32)  # [M]
        for (start, stop), at in zip(sel.ranges.tolist(), offsets[:-1].tolist(), strict=True):
            _inner_products(vectors[start:stop], q, scores[at : at + stop - start])  # a view: no copy
        if sel.excluded.size:
            r = np.searchsorted(sel.ranges[:, 0], sel.excluded, side="right") - 1
            scores[offsets[r] + sel.excluded - sel.ranges[r, 0]] = -np.inf  # never in the top k <= count
        best = _top_k(scores, k)  # positions in scores
        r = np.searchsorted(offsets, best, side="right") - 1
        rows = sel.ranges[r, 0] + best - offsets[r]
        return [loaded.hit(int(row), float(scores[b])) for row, b in zip(rows, best, strict=True)]

    @staticmethod
    def _ann_search(loaded: _Loaded, q: np.ndarray, k: int, sel: _Selection | None) -> list[SearchHit] | None:
        """ANN candidates (oversampled, restricted to the filter), re-checked and re-scored
        exactly; None when fewer than k matching candidates come back."""
        n_match = loaded.size if sel is None else sel.count
        fetch = _fetched(k, n_match, sel is not None)
        selector = None
        bitmap = None
        if sel is not None:
            if sel.ranges.shape[0] == 1 and not sel.excluded.size:
                selector = faiss.IDSelectorRange(int(sel.ranges[0, 0]), int(sel.ranges[0, 1]))
            else:
                bitmap = np.packbits(sel.mask(loaded.size), bitorder="little")  # kept alive for the search
                selector = faiss.IDSelectorBitmap(bitmap)
        if loaded.ann_info["type"] == "hnsw_flat":
            ef = hnsw_ef_search(k, fetch, loaded.size, n_match)
            params: Any = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=IVF_NPROBE)
        _, ids = loaded.ann.search(q[None, :], fetch, params=params)  # [1 fetch]
        del bitmap
        cand = ids[0][ids[0] >= 0]
        if sel is not None:
            cand = cand[sel.contains(cand)]
        cand = np.unique(cand)
        if cand.shape[0] < k:
            return None
        scores = loaded.vectors[cand] @ q  # exact cosine of the candidates
        best = _top_k(scores, k)
        return [loaded.hit(int(cand[i]), float(scores[i])) for i in best]

    # -- metadata -----------------------------------------------------------------------------

    def describe(self, model: str) -> dict[str, Any]:
        parts = self._partitions(model)
        n = sum(self._read_metadata(p.path).num_rows for p in parts)
        plan = self.index_plan(n)
        dates = sorted({p.date for p in parts})
        info: dict[str, Any] = {
            "store": "faiss",
            "root": str(self.root),
            "model": model,
            "model_dir": self.model_dir(model).name,
            "metric": "cosine (inner product of L2-normalized float32 vectors)",
            "vectors": n,
            "partitions": len(parts),
            "regions": sorted({p.region for p in parts}),
            "date_range": [dates[0].isoformat(), dates[-1].isoformat()] if dates else None,
            "dimension": self._dimension_of(parts[0].path) if parts else None,
            "exact_limit": self.exact_limit,
            "hnsw_limit": self.hnsw_limit,
            "index": plan,
        }
        if plan["type"] != "exact":
            info["ann_index_current"] = self._manifest_matches(model, self._fingerprint(parts), plan, n)
        return info
