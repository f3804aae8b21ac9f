"""bench/search.py's OpenSearch rows, run on the in-memory client (no cluster can be had here):
the same partitions, filters and recall@10 as its FAISS rows, and the bench's index removed."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from memory_opensearch import MemoryOpenSearch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "search.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_search", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_opensearch_rows_measure_the_same_searches_as_the_faiss_rows(bench: ModuleType) -> None:
    base, queries, _ = bench.clustered(1200, 16, 12)
    client = MemoryOpenSearch()
    res = bench.through_opensearch(base, queries, "http://localhost:9200", client=client)
    faiss_rows = bench.through_store(base, queries)
    assert set(res["filters"]) == set(faiss_rows["filters"]) == set(bench.FILTERS)
    for name, f in res["filters"].items():
        assert f["matching"] == faiss_rows["filters"][name]["matching"]
        # the in-memory client searches exactly, as the store does at this size
        assert f["recall"] == pytest.approx(1.0) and f["all_k"]
        assert f["path"] == "opensearch faiss hnsw"
    assert res["recall"] == res["filters"][bench.HEADLINE]["recall"]
    # written, merged, warmed up, measured, then the bench's index deleted
    (index,) = {i for _, i in client.calls}
    assert index.startswith("geofm-bench-")
    assert [c for c, _ in client.calls if c != "refresh"] == ["forcemerge", "warmup", "delete"]
    assert client.docs == {}
    assert res["graph_bytes_per_vector"] == pytest.approx(1024.0)
    assert res["disk_bytes_per_vector"] > 16 * 4
