"""Vector search options on clustered synthetic embeddings: build time, latency, recall, memory.

    .venv/bin/python bench/search.py [--sizes 100000[,1000000]] [--dims 768,1024] [--queries 500]
        [--threads N] [--store-only]

The data stands in for encoder embeddings of chips, which are neither uniform noise (where no
index works) nor a few tight blobs (where every index looks perfect): 2000 clusters whose sizes
follow a Zipf law (s = 1: the largest holds ~12% of the points, most hold a few dozen); cluster
centres drawn in a 48-dimensional latent subspace with a power-law spectrum plus a small
full-rank part, so clusters overlap unevenly; within a cluster, an anisotropic spread (8 random
local directions plus isotropic noise) whose scale is log-normal across clusters. Rows are
L2-normalized and searched by inner product (= cosine). Queries are held-out points of the same
distribution, perturbed by a little extra noise; the truth is an exact search in the same run.

Options, each on the same vectors: exact (IndexFlatIP); HNSW (M=32, efConstruction=80 as the
store builds it, efSearch raised until recall@10 >= 0.95); IVF-Flat (nlist = 4 sqrt(N), nprobe
raised until recall@10 >= 0.95); IVF-PQ (m = D/8 sub-quantizers x 8 bits, nprobe raised until
recall@10 >= 0.9, with exact re-ranking of the top R candidates read from a memory-mapped
float32 file on disk, so RAM holds only the codes). Latency is one query at a time (the store's
case), p50/p99 over the queries; bytes/vector is the serialized index over N, and the 10M
projection scales the per-vector part and the coarse quantizer (nlist grows as sqrt N)
separately. Then the same vectors go through ``FaissStore`` itself (default limits) as
partitions of 4 regions x 6 dates, its ANN index built ahead with ``build_index``, and a
filtered search (one region, two dates) is timed, with its recall@10 against an exact search of
the subset and, while the subset is answered exactly, the store's old filtered path
(``legacy_filtered``) on the same queries in the same process. ``--store-only`` runs only that
part. The last line is JSON. Nothing here asserts a time.
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
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from geofm_assets.search.base import SearchFilter, VectorRecord
from geofm_assets.search.faiss_store import HNSW_EF_CONSTRUCTION, HNSW_M, FaissStore, _top_k

faiss: Any = _faiss
K = 10
N_CLUSTERS = 2000
REGIONS = ("jamari", "ariquemes", "machadinho", "cujubim")
DATES = tuple(dt.date(2021, 6, 1) + dt.timedelta(days=30 * i) for i in range(6))


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
    return int(faiss.serialize_index(index).nbytes)


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


def through_store(base: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """The vectors written through ``FaissStore`` (default limits) as 4 regions x 6 dates of
    partitions, its ANN index built ahead with ``build_index``, then single-query latency and
    recall@10 of a search filtered to one region x two dates, against an exact search of the
    subset; and the old filtered path (``legacy_filtered``) on the same queries when the subset
    is answered exactly."""
    n = base.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(tmp)
        cells = [(r, d) for r in REGIONS for d in DATES]
        cell = np.arange(n) % len(cells)
        t0 = time.perf_counter()
        for j, (region, date) in enumerate(cells):
            idx = np.flatnonzero(cell == j)
            store.upsert_partition(
                "bench",
                region,
                date,
                [
                    VectorRecord(f"c{i}", date, region, base[i], -63.0 + (i % 100) * 1e-3, -9.0)
                    for i in idx.tolist()
                ],
            )
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        built = store.build_index("bench")  # load + ANN build (or read) + persist
        index_s = time.perf_counter() - t0
        loaded = store._load("bench")
        assert loaded is not None
        flt = SearchFilter(regions=(REGIONS[0],), date_from=DATES[1], date_to=DATES[2])
        wanted = [j for j, (r, d) in enumerate(cells) if r == REGIONS[0] and DATES[1] <= d <= DATES[2]]
        subset = np.flatnonzero(np.isin(cell, wanted))  # bench ids of the matching rows
        sizes, times, times_all, found, truth = [], [], [], [], []
        qs = queries[:200]
        store.search("bench", qs[0], K, flt)  # warm-up
        for q in qs:
            t1 = time.perf_counter()
            hits = store.search("bench", q, K, flt)
            times.append(time.perf_counter() - t1)
            sizes.append(len(hits))
            found.append([int(h.chip_id[1:]) for h in hits])
            truth.append(subset[np.argsort(-(base[subset] @ q))[:K]])
            t1 = time.perf_counter()
            store.search("bench", q, K)
            times_all.append(time.perf_counter() - t1)
        out: dict[str, Any] = {
            "write_s": write_s,
            "build_index_s": index_s,
            "index": built["type"],
            "p50_ms": float(np.percentile(np.asarray(times) * 1e3, 50)),
            "p99_ms": float(np.percentile(np.asarray(times) * 1e3, 99)),
            "recall": float(
                np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
            ),
            "unfiltered_p50_ms": float(np.percentile(np.asarray(times_all) * 1e3, 50)),
            "matching": int(subset.size),
            "all_k": bool(min(sizes) == K),
            "resident_bytes_per_vector": loaded.nbytes / n,
        }
        if subset.size <= store.exact_limit:
            # the old path's per-row arrays, built once as its loader did
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
    return out


def run(n: int, dim: int, n_queries: int, rerank: int, store_only: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    base, queries, labels = clustered(n, dim, n_queries)
    gen_s = time.perf_counter() - t0
    rows: dict[str, Any] = {}
    if store_only:
        print(f"# {n} x {dim}: generated in {gen_s:.1f} s", flush=True)
        rows["store_filtered"] = through_store(base, queries)
        return {"n": n, "dim": dim, "own_cluster_share": None, "options": rows}

    # exact: the truth and the baseline
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    build = time.perf_counter() - t0
    _, truth = flat.search(queries, K)
    own = float(np.mean(labels[truth] == labels[truth[:, :1]]))
    n_lat = min(n_queries, 200)  # exact single queries are slow; fewer suffice for a p50
    p50, p99, _ = latencies(lambda q: flat.search(q, K)[1], queries[:n_lat])
    rows["exact"] = {
        "build_s": build,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": 1.0,
        "bytes_per_vector": index_bytes(flat) / n,
        "param": "-",
    }
    print(
        f"# {n} x {dim}: generated in {gen_s:.1f} s; {100 * own:.0f}% of the true top-10 share "
        f"the top-1's cluster",
        flush=True,
    )
    tune_q, tune_t = queries, truth  # the reported recall is the tuned one, on the same queries

    # HNSW, as the store builds it
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(base)
    build = time.perf_counter() - t0

    def set_ef(v):
        hnsw.hnsw.efSearch = v

    ef, tried = tune(
        set_ef,
        lambda q: hnsw.search(q, K)[1],
        [16, 32, 48, 64, 96, 128, 192, 256, 384, 512],
        tune_q,
        tune_t,
        0.95,
    )
    p50, p99, ids = latencies(lambda q: hnsw.search(q, K)[1], queries)
    rows["hnsw"] = {
        "build_s": build,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": recall(ids, truth),
        "bytes_per_vector": index_bytes(hnsw) / n,
        "param": f"efSearch={ef}",
        "tuning": tried,
    }
    print(f"  hnsw built in {build:.1f} s, efSearch {ef}", flush=True)
    hnsw.reset()  # free its memory before the next option

    # IVF-Flat
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    rng = np.random.default_rng(1)
    # 32 points a list (the store samples 256; fewer keeps this bench inside minutes on 2 cores)
    train = base[np.sort(rng.choice(n, min(n, 32 * nlist), replace=False))]
    t0 = time.perf_counter()
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(ivf).cp.min_points_per_centroid = 1  # no warning for 32 a list
    ivf.train(train)
    ivf.add(base)
    build = time.perf_counter() - t0
    ivf_params = faiss.extract_index_ivf(ivf)

    def set_nprobe(v):
        ivf_params.nprobe = v

    probes = [p for p in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if p <= nlist]
    nprobe, tried = tune(set_nprobe, lambda q: ivf.search(q, K)[1], probes, tune_q, tune_t, 0.95)
    p50, p99, ids = latencies(lambda q: ivf.search(q, K)[1], queries)
    rows["ivf_flat"] = {
        "build_s": build,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": recall(ids, truth),
        "bytes_per_vector": index_bytes(ivf) / n,
        "param": f"nlist={nlist} nprobe={nprobe}",
        "tuning": tried,
    }
    print(f"  ivf-flat built in {build:.1f} s, nprobe {nprobe}", flush=True)
    ivf_quantizer = faiss.downcast_index(ivf_params.quantizer)
    ivf_params.own_fields = False  # the quantizer outlives the IVF-Flat index

    # IVF-PQ, codes in RAM, exact re-ranking from a memory-mapped float32 file
    m = dim // 8
    with tempfile.TemporaryDirectory() as tmp:
        raw = np.lib.format.open_memmap(Path(tmp) / "vectors.npy", "w+", np.float32, base.shape)
        raw[:] = base
        raw.flush()
        del raw
        disk = np.load(Path(tmp) / "vectors.npy", mmap_mode="r")
        t0 = time.perf_counter()
        # the IVF-Flat coarse quantizer is reused; the PQ codebooks are trained on 4000 residuals
        # (m k-means of 256 centroids: cost grows as m x points, ~minutes for 65k points here)
        pq = faiss.IndexIVFPQ(ivf_quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        pq.pq.cp.min_points_per_centroid = 1
        pq.train(train[:4000])
        pq.add(base)
        build = time.perf_counter() - t0
        pq_ivf = faiss.extract_index_ivf(pq)

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
            pq_ivf.nprobe = v

        nprobe, tried = tune(set_pq_nprobe, pq_search, probes, tune_q, tune_t, 0.90)
        no_rerank = recall(pq.search(queries, K)[1], truth)
        p50, p99, ids = latencies(pq_search, queries)
        total = index_bytes(pq)
        quantizer = nlist * dim * 4
        per_vec = (total - quantizer) / n
        proj_10m = per_vec * 1e7 + int(4 * math.sqrt(1e7)) * dim * 4
        rows["ivf_pq"] = {
            "build_s": build,
            "p50_ms": p50,
            "p99_ms": p99,
            "recall": recall(ids, truth),
            "bytes_per_vector": total / n,
            "param": f"nlist={nlist} PQ{m}x8 nprobe={nprobe} rerank={rerank}",
            "recall_without_rerank": no_rerank,
            "tuning": tried,
            "projected_10m_gib": proj_10m / 2**30,
            "rerank_disk_bytes_per_vector": dim * 4,
        }
        print(f"  ivf-pq built in {build:.1f} s, nprobe {nprobe}", flush=True)
        pq.reset()
        ivf.reset()

    rows["store_filtered"] = through_store(base, queries)
    return {"n": n, "dim": dim, "own_cluster_share": own, "options": rows}


def report_store(res: dict[str, Any]) -> None:
    s = res["options"]["store_filtered"]
    before = ""
    if "before_p50_ms" in s:
        before = (
            f"; old path p50 {s['before_p50_ms']:.2f} ms, p99 {s['before_p99_ms']:.2f} ms "
            f"({s['before_p50_ms'] / s['p50_ms']:.1f}x slower)"
        )
    print(
        f"  store N={res['n']} D={res['dim']}: filtered p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
        f"recall@10 {s['recall']:.3f} over {s['matching']} matching (1 region x 2 dates), k every time: "
        f"{s['all_k']}{before}; unfiltered p50 {s['unfiltered_p50_ms']:.2f} ms ({s['index']}); "
        f"write {s['write_s']:.1f} s, build_index {s['build_index_s']:.1f} s; "
        f"{s['resident_bytes_per_vector']:.0f} B/vector held",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000")
    p.add_argument("--dims", default="768,1024")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    p.add_argument("--rerank", type=int, default=100, help="IVF-PQ candidates re-ranked exactly")
    p.add_argument("--store-only", action="store_true", help="only the FaissStore rows (skip the options)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"# {where}; {dt.date.today()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            res = run(n, dim, args.queries, args.rerank, args.store_only)
            results.append(res)
            report_store(res)
            if args.store_only:
                continue
            print(
                f"{'N=' + str(n) + ' D=' + str(dim):18s} {'build s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
                f"{'recall@10':>9s} {'B/vec':>7s} {'p50 vs exact':>12s}  params"
            )
            exact_p50 = res["options"]["exact"]["p50_ms"]
            for name in ("exact", "hnsw", "ivf_flat", "ivf_pq"):
                o = res["options"][name]
                extra = ""
                if name == "ivf_pq":
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
