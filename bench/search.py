"""Vector search options on clustered synthetic embeddings: build time, latency, recall, memory.

    .venv/bin/python bench/search.py [--sizes 100000[,1000000]] [--dims 768,1024] [--queries 500]
        [--threads N] [--build-threads N] [--store-only]

The data stands in for encoder embeddings of chips, which are neither uniform noise (where no
index works) nor a few tight blobs (where every index looks perfect): 2000 clusters whose sizes
follow a Zipf law (s = 1: the largest holds ~12% of the points, the 1000th ~0.01%); cluster
centres drawn in a 48-dimensional latent subspace with a power-law spectrum plus a small
full-rank part, so clusters overlap unevenly; within a cluster, an anisotropic spread (8 random
local directions plus isotropic noise) whose scale is log-normal across clusters. Rows are
L2-normalized and searched by inner product (= cosine). Queries are held-out points of the same
distribution, perturbed by a little extra noise; the truth is an exact search in the same run.

The same vectors go through ``FaissStore`` itself (default limits) as partitions of 4 regions
x 6 dates, its ANN index built ahead with ``build_index`` (on ``--build-threads`` threads), and
searches are timed one query at a time with no filter and with three filters (one region x one
date, 4% of the rows; one region x two dates, 8%, the headline; one region, 25%), each with its
recall@10 against an exact search of the matching rows in the same run, and, for the headline
filter while its subset is answered exactly, the store's old filtered path (``legacy_filtered``)
on the same queries in the same process. ``--store-only`` runs only that part.

Then the options table, each on the same vectors: exact (IndexFlatIP's search; its latency from
20 queries at 1M); HNSW, which is the store's own index from the step above (M=16,
efConstruction=80; efSearch raised until recall@10 >= 0.95); IVF-Flat (nlist = 4 sqrt(N), the
coarse quantizer trained by 10 k-means iterations on 32 points a list, nprobe raised until
recall@10 >= 0.95); IVF-PQ (the same coarse quantizer and assignment, m = D/8 sub-quantizers x 8
bits, nprobe raised until recall@10 >= 0.9, with exact re-ranking of the top R candidates read
from a memory-mapped float32 file on disk, so RAM holds only the codes); IVF-PQ + SQ6 (the same
candidates re-ranked in RAM from 6-bit scalar-quantized vectors, 0.75 D bytes each, no disk).
Build times: HNSW the faiss ``add`` inside ``build_index``; IVF-Flat and IVF-PQ each count the
coarse quantizer's training and the assignment of all vectors (computed once, used by both) plus
their own training and adding. Latency is one query at a time (the store's case) on
``--threads`` threads, p50/p99 over the queries; bytes/vector is the index as written to disk
over N (plus the SQ6 codes), and the 10M projection scales the per-vector part and the coarse
quantizer (nlist grows as sqrt N) separately. The data is generated with the query count in its
random stream, so runs with another ``--queries`` see other vectors. The last line is JSON.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from geofm_assets.search.base import SearchFilter, VectorRecord, VectorStore
from geofm_assets.search.faiss_store import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    FaissStore,
    _fetched,
    _top_k,
    hnsw_ef_search,
)

faiss: Any = _faiss
K = 10
N_CLUSTERS = 2000
REGIONS = ("jamari", "ariquemes", "machadinho", "cujubim")
DATES = tuple(dt.date(2021, 6, 1) + dt.timedelta(days=30 * i) for i in range(6))
# name -> filter, every one on the first region; "region x 2 dates" is the headline
FILTERS: dict[str, SearchFilter | None] = {
    "none": None,
    "region x 1 date": SearchFilter(regions=(REGIONS[0],), date_from=DATES[1], date_to=DATES[1]),
    "region x 2 dates": SearchFilter(regions=(REGIONS[0],), date_from=DATES[1], date_to=DATES[2]),
    "region": SearchFilter(regions=(REGIONS[0],)),
}
HEADLINE = "region x 2 dates"
STORE_QUERIES = 200
PROBES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BUILD_THREADS = [0]  # faiss threads for index builds (0: all cores); set by main


def clustered(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` base vectors, ``n_queries`` perturbed held-out queries, and each base row's cluster."""
    rng = np.random.default_rng(seed)
    total = n + n_queries
    weights = 1.0 / np.arange(1, N_CLUSTERS + 1)  # Zipf, s = 1
    sizes = rng.multinomial(total, weights / weights.sum())
    latent = 48
    spectrum = (np.arange(1, latent + 1) ** -0.5).astype(np.float32)
    basis = rng.standard_normal((latent, dim)).astype(np.float32) / math.sqrt(dim)
    centres = (rng.standard_normal((N_CLUSTERS, latent)).astype(np.float32) * spectrum) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    full = rng.standard_normal((N_CLUSTERS, dim)).astype(np.float32) / math.sqrt(dim)
    centres = centres + 0.5 * full
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = np.exp(rng.normal(math.log(0.55), 0.35, N_CLUSTERS)).astype(np.float32)
    out = np.empty((total, dim), np.float32)
    labels = np.empty(total, np.int32)
    row = 0
    for c in range(N_CLUSTERS):
        m = int(sizes[c])
        if m == 0:
            continue
        local = rng.standard_normal((8, dim)).astype(np.float32) / math.sqrt(dim)
        w = rng.standard_normal((m, 8)).astype(np.float32) * np.linspace(1.6, 0.4, 8, dtype=np.float32)
        iso = rng.standard_normal((m, dim)).astype(np.float32) / math.sqrt(dim)
        out[row : row + m] = centres[c] + spread[c] * (0.8 * (w @ local) / math.sqrt(2) + 0.6 * iso)
        labels[row : row + m] = c
        row += m
    perm = rng.permutation(total)
    out, labels = out[perm], labels[perm]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    base, held = out[:n], out[n:]
    queries = held + 0.15 * rng.standard_normal(held.shape).astype(np.float32) / math.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(base), np.ascontiguousarray(queries), labels[:n]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def latencies(fn, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """p50 and p99 in ms of one-query-at-a-time calls, and the ids found."""
    fn(queries[:1])  # warm-up
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(fn(q[None, :]))
        times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), np.concatenate(ids)


def index_bytes(index: Any) -> int:
    """Size of ``index`` written to disk (a file, not memory: at 1M it is gigabytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        return path.stat().st_size


def building(fn):
    """``fn()`` on the build threads, then back to the search threads."""
    search_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(BUILD_THREADS[0] or os.cpu_count() or 1)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(search_threads)


def subset_truth(base: np.ndarray, subset: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[Q K] bench ids of each query's exact top K among ``subset`` (sorted bench ids), scored in
    blocks of rows so that no copy of a large subset is made."""
    best_s = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((queries.shape[0], 0), np.int64)
    for at in range(0, subset.shape[0], 65536):
        rows = subset[at : at + 65536]
        s = np.concatenate([best_s, queries @ base[rows].T], axis=1)  # [Q K+B]
        i = np.concatenate([best_i, np.broadcast_to(rows, (queries.shape[0], rows.shape[0]))], axis=1)
        top = np.argpartition(-s, min(K, s.shape[1] - 1), axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def tune(set_param, search, values, queries, truth, target):
    """The first value whose recall@10 on ``queries`` reaches ``target`` (else the last)."""
    tried = []
    for v in values:
        set_param(v)
        r = recall(search(queries), truth)
        tried.append((v, round(r, 4)))
        if r >= target:
            return v, tried
    return values[-1], tried


def legacy_filtered(
    store: FaissStore,
    codes: np.ndarray,
    days: np.ndarray,
    vectors: np.ndarray,
    q: np.ndarray,
    flt: SearchFilter,
) -> np.ndarray:
    """The store's filtered exact path before 2026-11-25, reconstructed step by step on the same
    vectors: re-list and stat every partition file (the cache check), an [N] mask from per-row
    region codes and dates, a copy of the subset, a matrix-vector product, a top-k."""
    store._partitions("bench")
    mask = np.isin(codes, np.asarray([REGIONS.index(r) for r in flt.regions or ()], np.int32))
    mask &= days >= np.datetime64(flt.date_from, "D")
    mask &= days <= np.datetime64(flt.date_to, "D")
    rows = np.flatnonzero(mask)
    scores = vectors[rows] @ q  # [M]
    return rows[_top_k(scores, K)]


CELLS = [(r, d) for r in REGIONS for d in DATES]  # the bench's partitions, region x date


def matching_rows(flt: SearchFilter | None, cell: np.ndarray) -> np.ndarray:
    """Bench ids of the rows ``flt`` matches (row i is in partition ``CELLS[cell[i]]``)."""
    if flt is None:
        return np.arange(cell.size)
    wanted = [j for j, (r, d) in enumerate(CELLS) if flt.matches("", d, r)]
    return np.flatnonzero(np.isin(cell, wanted))


def measure_filters(
    search: Callable[[np.ndarray, SearchFilter | None], list[Any]],
    base: np.ndarray,
    qs: np.ndarray,
    cell: np.ndarray,
    path_of: Callable[[SearchFilter | None, int], str],
) -> dict[str, Any]:
    """Single-query latency and recall@10 of a store's ``search(q, filter)`` (hits whose chip
    ids are ``c{bench id}``) with no filter and each of ``FILTERS``, against an exact search of
    the matching rows in this process."""
    filters: dict[str, Any] = {}
    for name, flt in FILTERS.items():
        subset = matching_rows(flt, cell)
        truth = subset_truth(base, subset, qs)
        search(qs[0], flt)  # warm-up
        times, found, sizes = [], [], []
        for q in qs:
            t1 = time.perf_counter()
            hits = search(q, flt)
            times.append(time.perf_counter() - t1)
            sizes.append(len(hits))
            found.append([int(h.chip_id[1:]) for h in hits])
        t = np.asarray(times) * 1e3
        hit = [len(set(f) & set(tr.tolist())) / K for f, tr in zip(found, truth, strict=True)]
        filters[name] = {
            "matching": int(subset.size),
            "share": subset.size / base.shape[0],
            "path": path_of(flt, int(subset.size)),
            "p50_ms": float(np.percentile(t, 50)),
            "p99_ms": float(np.percentile(t, 99)),
            "recall": float(np.mean(hit)),
            "all_k": bool(min(sizes) == K),
        }
    return filters


def bench_records(base: np.ndarray, rows: np.ndarray, region: str, date: dt.date) -> list[VectorRecord]:
    return [
        VectorRecord(f"c{i}", date, region, base[i], -63.0 + (i % 100) * 1e-3, -9.0) for i in rows.tolist()
    ]


def upsert_all(store: VectorStore, base: np.ndarray, cell: np.ndarray) -> float:
    """Every bench partition upserted into ``store`` as model "bench"; seconds taken."""
    t0 = time.perf_counter()
    for j, (region, date) in enumerate(CELLS):
        records = bench_records(base, np.flatnonzero(cell == j), region, date)
        store.upsert_partition("bench", region, date, records)
    return time.perf_counter() - t0


def through_store(base: np.ndarray, queries: np.ndarray, keep_index: bool = False) -> dict[str, Any]:
    """The vectors written through ``FaissStore`` (default limits) as 4 regions x 6 dates of
    partitions, its ANN index built ahead with ``build_index``, then single-query latency and
    recall@10 with no filter and with each of ``FILTERS``, against an exact search of the
    matching rows; and the old filtered path (``legacy_filtered``) on the same queries when the
    headline filter's subset is answered exactly. With ``keep_index``, the store's ANN index and
    the bench id of each of its rows come back too (``"_index"``, ``"_row_ids"``)."""
    n = base.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(tmp)
        cell = np.arange(n) % len(CELLS)
        write_s = upsert_all(store, base, cell)
        t0, cpu0 = time.perf_counter(), time.process_time()
        built = building(lambda: store.build_index("bench"))  # load + ANN build (or read) + persist
        index_s, index_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        loaded = store._load("bench")
        assert loaded is not None
        print(
            f"  store: written in {write_s:.1f} s, build_index {index_s:.1f} s, {index_cpu_s:.0f} CPU s "
            f"({built['type']}, "
            f"faiss add {built.get('build_s', '-')} s, load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        qs = queries[:STORE_QUERIES]

        def path_of(flt: SearchFilter | None, matching: int) -> str:
            if not store.uses_ann(loaded, K, matching, filtered=flt is not None):
                return "exact"
            if built["type"] != "hnsw_flat":
                return str(built["type"])
            fetch = _fetched(K, matching, flt is not None)
            return f"hnsw_flat efSearch={hnsw_ef_search(K, fetch, n, matching)}"

        filters = measure_filters(lambda q, flt: store.search("bench", q, K, flt), base, qs, cell, path_of)
        head_subset = matching_rows(FILTERS[HEADLINE], cell)
        head = filters[HEADLINE]
        out: dict[str, Any] = {
            "write_s": write_s,
            "build_index_s": index_s,
            "build_index_cpu_s": index_cpu_s,  # all threads: / cores = the wall time on an idle machine
            "faiss_build_s": built.get("build_s"),
            "index": built["type"],
            "plan": {k: v for k, v in built.items() if k not in ("reused", "persisted", "vectors")},
            "p50_ms": head["p50_ms"],
            "p99_ms": head["p99_ms"],
            "recall": head["recall"],
            "unfiltered_p50_ms": filters["none"]["p50_ms"],
            "matching": head["matching"],
            "all_k": all(f["all_k"] for f in filters.values()),
            "resident_bytes_per_vector": loaded.nbytes / n,
            "filters": filters,
        }
        if head_subset.size <= store.exact_limit:
            # the old path's per-row arrays, built once as its loader did
            flt = FILTERS[HEADLINE]
            assert flt is not None
            p = np.searchsorted(loaded.starts, np.arange(n), side="right") - 1
            names = [loaded.region_names[c] for c in loaded.block_region.tolist()]
            codes = np.asarray([REGIONS.index(r) for r in names], np.int32)[p]
            days = loaded.block_date[p]
            vectors = np.array(loaded.vectors)  # its own copy, as the old loader held
            legacy_filtered(store, codes, days, vectors, qs[0], flt)
            old = []
            for q in qs:
                t1 = time.perf_counter()
                legacy_filtered(store, codes, days, vectors, q, flt)
                old.append(time.perf_counter() - t1)
            out["before_p50_ms"] = float(np.percentile(np.asarray(old) * 1e3, 50))
            out["before_p99_ms"] = float(np.percentile(np.asarray(old) * 1e3, 99))
            del vectors
        if keep_index and loaded.ann is not None:
            out["_index"] = loaded.ann
            out["_index_file_bytes"] = (store.model_dir("bench") / "_ann" / "index.faiss").stat().st_size
            out["_row_ids"] = np.asarray([int(c[1:]) for c in loaded.chip_ids.tolist()], np.int64)
    return out


def knn_graph_kib(client: Any) -> int:
    """k-NN native (graph) memory in use over the cluster's nodes, KiB (k-NN stats API)."""
    stats = client.transport.perform_request("GET", "/_plugins/_knn/stats/graph_memory_usage")
    return sum(int(node.get("graph_memory_usage", 0)) for node in stats.get("nodes", {}).values())


def through_opensearch(base: np.ndarray, queries: np.ndarray, url: str, client: Any = None) -> dict[str, Any]:
    """The same partitions upserted through ``OpenSearchStore`` into a live cluster, in an index
    of the bench's own (deleted at the end), merged to one segment (how a static index is
    served), its graphs loaded by the k-NN warm-up API; then the same single queries, filters
    and recall@10 as the FAISS store's. Sizes: the index's primary store on disk, and the k-NN
    graph memory that the warm-up added on the cluster. ``client`` replaces the one built
    from ``url`` and the ``OPENSEARCH_*`` environment variables."""
    from geofm_assets.search import OpenSearchStore

    n = base.shape[0]
    store = OpenSearchStore(
        url=url,
        username=os.environ.get("OPENSEARCH_USERNAME"),
        password=os.environ.get("OPENSEARCH_PASSWORD"),
        verify_certs=os.environ.get("OPENSEARCH_VERIFY_CERTS", "1") != "0", timeout=600.0,
        index_prefix=f"geofm-bench-{uuid.uuid4().hex[:8]}",
        client=client,
    )
    index = store.index_name("bench")
    try:
        cell = np.arange(n) % len(CELLS)
        write_s = upsert_all(store, base, cell)  # bulk requests of 500, a refresh per partition
        t0 = time.perf_counter()
        store.client.indices.forcemerge(index=index, max_num_segments=1, request_timeout=7200)
        merge_s = time.perf_counter() - t0
        graphs_before = knn_graph_kib(store.client)
        t0 = time.perf_counter()
        store.client.transport.perform_request("GET", f"/_plugins/_knn/warmup/{index}")
        warmup_s = time.perf_counter() - t0
        graph_kib = knn_graph_kib(store.client) - graphs_before
        disk = store.client.indices.stats(index=index, metric="store")["indices"][index]["primaries"]["store"]
        print(
            f"  opensearch: written in {write_s:.1f} s, force-merged in {merge_s:.1f} s, warmed up in "
            f"{warmup_s:.1f} s; {disk['size_in_bytes'] / n:.0f} B/vector on disk, "
            f"{graph_kib * 1024 / n:.0f} B/vector of k-NN graph memory",
            flush=True,
        )
        path = f"opensearch {store.engine} hnsw"
        filters = measure_filters(
            lambda q, flt: store.search("bench", q, K, flt), base, queries[:STORE_QUERIES], cell,
            lambda flt, matching: path,
        )
        head = filters[HEADLINE]
        return {
            "url": store.describe("bench")["url"],
            "engine": store.engine,
            "write_s": write_s,
            "force_merge_s": merge_s,
            "warmup_s": warmup_s,
            "disk_bytes_per_vector": disk["size_in_bytes"] / n,
            "graph_bytes_per_vector": graph_kib * 1024 / n,
            "p50_ms": head["p50_ms"],
            "p99_ms": head["p99_ms"],
            "recall": head["recall"],
            "all_k": all(f["all_k"] for f in filters.values()),
            "filters": filters,
        }
    finally:
        store.client.indices.delete(index=index, ignore_unavailable=True)


def report_filters(filters: dict[str, Any]) -> None:
    for name, f in filters.items():
        print(
            f"    {name:17s} {f['matching']:>8d} rows ({100 * f['share']:5.1f}%)  p50 {f['p50_ms']:6.2f} ms  "
            f"p99 {f['p99_ms']:6.2f} ms  recall@10 {f['recall']:.3f}  [{f['path']}]",
            flush=True,
        )


def hnsw_row(store: dict[str, Any], queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The options-table row of the store's own HNSW index (``through_store(keep_index=True)``):
    efSearch raised until recall@10 >= 0.95 unfiltered, latency one query at a time."""
    hnsw, row_ids = store["_index"], store["_row_ids"]

    def search(q):
        return row_ids[hnsw.search(q, K)[1]]

    def set_ef(v):
        hnsw.hnsw.efSearch = v

    ef, tried = tune(set_ef, search, [16, 32, 48, 64, 96, 128, 192, 256, 384, 512], queries, truth, 0.95)
    p50, p99, ids = latencies(search, queries)
    return {
        "build_s": store["faiss_build_s"],
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": recall(ids, truth),
        "bytes_per_vector": store["_index_file_bytes"] / row_ids.shape[0],
        "param": f"M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION} efSearch={ef}",
        "tuning": tried,
    }


def ivf_flat_row(
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    quantizer: Any,
    assign: np.ndarray,
    coarse_s: float,
) -> dict[str, Any]:
    """IVF-Flat over ``quantizer``'s lists (``assign``: each vector's list), nprobe raised until
    recall@10 >= 0.95; its build time counts the coarse quantizer's ``coarse_s`` too."""
    n, dim = base.shape
    nlist = quantizer.ntotal
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    building(lambda: ivf.add_core(n, faiss.swig_ptr(base), None, faiss.swig_ptr(assign)))
    build = coarse_s + time.perf_counter() - t0

    def set_nprobe(v):
        ivf.nprobe = v

    probes = [p for p in PROBES if p <= nlist]
    nprobe, tried = tune(set_nprobe, lambda q: ivf.search(q, K)[1], probes, queries, truth, 0.95)
    p50, p99, ids = latencies(lambda q: ivf.search(q, K)[1], queries)
    return {
        "build_s": build,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": recall(ids, truth),
        "bytes_per_vector": index_bytes(ivf) / n,
        "param": f"nlist={nlist} nprobe={nprobe}",
        "tuning": tried,
    }


def ivf_pq_row(
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    quantizer: Any,
    assign: np.ndarray,
    coarse_s: float,
    train: np.ndarray,
    rerank: int,
) -> dict[str, dict[str, Any]]:
    """IVF-PQ (m = D/8 sub-quantizers x 8 bits) over ``quantizer``'s lists, codes in RAM, its top
    ``rerank`` candidates re-ranked two ways: ``ivf_pq``, exactly from a memory-mapped float32
    file on disk; ``ivf_pq_sq6``, in RAM from 6-bit scalar-quantized copies of the vectors (0.75
    D bytes each; 4 bits lose too much: recall@10 <= 0.90 even on the exact top 100, 8 bits
    overflow 8 GiB at 10M). nprobe raised until recall@10 >= 0.9 for each. The PQ codebooks are
    trained on 4000 residuals (m k-means of 256 centroids: cost grows as m x points)."""
    n, dim = base.shape
    nlist = quantizer.ntotal
    m = dim // 8
    with tempfile.TemporaryDirectory() as tmp:
        raw = np.lib.format.open_memmap(Path(tmp) / "vectors.npy", "w+", np.float32, base.shape)
        raw[:] = base
        raw.flush()
        del raw
        disk = np.load(Path(tmp) / "vectors.npy", mmap_mode="r")
        t0 = time.perf_counter()
        pq = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        pq.pq.cp.min_points_per_centroid = 1
        building(lambda: pq.train(train[:4000]))
        building(lambda: pq.add_core(n, faiss.swig_ptr(base), None, faiss.swig_ptr(assign)))
        build = coarse_s + time.perf_counter() - t0

        def pq_search(q, r=rerank):
            _, cand = pq.search(q, r)  # [B R]
            out = np.full((q.shape[0], K), -1, np.int64)
            for i in range(q.shape[0]):
                c = np.sort(cand[i][cand[i] >= 0])
                s = disk[c] @ q[i]
                best = c[np.argsort(-s)[:K]]
                out[i, : best.shape[0]] = best
            return out

        def set_pq_nprobe(v):
            pq.nprobe = v

        probes = [p for p in PROBES if p <= nlist]
        nprobe, tried = tune(set_pq_nprobe, pq_search, probes, queries, truth, 0.90)
        no_rerank = recall(pq.search(queries, K)[1], truth)
        p50, p99, ids = latencies(pq_search, queries)
        total = index_bytes(pq)
        per_vec = (total - nlist * dim * 4) / n  # all but the coarse quantizer
        coarse_10m = int(4 * math.sqrt(1e7)) * dim * 4
        rows = {
            "ivf_pq": {
                "build_s": build,
                "p50_ms": p50,
                "p99_ms": p99,
                "recall": recall(ids, truth),
                "bytes_per_vector": total / n,
                "param": f"nlist={nlist} PQ{m}x8 nprobe={nprobe} rerank={rerank} from disk",
                "recall_without_rerank": no_rerank,
                "tuning": tried,
                "projected_10m_gib": (per_vec * 1e7 + coarse_10m) / 2**30,
                "rerank_disk_bytes_per_vector": dim * 4,
            }
        }

        # the same candidates re-ranked in RAM from 6-bit scalar-quantized vectors
        t0 = time.perf_counter()
        sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_6bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(train)  # per-dimension ranges
        codes = np.concatenate([sq.sa_encode(base[at : at + 65536]) for at in range(0, n, 65536)])
        sq_s = time.perf_counter() - t0

        def pq_sq_search(q, r=rerank):
            _, cand = pq.search(q, r)  # [B R]
            out = np.full((q.shape[0], K), -1, np.int64)
            for i in range(q.shape[0]):
                c = cand[i][cand[i] >= 0]
                s = sq.sa_decode(codes[c]) @ q[i]
                best = c[np.argsort(-s)[:K]]
                out[i, : best.shape[0]] = best
            return out

        nprobe, tried = tune(set_pq_nprobe, pq_sq_search, probes, queries, truth, 0.90)
        p50, p99, ids = latencies(pq_sq_search, queries)
        per_vec_sq = per_vec + codes.shape[1]
        rows["ivf_pq_sq6"] = {
            "build_s": build + sq_s,
            "p50_ms": p50,
            "p99_ms": p99,
            "recall": recall(ids, truth),
            "bytes_per_vector": total / n + codes.shape[1],
            "param": f"nlist={nlist} PQ{m}x8 nprobe={nprobe} rerank={rerank} from SQ6 in RAM",
            "recall_without_rerank": no_rerank,
            "tuning": tried,
            "projected_10m_gib": (per_vec_sq * 1e7 + coarse_10m) / 2**30,
            "rerank_disk_bytes_per_vector": 0,
        }
        return rows


def opensearch(rows: dict[str, Any], base: np.ndarray, queries: np.ndarray) -> None:
    """The OpenSearch rows, when ``OPENSEARCH_URL`` names a cluster."""
    url = os.environ.get("OPENSEARCH_URL")
    if not url:
        print("  opensearch: skipped, OPENSEARCH_URL is not set (no cluster to measure)", flush=True)
        return
    rows["opensearch"] = through_opensearch(base, queries, url)
    report_filters(rows["opensearch"]["filters"])


def run(n: int, dim: int, n_queries: int, rerank: int, store_only: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    base, queries, labels = clustered(n, dim, n_queries)
    gen_s = time.perf_counter() - t0
    rows: dict[str, Any] = {}
    if store_only:
        print(f"# {n} x {dim}: generated in {gen_s:.1f} s", flush=True)
        rows["store_filtered"] = through_store(base, queries)
        opensearch(rows, base, queries)
        return {"n": n, "dim": dim, "own_cluster_share": None, "options": rows}

    # exact (faiss's IndexFlatIP search, on the bench's own array: no second copy): truth, baseline
    ip = faiss.METRIC_INNER_PRODUCT
    _, truth = building(lambda: faiss.knn(queries, base, K, metric=ip))
    own = float(np.mean(labels[truth] == labels[truth[:, :1]]))
    n_lat = min(n_queries, max(20, 20_000_000 // n))  # exact single queries take ~0.2-1 s at 1M
    p50, p99, _ = latencies(lambda q: faiss.knn(q, base, K, metric=ip)[1], queries[:n_lat])
    rows["exact"] = {
        "build_s": 0.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": 1.0,
        "bytes_per_vector": dim * 4.0,  # IndexFlat: the float32 vectors, nothing else
        "param": f"- ({n_lat} queries)",
    }
    print(
        f"# {n} x {dim}: generated in {gen_s:.1f} s; {100 * own:.0f}% of the true top-10 share "
        f"the top-1's cluster; exact p50 {p50:.1f} ms",
        flush=True,
    )

    # the store, whose HNSW index is then the HNSW option (built once)
    store = through_store(base, queries, keep_index=True)
    rows["store_filtered"] = {k: v for k, v in store.items() if not k.startswith("_")}
    report_store({"n": n, "dim": dim, "options": rows})
    if "_index" in store and store["index"] == "hnsw_flat":
        rows["hnsw"] = hnsw_row(store, queries, truth)
        print(
            f"  hnsw (the store's) built in {store['faiss_build_s']} s, {rows['hnsw']['param']}", flush=True
        )
    store.clear()  # free the store's index before the next option
    opensearch(rows, base, queries)

    # the coarse quantizer and assignment shared by IVF-Flat and IVF-PQ: nlist = 4 sqrt(N), trained
    # on 32 points a list by 10 k-means iterations, spherical, as IndexIVF trains an inner-product
    # quantizer (the store samples 256 points a list; fewer keeps this bench inside minutes at 1M)
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    rng = np.random.default_rng(1)
    train = base[np.sort(rng.choice(n, min(n, 32 * nlist), replace=False))]
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    km = faiss.Clustering(dim, nlist)
    km.niter = 10
    km.min_points_per_centroid = 1  # no warning for 32 a list
    km.spherical = True  # as IndexIVF trains an inner-product quantizer
    building(lambda: km.train(train, quantizer))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, assign = building(lambda: quantizer.search(base, 1))  # [N 1] the list of each vector
    assign = np.ascontiguousarray(assign.ravel())
    assign_s = time.perf_counter() - t0
    print(
        f"  coarse quantizer: {nlist} lists trained in {train_s:.1f} s, assignment {assign_s:.1f} s",
        flush=True,
    )
    rows["ivf_flat"] = ivf_flat_row(base, queries, truth, quantizer, assign, train_s + assign_s)
    print(f"  ivf-flat built in {rows['ivf_flat']['build_s']:.1f} s, {rows['ivf_flat']['param']}", flush=True)
    rows.update(ivf_pq_row(base, queries, truth, quantizer, assign, train_s + assign_s, train, rerank))
    for name in ("ivf_pq", "ivf_pq_sq6"):
        print(f"  {name} built in {rows[name]['build_s']:.1f} s, {rows[name]['param']}", flush=True)
    return {"n": n, "dim": dim, "own_cluster_share": own, "options": rows}


def report_store(res: dict[str, Any]) -> None:
    s = res["options"]["store_filtered"]
    print(
        f"  store N={res['n']} D={res['dim']} ({s['index']}): write {s['write_s']:.1f} s, build_index "
        f"{s['build_index_s']:.1f} s (faiss add {s['faiss_build_s']} s); "
        f"{s['resident_bytes_per_vector']:.0f} B/vector held; k results every time: {s['all_k']}",
        flush=True,
    )
    report_filters(s["filters"])
    if "before_p50_ms" in s:
        print(
            f"    old filtered path ({HEADLINE}): p50 {s['before_p50_ms']:.2f} ms, "
            f"p99 {s['before_p99_ms']:.2f} ms ({s['before_p50_ms'] / s['p50_ms']:.1f}x slower)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000")
    p.add_argument("--dims", default="768,1024")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument(
        "--threads", type=int, default=0, help="faiss OpenMP threads for searches (0: faiss's default)"
    )
    p.add_argument(
        "--build-threads",
        type=int,
        default=0,
        help="faiss OpenMP threads for index builds and the batched truth (0: all cores)",
    )
    p.add_argument("--rerank", type=int, default=100, help="IVF-PQ candidates re-ranked exactly")
    p.add_argument("--store-only", action="store_true", help="only the FaissStore rows (skip the options)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    BUILD_THREADS[0] = args.build_threads
    where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    print(
        f"# {where}; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} search threads, "
        f"{args.build_threads or os.cpu_count()} build threads; "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            res = run(n, dim, args.queries, args.rerank, args.store_only)
            results.append(res)
            if args.store_only:
                report_store(res)
                continue
            print(
                f"{'N=' + str(n) + ' D=' + str(dim):18s} {'build s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
                f"{'recall@10':>9s} {'B/vec':>7s} {'p50 vs exact':>12s}  params"
            )
            exact_p50 = res["options"]["exact"]["p50_ms"]
            names = ("exact", "hnsw", "ivf_flat", "ivf_pq", "ivf_pq_sq6")
            for name in [o for o in names if o in res["options"]]:
                o = res["options"][name]
                extra = ""
                if name.startswith("ivf_pq"):
                    extra = (
                        f"  (no re-rank {o['recall_without_rerank']:.3f}; 10M -> "
                        f"{o['projected_10m_gib']:.2f} GiB RAM + {o['rerank_disk_bytes_per_vector']} "
                        f"B/vec on disk)"
                    )
                print(
                    f"  {name:16s} {o['build_s']:8.1f} {o['p50_ms']:7.2f} {o['p99_ms']:7.2f} "
                    f"{o['recall']:9.3f} {o['bytes_per_vector']:7.0f} {exact_p50 / o['p50_ms']:11.1f}x  "
                    f"{o['param']}{extra}"
                )
    print(json.dumps({"device": where, "faiss": faiss.__version__, "results": results}, default=float))


if __name__ == "__main__":
    sys.exit(main())
