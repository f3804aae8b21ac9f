"""FaissStore: Parquet partitions as the source of truth, exact and ANN search, filters, caching."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import geofm_assets.search.faiss_store as faiss_store
from geofm_assets.search import FaissStore, SearchFilter, StoreError, VectorRecord
from geofm_assets.search.faiss_store import METADATA_KEY, hnsw_ef_search

DIM = 64
REGIONS = ("alps", "delta")
DATES = (dt.date(2024, 5, 3), dt.date(2024, 5, 13), dt.date(2024, 6, 2))
MODEL = "rcf"


def cluster_centres(seed: int = 7, n_clusters: int = 6, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_clusters, dim)).astype(np.float32)  # [C D]


def clustered_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """[n D] vectors from clusters of uneven size (weights) and spread (sigmas), like land covers."""
    centres = cluster_centres(dim=dim)
    weights = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    sigmas = np.array([0.2, 0.5, 0.35, 0.9, 0.15, 0.6], np.float32)
    labels = rng.choice(len(weights), size=n, p=weights)
    noise = rng.normal(size=(n, dim)).astype(np.float32)
    return (centres[labels] + sigmas[labels, None] * noise).astype(np.float32)


def partition_records(region: str, date: dt.date, n: int, seed: int, dim: int = DIM) -> list[VectorRecord]:
    """``n`` chips of a region's grid (ids ``{region}_r{row:04d}_c{col:04d}`` as ``ChipGrid`` names
    them: the same id is the same ground on every date)."""
    rng = np.random.default_rng(seed)
    vectors = clustered_vectors(rng, n, dim)
    lon0 = 10.0 if region == "alps" else 30.0
    return [
        VectorRecord(chip_id=f"{region}_r{i // 20:04d}_c{i % 20:04d}", date=date, region=region,
                     vector=vectors[i], lon=lon0 + 0.02 * (i % 20), lat=45.0 + 0.02 * (i // 20))
        for i in range(n)
    ]


def fill(store: FaissStore, model: str = MODEL, sizes: tuple[int, ...] = (120, 80, 100)) -> dict:
    """Two regions x three dates, partitions of uneven size; returns {(region, date): records}."""
    written = {}
    for r_i, region in enumerate(REGIONS):
        for d_i, date in enumerate(DATES):
            recs = partition_records(region, date, sizes[(r_i + d_i) % len(sizes)], seed=100 * r_i + d_i)
            assert store.upsert_partition(model, region, date, recs) == len(recs)
            written[(region, date)] = recs
    return written


def brute_force(written: dict, query: np.ndarray, flt: SearchFilter | None = None) -> list[tuple]:
    """Every matching (chip_id, date, region, cosine), best first."""
    q = query / np.linalg.norm(query)
    rows = []
    for recs in written.values():
        for r in recs:
            if flt is None or flt.matches(r.chip_id, r.date, r.region):
                v = r.vector / np.linalg.norm(r.vector)
                rows.append((r.chip_id, r.date, r.region, float(v @ q)))
    return sorted(rows, key=lambda t: -t[3])


def queries(n: int, seed: int = 99) -> np.ndarray:
    return clustered_vectors(np.random.default_rng(seed), n)  # [n D]


@pytest.fixture
def store(tmp_path: Path) -> FaissStore:
    return FaissStore(tmp_path / "vector_index")


def test_upsert_writes_partitions_and_counts(store: FaissStore) -> None:
    written = fill(store)
    assert store.count(MODEL) == sum(len(v) for v in written.values())
    assert store.count(MODEL, region="alps") == sum(len(v) for (r, _), v in written.items() if r == "alps")
    assert store.count(MODEL, date=DATES[1]) == sum(len(v) for (_, d), v in written.items() if d == DATES[1])
    assert store.count(MODEL, "delta", DATES[2]) == len(written[("delta", DATES[2])])
    assert store.dimension(MODEL) == DIM
    path = store.root / "model=rcf" / "region=alps" / "date=2024-05-03" / "vectors.parquet"
    table = pq.read_table(path)
    assert table.column_names == ["chip_id", "region", "date", "lon", "lat", "vector"]
    vtype = table.schema.field("vector").type
    assert vtype.list_size == DIM and str(vtype.value_type) == "float"
    assert json.loads(table.schema.metadata[METADATA_KEY])["model"] == MODEL
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not list(store.root.rglob("*.tmp"))


def test_upsert_twice_is_idempotent(store: FaissStore) -> None:
    written = fill(store)
    q = queries(1)[0]
    before = store.search(MODEL, q, 10)
    total = store.count(MODEL)
    fill(store)
    assert store.count(MODEL) == total == sum(len(v) for v in written.values())
    assert store.search(MODEL, q, 10) == before


def test_replacing_a_partition_with_fewer_records_shrinks_it(store: FaissStore) -> None:
    written = fill(store)
    total = store.count(MODEL)
    key = ("alps", DATES[0])
    fewer = written[key][:30]
    store.upsert_partition(MODEL, *key, fewer)
    assert store.count(MODEL, *key) == 30
    assert store.count(MODEL) == total - len(written[key]) + 30
    hits = store.search(MODEL, queries(1)[0], 10_000, SearchFilter(regions=("alps",), date_from=DATES[0],
                                                                    date_to=DATES[0]))
    assert {h.chip_id for h in hits} == {r.chip_id for r in fewer}
    store.upsert_partition(MODEL, *key, [])
    assert store.count(MODEL, *key) == 0
    assert not store.partition_path(MODEL, *key).exists()


def test_exact_search_is_cosine_best_first(store: FaissStore) -> None:
    written = fill(store)
    for q in queries(5):
        hits = store.search(MODEL, q * 3.0, 10)  # the query is normalized on read
        expected = brute_force(written, q)[:10]
        assert [(h.chip_id, h.date, h.region) for h in hits] == [e[:3] for e in expected]
        np.testing.assert_allclose([h.score for h in hits], [e[3] for e in expected], atol=1e-5)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    top = store.search(MODEL, written[("delta", DATES[1])][5].vector, 1)[0]
    assert (top.chip_id, top.region, top.date) == ("delta_r0000_c0005", "delta", DATES[1])
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert (top.lon, top.lat) == pytest.approx((30.1, 45.0))


def spy_on_ann_search(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """From now on, each FaissStore search that tries its ANN index appends whether that answered
    it (False: too few matching candidates, so it fell back to an exact scan)."""
    answered_by_ann: list[bool] = []
    ann_search = FaissStore._ann_search

    def spy(*args: object) -> object:
        hits = ann_search(*args)  # type: ignore[arg-type]
        answered_by_ann.append(hits is not None)
        return hits

    monkeypatch.setattr(FaissStore, "_ann_search", staticmethod(spy))
    return answered_by_ann


@pytest.mark.parametrize("exact_limit", [50_000, 100], ids=["exact", "ann"])
def test_filters_keep_k(tmp_path: Path, exact_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FaissStore(tmp_path / "vi", exact_limit=exact_limit)
    answered_by_ann = spy_on_ann_search(monkeypatch)
    written = fill(store)
    # exactly k vectors match: one region on one date
    key = ("delta", DATES[1])
    k = len(written[key])
    only = SearchFilter(regions=("delta",), date_from=DATES[1], date_to=DATES[1])
    for q in queries(3):
        hits = store.search(MODEL, q, k, only)
        assert len(hits) == k
        assert all(h.region == "delta" and h.date == DATES[1] for h in hits)
    # many more than k match (the ANN path when exact_limit is small): the k best matching ones
    wide = SearchFilter(regions=("alps",), date_from=DATES[1])
    for q in queries(4, seed=5):
        hits = store.search(MODEL, q, 10, wide)
        assert len(hits) == 10
        assert all(h.region == "alps" and h.date >= DATES[1] for h in hits)
        best = brute_force(written, q, wide)[:10]
        found = {(h.chip_id, h.date) for h in hits}
        assert len(found & {(b[0], b[1]) for b in best}) >= 9
    # fewer than k match: all of them
    assert len(store.search(MODEL, queries(1)[0], 10_000, only)) == k
    # the wide filter went through the ANN with an ID selector when the model is past exact_limit
    assert answered_by_ann == ([True] * 4 if exact_limit < store.count(MODEL) else [])


def test_exclude_leaves_pairs_out(store: FaissStore) -> None:
    written = fill(store)
    q = written[("alps", DATES[0])][3].vector
    first = store.search(MODEL, q, 5)
    excluded = tuple((h.chip_id, h.date) for h in first[:3])
    hits = store.search(MODEL, q, 5, SearchFilter(exclude=excluded))
    assert len(hits) == 5
    assert not {(h.chip_id, h.date) for h in hits} & set(excluded)
    assert [(h.chip_id, h.date) for h in hits[:2]] == [(h.chip_id, h.date) for h in first[3:5]]
    # the same chip on another date is not excluded
    assert store.search(MODEL, q, 1, SearchFilter(exclude=((first[0].chip_id, DATES[2]),)))[0] == first[0]


@pytest.mark.parametrize(("hnsw_limit", "kind"), [(2_000_000, "hnsw_flat"), (500, "ivf_flat")])
def test_ann_agrees_with_exact(tmp_path: Path, hnsw_limit: int, kind: str) -> None:
    exact = FaissStore(tmp_path / "vi")
    fill(exact, sizes=(400, 300, 350))
    ann = FaissStore(tmp_path / "vi", exact_limit=200, hnsw_limit=hnsw_limit)
    assert ann.describe(MODEL)["index"]["type"] == kind
    assert exact.describe(MODEL)["index"]["type"] == "exact"
    recall = []
    for q in queries(20):
        truth = {(h.chip_id, h.date, h.region) for h in exact.search(MODEL, q, 10)}
        got = ann.search(MODEL, q, 10)
        assert len(got) == 10
        recall.append(len(truth & {(h.chip_id, h.date, h.region) for h in got}) / 10)
    assert np.mean(recall) >= 0.95
    # persisted with a manifest, reused by a fresh store, rebuilt when a partition changes
    assert (ann.model_dir(MODEL) / "_ann" / "index.faiss").exists()
    manifest = json.loads((ann.model_dir(MODEL) / "_ann" / "manifest.json").read_text())
    assert manifest["index"]["type"] == kind and manifest["ntotal"] == exact.count(MODEL)
    assert ann.describe(MODEL)["ann_index_current"] is True
    again = FaissStore(tmp_path / "vi", exact_limit=200, hnsw_limit=hnsw_limit)
    again.search(MODEL, queries(1)[0], 5)
    assert again._load(MODEL).ann_info["reused"] is True  # type: ignore[union-attr]
    newcomer = partition_records("alps", dt.date(2024, 7, 1), 1, seed=42)
    again.upsert_partition(MODEL, "alps", dt.date(2024, 7, 1), newcomer)
    assert again.describe(MODEL)["ann_index_current"] is False
    third = FaissStore(tmp_path / "vi", exact_limit=200, hnsw_limit=hnsw_limit)
    top = third.search(MODEL, newcomer[0].vector, 1)[0]
    assert third._load(MODEL).ann_info["reused"] is False  # type: ignore[union-attr]
    assert (top.chip_id, top.date) == (newcomer[0].chip_id, dt.date(2024, 7, 1))


def test_dimension_mismatch_is_refused(store: FaissStore) -> None:
    fill(store)
    wrong = partition_records("alps", dt.date(2024, 8, 1), 5, seed=1, dim=32)
    with pytest.raises(StoreError, match=r"dimension 32.*'rcf'.*dimension 64"):
        store.upsert_partition(MODEL, "alps", dt.date(2024, 8, 1), wrong)
    with pytest.raises(StoreError, match=r"query dimension 32 .* dimension 64 .*'rcf'"):
        store.search(MODEL, np.ones(32, np.float32), 3)
    assert store.count(MODEL, date=dt.date(2024, 8, 1)) == 0


def test_unknown_model_and_bad_records(store: FaissStore) -> None:
    with pytest.raises(StoreError, match="nothing is indexed for model 'clay-v1'"):
        store.search("clay-v1", np.ones(DIM, np.float32), 5)
    assert store.count("clay-v1") == 0 and store.dimension("clay-v1") is None
    assert store.get_vector("clay-v1", "alps_r0000_c0000", DATES[0]) is None
    assert store.describe("clay-v1")["vectors"] == 0
    recs = partition_records("alps", DATES[0], 3, seed=0)
    with pytest.raises(StoreError, match="not for the partition delta"):
        store.upsert_partition(MODEL, "delta", DATES[0], recs)
    with pytest.raises(StoreError, match="appears twice"):
        store.upsert_partition(MODEL, "alps", DATES[0], recs + recs[:1])
    nan = [VectorRecord("alps_r0000_c0000", DATES[0], "alps", np.full(DIM, np.nan, np.float32), 10.0, 45.0)]
    with pytest.raises(StoreError, match="NaN"):
        store.upsert_partition(MODEL, "alps", DATES[0], nan)
    assert store.count(MODEL) == 0


def test_cache_follows_partition_files(tmp_path: Path) -> None:
    reader = FaissStore(tmp_path / "vi")
    writer = FaissStore(tmp_path / "vi")
    written = fill(writer)
    key = ("alps", DATES[2])
    target = written[key][0]
    q = -target.vector  # a direction no stored vector is close to... until we write one
    assert reader.search(MODEL, q, 1)[0].chip_id != "moved"
    loaded = reader._load(MODEL)
    assert reader._load(MODEL) is loaded  # cached while nothing changes
    moved = [VectorRecord("moved", key[1], key[0], q, 0.0, 0.0), *written[key][1:]]
    writer.upsert_partition(MODEL, *key, moved)  # another process rewrote the file
    hit = reader.search(MODEL, q, 1)[0]
    assert (hit.chip_id, hit.score) == ("moved", pytest.approx(1.0, abs=1e-5))
    assert reader.get_vector(MODEL, target.chip_id, key[1]) is None
    stored = reader.get_vector(MODEL, "moved", key[1])
    assert stored is not None
    np.testing.assert_allclose(stored, q / np.linalg.norm(q), atol=1e-6)


@pytest.mark.parametrize("model", ["hf:facebook/dinov2-small", "clay-v1.5", "hf:/models/../vit"])
def test_model_names_with_separators(store: FaissStore, model: str) -> None:
    fill(store, model=model, sizes=(20,))
    fill(store, model="rcf", sizes=(10,))
    model_dir = store.model_dir(model)
    assert model_dir.parent == store.root and "/" not in model_dir.name
    assert store.count(model) == 120 and store.count("rcf") == 60
    hits = store.search(model, queries(1)[0], 5)
    assert len(hits) == 5
    table = pq.read_table(next(model_dir.rglob("vectors.parquet")))
    assert json.loads(table.schema.metadata[METADATA_KEY])["model"] == model
    assert store.describe(model)["model"] == model


def test_get_vector_returns_the_normalized_vector(store: FaissStore) -> None:
    written = fill(store)
    rec = written[("delta", DATES[0])][7]
    got = store.get_vector(MODEL, rec.chip_id, DATES[0])
    assert got is not None and got.dtype == np.float32 and got.shape == (DIM,)
    np.testing.assert_allclose(got, rec.vector / np.linalg.norm(rec.vector), atol=1e-6)
    assert store.get_vector(MODEL, "delta_r0099_c0099", DATES[0]) is None


def test_describe_reports_index_and_size(store: FaissStore) -> None:
    fill(store)
    info = store.describe(MODEL)
    assert info["store"] == "faiss" and info["vectors"] == store.count(MODEL)
    assert info["dimension"] == DIM and info["partitions"] == 6
    assert info["regions"] == list(REGIONS)
    assert info["date_range"] == [DATES[0].isoformat(), DATES[-1].isoformat()]
    assert info["index"]["type"] == "exact"
    big = FaissStore(store.root, exact_limit=10)
    assert big.describe(MODEL)["index"] == {"type": "hnsw_flat", "metric": "inner_product", "M": 16,
                                            "efConstruction": 80, "efSearch": 128,
                                            "efSearch_per_match": 1.25}
    huge = FaissStore(store.root, exact_limit=10, hnsw_limit=100)
    plan = huge.describe(MODEL)["index"]
    assert plan["type"] == "ivf_flat" and plan["nprobe"] == 32


@pytest.mark.parametrize("exact_limit", [50_000, 100], ids=["exact", "ann"])
def test_filter_over_several_row_ranges_with_exclusions(tmp_path: Path, exact_limit: int) -> None:
    store = FaissStore(tmp_path / "vi", exact_limit=exact_limit)
    written = fill(store)
    loaded = store._load(MODEL)
    assert loaded is not None
    two = SearchFilter(regions=("alps",), date_from=DATES[1], date_to=DATES[2])
    sel = loaded.select(two)
    assert sel is not None and sel.ranges.shape == (1, 2)  # adjacent partitions merge into one range
    one_date = SearchFilter(date_from=DATES[2], date_to=DATES[2])
    gap = loaded.select(one_date)
    assert gap is not None and gap.ranges.shape[0] == 2  # same date, two regions: not adjacent
    q = queries(1, seed=3)[0]
    first = brute_force(written, q, one_date)
    excluded = ((first[0][0], first[0][1]), (first[5][0], first[5][1]),
                (written[("alps", DATES[0])][0].chip_id, DATES[0]))  # the last is outside the filter
    flt = SearchFilter(date_from=DATES[2], date_to=DATES[2], exclude=excluded)
    n_match = len(written[("alps", DATES[2])]) + len(written[("delta", DATES[2])]) - 2
    expected = brute_force(written, q, flt)
    assert len(expected) == n_match
    hits = store.search(MODEL, q, 10_000, flt)
    assert len(hits) == n_match  # every matching vector, none of the excluded
    assert [(h.chip_id, h.date, h.region) for h in hits] == [e[:3] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[3] for e in expected], atol=1e-5)
    top = store.search(MODEL, q, 10, flt)
    assert {(h.chip_id, h.date) for h in top} == {e[:2] for e in expected[:10]}
    assert store.search(MODEL, q, 5, SearchFilter(regions=("nowhere",))) == []


def test_changes_by_other_writers_are_seen(tmp_path: Path) -> None:
    writer = FaissStore(tmp_path / "vi")
    written = fill(writer)
    slow = FaissStore(tmp_path / "vi", rescan_s=3600.0)
    prompt = FaissStore(tmp_path / "vi", rescan_s=0.0)
    key = ("delta", DATES[0])
    q = written[key][0].vector
    first = written[key][0].chip_id
    assert slow.search(MODEL, q, 1)[0].chip_id == prompt.search(MODEL, q, 1)[0].chip_id == first
    # an upsert through any FaissStore rewrites the _changes marker: seen at once by every reader
    writer.upsert_partition(MODEL, *key, written[key][1:])
    assert (writer.model_dir(MODEL) / "_changes").exists()
    assert slow.search(MODEL, q, 1)[0].chip_id != written[key][0].chip_id
    # a file removed behind the store's back: seen on the next full listing (rescan_s)
    writer.partition_path(MODEL, *key).unlink()
    remaining = sum(len(v) for k, v in written.items() if k != key)
    assert len(prompt.search(MODEL, q, 10_000)) == remaining
    assert len(slow.search(MODEL, q, 10_000)) == remaining + len(written[key]) - 1  # still cached
    slow.rescan_s = 0.0
    assert len(slow.search(MODEL, q, 10_000)) == remaining


def test_build_index_ahead_and_memory_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = partition_records("alps", DATES[0], 300, seed=1)
    FaissStore(tmp_path / "vi").upsert_partition(MODEL, "alps", DATES[0], records)
    store = FaissStore(tmp_path / "vi", exact_limit=100)
    with caplog.at_level("WARNING", logger="geofm_assets.search.faiss_store"):
        info = store.build_index(MODEL)
    assert info["type"] == "hnsw_flat" and info["vectors"] == 300 and info["persisted"] is True
    assert "inside this call" in caplog.text  # a build is never silent
    loaded = store._load(MODEL)
    assert loaded is not None and loaded.ann is not None
    assert not loaded.vectors.flags.owndata  # searched in the HNSW's own storage, not a copy
    caplog.clear()
    with caplog.at_level("WARNING", logger="geofm_assets.search.faiss_store"):
        fresh = FaissStore(tmp_path / "vi", exact_limit=100)
        fresh.search(MODEL, queries(1)[0], 5)
        assert fresh.build_index(MODEL)["reused"] is True
    assert caplog.text == ""  # read from disk, not built in the search
    assert FaissStore(tmp_path / "vi").build_index(MODEL) == {"type": "exact", "metric": "inner_product",
                                                              "vectors": 300}
    with pytest.raises(StoreError, match="nothing is indexed for model 'other'"):
        store.build_index("other")


def test_background_build_answers_exactly_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exact = FaissStore(tmp_path / "vi")
    fill(exact, sizes=(100, 90, 80))
    release = threading.Event()
    build = FaissStore._build_ann

    def held_build(plan: dict, vectors: np.ndarray) -> object:
        assert release.wait(30)
        return build(plan, vectors)

    monkeypatch.setattr(FaissStore, "_build_ann", staticmethod(held_build))
    store = FaissStore(tmp_path / "vi", exact_limit=100, ann_in_background=True)
    q = queries(1)[0]
    hits = store.search(MODEL, q, 10)  # returns while the index is being built
    loaded = store._load(MODEL)
    assert loaded is not None and loaded.ann is None
    assert loaded.ann_info["state"] == "building in the background"
    assert hits == exact.search(MODEL, q, 10)  # answered exactly meanwhile
    release.set()
    store._builders[MODEL].join(30)
    assert loaded.ann is not None and loaded.ann_info["reused"] is False
    assert len(store.search(MODEL, q, 10)) == 10


def test_at_most_max_models_are_held(tmp_path: Path) -> None:
    store = FaissStore(tmp_path / "vi", max_models=2)
    for model in ("a", "b", "c"):
        fill(store, model=model, sizes=(10,))
        store.search(model, queries(1)[0], 3)
    assert list(store._cache) == ["b", "c"]
    store.search("b", queries(1)[0], 3)
    assert list(store._cache) == ["c", "b"]  # least recently searched first out
    with pytest.raises(StoreError, match="max_models"):
        FaissStore(tmp_path / "vi", max_models=0)


def test_hnsw_ef_search_grows_as_the_filter_narrows() -> None:
    assert hnsw_ef_search(10, 20, 1_000_000, 1_000_000) == 128  # unfiltered: the default
    assert hnsw_ef_search(100, 200, 1_000_000, 1_000_000) == 400  # twice the candidates fetched
    assert hnsw_ef_search(10, 40, 1_000_000, 500_000) == 128
    assert hnsw_ef_search(10, 40, 1_000_000, 83_334) == 150  # 8% of the rows: 1.25 k / selectivity
    assert hnsw_ef_search(10, 40, 1_000_000, 41_667) == 300
    with pytest.raises(StoreError, match="0 matching rows of 10"):
        hnsw_ef_search(10, 40, 10, 0)


def random_grid(store: FaissStore, rng: np.random.Generator) -> tuple[dict, tuple[dt.date, ...]]:
    """4 regions x 6 dates of 200 random 32-dim vectors (no clusters: the hard case for a graph)."""
    dates = tuple(dt.date(2024, 1, 1) + dt.timedelta(days=10 * i) for i in range(6))
    written: dict = {}
    for region in ("r0", "r1", "r2", "r3"):
        for date in dates:
            vecs = rng.standard_normal((200, 32)).astype(np.float32)
            recs = [VectorRecord(f"{region}_{i}", date, region, vecs[i], 0.0, 0.0) for i in range(200)]
            store.upsert_partition(MODEL, region, date, recs)
            written[(region, date)] = recs
    return written, dates


def test_selective_filter_keeps_recall_through_hnsw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter letting 2 of the 24 partitions (8%) through, answered by HNSW: with efSearch fixed
    at max(64, 2 x 40) recall@10 was ~0.94 here; scaled by 1 / selectivity, ~0.99."""
    rng = np.random.default_rng(11)
    store = FaissStore(tmp_path / "vi", exact_limit=200)
    written, dates = random_grid(store, rng)
    assert store.build_index(MODEL)["type"] == "hnsw_flat"
    efs: list[int] = []

    def spy(k: int, fetch: int, n: int, n_match: int) -> int:
        efs.append(hnsw_ef_search(k, fetch, n, n_match))
        return efs[-1]

    monkeypatch.setattr(faiss_store, "hnsw_ef_search", spy)
    flt = SearchFilter(regions=("r2",), date_from=dates[1], date_to=dates[2])
    recall = []
    for q in rng.standard_normal((50, 32)).astype(np.float32):
        hits = store.search(MODEL, q, 10, flt)
        assert len(hits) == 10 and all(h.region == "r2" and dates[1] <= h.date <= dates[2] for h in hits)
        truth = {(b[0], b[1]) for b in brute_force(written, q, flt)[:10]}
        recall.append(len(truth & {(h.chip_id, h.date) for h in hits}) / 10)
    assert efs == [150] * 50  # 400 of 4800 rows: 1.25 x 10 x 12, through the HNSW every time
    assert np.mean(recall) >= 0.97


def test_filtered_subset_under_exact_limit_goes_the_cheaper_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below ``exact_limit`` a filtered subset is scanned exactly while that costs less than the
    HNSW walk (HNSW_ROWS_PER_EF x efSearch rows), else searched through the HNSW."""
    rng = np.random.default_rng(5)
    store = FaissStore(tmp_path / "vi", exact_limit=4000)
    written, dates = random_grid(store, rng)  # 4800 rows: past exact_limit, so an HNSW exists
    assert store.build_index(MODEL)["type"] == "hnsw_flat"
    answered_by_ann = spy_on_ann_search(monkeypatch)
    loaded = store._load(MODEL)
    assert loaded is not None
    narrow = SearchFilter(regions=("r2",), date_from=dates[1], date_to=dates[2])  # 400 rows
    wide = SearchFilter(regions=("r0", "r1", "r2"))  # 3600 rows, still under exact_limit
    # 400 rows: efSearch 150 -> ~3600 rows' worth of walk: scanning is cheaper
    assert not store.uses_ann(loaded, 10, 400, filtered=True)
    # 3600 rows: efSearch 128 -> ~3072 rows' worth: the walk is cheaper
    assert store.uses_ann(loaded, 10, 3600, filtered=True)
    assert not store.uses_ann(loaded, 10, 3600, filtered=False)  # never for an unfiltered subset
    for flt, by_ann in ((narrow, False), (wide, True)):
        answered_by_ann.clear()
        recall = []
        for q in rng.standard_normal((20, 32)).astype(np.float32):
            hits = store.search(MODEL, q, 10, flt)
            assert len(hits) == 10
            truth = {(b[0], b[1]) for b in brute_force(written, q, flt)[:10]}
            recall.append(len(truth & {(h.chip_id, h.date) for h in hits}) / 10)
        assert answered_by_ann == ([True] * 20 if by_ann else [])
        assert np.mean(recall) >= (0.95 if by_ann else 1.0)
    # IVF: the subset under exact_limit is always scanned
    ivf = FaissStore(tmp_path / "vi", exact_limit=4000, hnsw_limit=4000)
    assert ivf.build_index(MODEL)["type"] == "ivf_flat"
    ivf_loaded = ivf._load(MODEL)
    assert ivf_loaded is not None and not ivf.uses_ann(ivf_loaded, 10, 3600, filtered=True)
    assert ivf.uses_ann(ivf_loaded, 10, 4001, filtered=True)
