"""The embedded vector store: Parquet partitions in the lake, searched in memory with FAISS.

Layout under ``root`` (hive style, so DuckDB reads it directly)::

    model={quoted model}/region={quoted region}/date=YYYY-MM-DD/vectors.parquet
    model={quoted model}/_ann/index.faiss + manifest.json     # only past ``exact_limit`` vectors

The Parquet files are the source of truth (columns chip_id, region, date, lon, lat, vector as a
fixed-size float32 list, L2-normalized; the original model name in the file metadata). Model
and region names are percent-encoded (``hf:org/vit`` -> ``model=hf%3Aorg%2Fvit``), which is
reversible and keeps names like ``clay-v1.5`` readable.

Search loads all of a model's partitions (cached until any partition file changes) and runs
an exact inner-product search while the model holds at most ``exact_limit`` vectors; beyond
that an ANN index chosen by size: HNSW (M=32) up to ``hnsw_limit`` vectors, IVF-Flat beyond.
The ANN index is persisted under ``_ann/`` with a manifest of the partition files it was
built from, reused after a restart and rebuilt when they change. A filtered search whose
matching subset is small, or for which the ANN returns fewer than k matching hits, is
answered exactly over the subset: k results always come back when k vectors match.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
import uuid
import warnings
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

PARTITION_FILE = "vectors.parquet"
METADATA_KEY = b"geofm_search"
ANN_DIR = "_ann"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32

# (path relative to the model folder, mtime_ns, size, inode) of every partition file
Fingerprint = tuple[tuple[str, int, int, int], ...]


def encode_name(name: str) -> str:
    """A model or region name as one safe, reversible path component."""
    return quote(name, safe="")


@dataclass(frozen=True)
class _PartitionFile:
    path: Path
    region: str
    date: dt.date
    key: tuple[str, int, int, int]


@dataclass
class _Loaded:
    """A model's vectors in memory, in the order of its sorted partition files; row = faiss id."""

    fingerprint: Fingerprint
    vectors: np.ndarray  # [N D] float32, unit rows
    chip_ids: np.ndarray  # [N] object (str)
    dates: np.ndarray  # [N] datetime64[D]
    region_codes: np.ndarray  # [N] int32, into region_names
    region_names: list[str]
    lon: np.ndarray  # [N] float64
    lat: np.ndarray  # [N] float64
    ann: Any = None  # faiss.Index over all rows, when the model is past exact_limit
    ann_info: dict[str, Any] = field(default_factory=dict)
    _rows: dict[tuple[str, dt.date], list[int]] | None = None

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    def rows_of(self, chip_id: str, date: dt.date) -> list[int]:
        if self._rows is None:
            rows: dict[tuple[str, dt.date], list[int]] = {}
            for i, (c, d) in enumerate(zip(self.chip_ids.tolist(), self.dates.tolist(), strict=True)):
                rows.setdefault((c, d), []).append(i)
            self._rows = rows
        return self._rows.get((chip_id, date), [])

    def hit(self, row: int, score: float) -> SearchHit:
        return SearchHit(
            chip_id=str(self.chip_ids[row]), date=self.dates[row].item(),
            region=self.region_names[int(self.region_codes[row])], score=float(score),
            lon=float(self.lon[row]), lat=float(self.lat[row]),
        )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first (ties: lower position first)."""
    n = scores.shape[0]
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    return part[np.lexsort((part, -scores[part]))]


class FaissStore(VectorStore):
    def __init__(
        self, root: str | Path, exact_limit: int = 50_000, hnsw_limit: int = 2_000_000
    ) -> None:
        self.root = Path(root)
        self.exact_limit = int(exact_limit)
        self.hnsw_limit = int(hnsw_limit)
        self._cache: dict[str, _Loaded] = {}
        self._lock = threading.RLock()

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
                    path.unlink(missing_ok=True)
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
        """The model's vectors in memory (None when it has none), reloaded when any partition
        file changed since the cached copy was read."""
        with self._lock:
            for _ in range(5):
                parts = self._partitions(model)
                fingerprint = self._fingerprint(parts)
                cached = self._cache.get(model)
                if cached is not None and cached.fingerprint == fingerprint:
                    return cached
                if not parts:
                    self._cache.pop(model, None)
                    return None
                loaded = self._read_partitions(model, parts, fingerprint)
                if self._fingerprint(self._partitions(model)) != fingerprint:
                    continue  # a partition changed while it was read: read again
                if loaded.size > self.exact_limit:
                    self._attach_ann(model, loaded)
                self._cache[model] = loaded
                return loaded
            raise StoreError(f"the partitions of model {model!r} keep changing while being read")

    def _read_partitions(
        self, model: str, parts: Sequence[_PartitionFile], fingerprint: Fingerprint
    ) -> _Loaded:
        blocks: list[np.ndarray] = []
        chip_ids: list[np.ndarray] = []
        dates: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        lon: list[np.ndarray] = []
        lat: list[np.ndarray] = []
        region_names: list[str] = []
        region_index: dict[str, int] = {}
        dim: int | None = None
        for p in parts:
            try:
                table = pq.read_table(p.path)
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read vector partition {p.path}: {exc}") from exc
            meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
            if meta.get("model", model) != model:
                raise StoreError(f"{p.path} holds model {meta.get('model')!r}, not {model!r}")
            vcol = table.column("vector").combine_chunks()
            if not isinstance(vcol.type, pa.FixedSizeListType):
                raise StoreError(f"{p.path}: the vector column is {vcol.type}, not a fixed-size list")
            d = int(vcol.type.list_size)
            if dim is not None and d != dim:
                raise StoreError(
                    f"model {model!r} holds vectors of dimensions {dim} and {d} ({p.path}): "
                    f"re-index that partition"
                )
            dim = d
            n = table.num_rows
            blocks.append(vcol.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, d))
            chip_ids.append(np.asarray(table.column("chip_id").to_pylist(), dtype=object))
            dates.append(np.full(n, np.datetime64(p.date, "D")))
            code = region_index.setdefault(p.region, len(region_names))
            if code == len(region_names):
                region_names.append(p.region)
            codes.append(np.full(n, code, np.int32))
            lon.append(table.column("lon").to_numpy().astype(np.float64))
            lat.append(table.column("lat").to_numpy().astype(np.float64))
        return _Loaded(
            fingerprint=fingerprint,
            vectors=np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32),
            chip_ids=np.concatenate(chip_ids), dates=np.concatenate(dates),
            region_codes=np.concatenate(codes), region_names=region_names,
            lon=np.concatenate(lon), lat=np.concatenate(lat),
        )

    # -- the ANN index ------------------------------------------------------------------------

    def index_plan(self, n: int) -> dict[str, Any]:
        """The index a model of ``n`` vectors is searched with, and its parameters."""
        if n <= self.exact_limit:
            return {"type": "exact", "metric": "inner_product"}
        if n <= self.hnsw_limit:
            return {"type": "hnsw_flat", "metric": "inner_product", "M": HNSW_M,
                    "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points a list
        return {"type": "ivf_flat", "metric": "inner_product", "nlist": nlist, "nprobe": IVF_NPROBE}

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

    def _attach_ann(self, model: str, loaded: _Loaded) -> None:
        plan = self.index_plan(loaded.size)
        index_path, manifest_path = self._ann_paths(model)
        index = None
        if self._manifest_matches(model, loaded.fingerprint, plan, loaded.size):
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError:
                index = None  # unreadable: rebuilt below
            if index is not None and (index.ntotal != loaded.size or index.d != loaded.vectors.shape[1]):
                index = None
        reused = index is not None
        if index is None:
            index = self._build_ann(plan, loaded.vectors)
        persisted = reused
        if not reused:
            persisted = self._persist_ann(model, index, plan, loaded, index_path, manifest_path)
        loaded.ann = index
        loaded.ann_info = {**plan, "reused": reused, "persisted": persisted}

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

    def _filter_mask(self, loaded: _Loaded, flt: SearchFilter | None) -> np.ndarray | None:
        """[N] bool of the rows the filter lets through, None when it lets every row through."""
        if flt is None or flt.is_empty():
            return None
        mask = np.ones(loaded.size, bool)
        if flt.regions is not None:
            wanted = [i for i, name in enumerate(loaded.region_names) if name in set(flt.regions)]
            mask &= np.isin(loaded.region_codes, np.asarray(wanted, np.int32))
        if flt.date_from is not None:
            mask &= loaded.dates >= np.datetime64(flt.date_from, "D")
        if flt.date_to is not None:
            mask &= loaded.dates <= np.datetime64(flt.date_to, "D")
        for chip_id, date in flt.exclude:
            mask[loaded.rows_of(chip_id, date)] = False
        return mask

    def search(
        self, model: str, vector: np.ndarray, k: int, filter: SearchFilter | None = None
    ) -> list[SearchHit]:
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        loaded = self._load(model)
        if loaded is None:
            raise nothing_indexed(model)
        q = normalize_query(vector, model, int(loaded.vectors.shape[1]))  # [D]
        mask = self._filter_mask(loaded, filter)
        n_match = loaded.size if mask is None else int(mask.sum())
        if n_match == 0:
            return []
        k = min(k, n_match)
        if loaded.ann is not None and n_match > self.exact_limit:
            hits = self._ann_search(loaded, q, k, mask)
            if hits is not None:
                return hits
        return self._exact_search(loaded, q, k, mask)

    @staticmethod
    def _exact_search(loaded: _Loaded, q: np.ndarray, k: int, mask: np.ndarray | None) -> list[SearchHit]:
        if mask is None:
            rows = None
            scores = loaded.vectors @ q  # [N]
        else:
            rows = np.flatnonzero(mask)
            scores = loaded.vectors[rows] @ q  # [M]
        best = _top_k(scores, k)
        ids = best if rows is None else rows[best]
        return [loaded.hit(int(i), float(s)) for i, s in zip(ids, scores[best], strict=True)]

    @staticmethod
    def _ann_search(
        loaded: _Loaded, q: np.ndarray, k: int, mask: np.ndarray | None
    ) -> list[SearchHit] | None:
        """ANN candidates (oversampled, restricted to the filter), re-checked and re-scored
        exactly; None when fewer than k matching candidates come back."""
        n_match = loaded.size if mask is None else int(mask.sum())
        fetch = min(n_match, k * (2 if mask is None else 4))
        selector = None
        bitmap = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")  # kept alive for the search
            selector = faiss.IDSelectorBitmap(bitmap)
        if loaded.ann_info["type"] == "hnsw_flat":
            params: Any = faiss.SearchParametersHNSW(sel=selector, efSearch=max(HNSW_EF_SEARCH, 2 * fetch))
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=IVF_NPROBE)
        _, ids = loaded.ann.search(q[None, :], fetch, params=params)  # [1 fetch]
        del bitmap
        cand = ids[0][ids[0] >= 0]
        if mask is not None:
            cand = cand[mask[cand]]
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
