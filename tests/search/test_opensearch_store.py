"""OpenSearchStore: request bodies and bulk-error handling without a server (always run), and
the store against a live cluster when ``OPENSEARCH_URL`` is set (see test_opensearch_live.py)."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import numpy as np
import pytest
from opensearchpy.serializer import JSONSerializer

from geofm_assets.search import OpenSearchStore, SearchFilter, StoreError, VectorRecord
from geofm_assets.search.opensearch_store import (
    bulk_actions,
    bulk_error,
    doc_id,
    index_body,
    index_name,
    knn_query,
    mapping_dimension,
    redact_url,
    score_to_cosine,
    stale_docs_query,
)

D1 = dt.date(2024, 5, 3)
D2 = dt.date(2024, 6, 2)


def test_index_name_is_lowercase_safe_and_distinct() -> None:
    a = index_name("geofm-embeddings", "hf:facebook/DINOv2-small")
    assert a.startswith("geofm-embeddings-hf-facebook-dinov2-small-")
    assert a == a.lower() and all(c.isalnum() or c == "-" for c in a)
    assert index_name("geofm-embeddings", "clay-v1.5") != index_name("geofm-embeddings", "clay-v1-5")
    assert index_name("geofm-embeddings", "rcf") == index_name("geofm-embeddings", "rcf")
    with pytest.raises(StoreError):
        index_name("geofm-embeddings", "")


def test_index_body_maps_a_knn_vector_in_the_innerproduct_space() -> None:
    body = index_body(768, "clay-v1")
    assert body["settings"]["index"]["knn"] is True
    props = body["mappings"]["properties"]
    assert props["vector"] == {
        "type": "knn_vector", "dimension": 768,
        "method": {"name": "hnsw", "engine": "faiss", "space_type": "innerproduct",
                   "parameters": {"m": 16, "ef_construction": 128}},
    }
    assert {props[f]["type"] for f in ("chip_id", "region", "model")} == {"keyword"}
    assert props["date"]["type"] == "date" and props["location"]["type"] == "geo_point"
    assert props["lon"]["type"] == props["lat"]["type"] == "float"
    assert body["mappings"]["_meta"]["model"] == "clay-v1"
    lucene = index_body(8, "m", engine="lucene")["mappings"]["properties"]["vector"]
    assert lucene["method"]["engine"] == "lucene"
    with pytest.raises(StoreError, match="engine"):
        index_body(8, "m", engine="nmslib")
    assert mapping_dimension({"geofm-embeddings-clay-v1-1234": {"mappings": body["mappings"]}}) == 768
    assert mapping_dimension({"x": {"mappings": {"properties": {}}}}) is None


def test_bulk_actions_have_deterministic_ids() -> None:
    recs = [VectorRecord(f"alps_r0000_c000{i}", D1, "alps", np.array([3.0, 4.0], np.float32) * (i + 1),
                         10.0 + i, 45.5) for i in range(2)]
    matrix = np.array([[0.6, 0.8], [0.6, 0.8]], np.float32)
    actions = bulk_actions("idx", "hf:org/vit", recs, matrix)
    assert [a["_id"] for a in actions] == ["alps_r0000_c0000|2024-05-03|hf:org/vit",
                                           "alps_r0000_c0001|2024-05-03|hf:org/vit"]
    assert actions[0]["_id"] == doc_id("alps_r0000_c0000", D1, "hf:org/vit")
    src = actions[1]["_source"]
    assert actions[1]["_op_type"] == "index" and actions[1]["_index"] == "idx"
    assert src["vector"] == pytest.approx([0.6, 0.8])
    assert src["location"] == {"lat": 45.5, "lon": 11.0} and (src["lon"], src["lat"]) == (11.0, 45.5)
    assert (src["date"], src["region"], src["model"]) == ("2024-05-03", "alps", "hf:org/vit")


def test_stale_docs_query_keeps_the_new_ids() -> None:
    body = stale_docs_query("alps", D1, ["a|2024-05-03|m"])
    assert body == {"query": {"bool": {
        "filter": [{"term": {"region": "alps"}}, {"term": {"date": "2024-05-03"}}],
        "must_not": [{"ids": {"values": ["a|2024-05-03|m"]}}],
    }}}
    assert "must_not" not in stale_docs_query("alps", D1, [])["query"]["bool"]  # empties the partition


def test_knn_query_puts_the_filters_inside_the_knn_clause() -> None:
    flt = SearchFilter(regions=("alps", "delta"), date_from=D1, date_to=D2,
                       exclude=(("alps_r0000_c0001", D1),))
    body = knn_query(np.array([0.6, 0.8], np.float32), 7, flt)
    assert body["size"] == 7 and set(body["query"]) == {"knn"}
    knn = body["query"]["knn"]["vector"]
    assert knn["k"] == 7 and knn["vector"] == pytest.approx([0.6, 0.8])
    assert knn["filter"] == {"bool": {
        "filter": [{"terms": {"region": ["alps", "delta"]}},
                   {"range": {"date": {"gte": "2024-05-03", "lte": "2024-06-02"}}}],
        "must_not": [{"bool": {"filter": [{"term": {"chip_id": "alps_r0000_c0001"}},
                                          {"term": {"date": "2024-05-03"}}]}}],
    }}
    assert "filter" not in knn_query(np.ones(2), 3)["query"]["knn"]["vector"]
    assert "filter" not in knn_query(np.ones(2), 3, SearchFilter())["query"]["knn"]["vector"]
    only_from = knn_query(np.ones(2), 3, SearchFilter(date_from=D1))["query"]["knn"]["vector"]["filter"]
    assert only_from == {"bool": {"filter": [{"range": {"date": {"gte": "2024-05-03"}}}]}}
    with pytest.raises(StoreError, match="k must be"):
        knn_query(np.ones(2), 0)


@pytest.mark.parametrize("cosine", [1.0, 0.73, 0.2, 0.0, -0.4, -1.0])
def test_score_to_cosine_inverts_the_innerproduct_score(cosine: float) -> None:
    # OpenSearch docs (k-NN spaces, innerproduct, faiss): d = -x.y; score = 1/(1+d) if d >= 0 else 1 - d
    d = -cosine
    score = 1.0 / (1.0 + d) if d >= 0 else 1.0 - d
    assert score_to_cosine(score) == pytest.approx(cosine)


def test_bulk_errors_become_a_store_error_naming_the_documents() -> None:
    assert bulk_error("idx", []) is None
    errors = [
        {"index": {"_index": "idx", "_id": "a|2024-05-03|m", "status": 400,
                   "error": {"type": "mapper_parsing_exception", "reason": "failed to parse [vector]"}}},
        {"index": {"_index": "idx", "_id": "b|2024-05-03|m", "status": 400,
                   "error": {"type": "mapper_parsing_exception", "reason": "failed to parse [vector]"}}},
        {"index": {"_index": "idx", "_id": "c|2024-05-03|m", "status": 429,
                   "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}},
    ]
    err = bulk_error("idx", errors)
    assert isinstance(err, StoreError)
    msg = str(err)
    assert "3 documents failed to index into idx" in msg
    assert all(i in msg for i in ("a|2024-05-03|m", "b|2024-05-03|m", "c|2024-05-03|m"))
    assert "mapper_parsing_exception" in msg and "(x2)" in msg and "status 429" in msg
    many = bulk_error("idx", [{"index": {"_id": f"d{i}", "status": 500, "error": "boom"}} for i in range(25)])
    assert many is not None and "and 5 more" in str(many)


class FakeIndices:
    def __init__(self) -> None:
        self.mappings: dict[str, dict] = {}

    def exists(self, index: str) -> bool:
        return index in self.mappings

    def create(self, index: str, body: dict) -> None:
        self.mappings[index] = {"mappings": body["mappings"]}

    def get_mapping(self, index: str) -> dict:
        self.mapping_reads = getattr(self, "mapping_reads", 0) + 1
        return {index: self.mappings[index]}

    def refresh(self, index: str) -> None:
        pass


class FakeClient:
    """Just enough of opensearch-py's client to check how the store uses it."""

    def __init__(self, bulk_failures: int = 0) -> None:
        self.indices = FakeIndices()
        self.transport = SimpleNamespace(serializer=JSONSerializer())
        self.deleted: list[dict] = []
        self.bulk_bodies: list[str] = []
        self.bulk_failures = bulk_failures

    def delete_by_query(self, index: str, body: dict, **kwargs: object) -> dict:
        self.deleted.append(body)
        return {"deleted": 0}

    def bulk(self, body: str, **kwargs: object) -> dict:  # what helpers.bulk sends
        lines = [line for line in body.splitlines() if line]
        ids = [json.loads(line)["index"]["_id"] for line in lines[::2]]
        self.bulk_bodies.append(body)
        items = []
        for i, _id in enumerate(ids):
            if i < self.bulk_failures:
                items.append({"index": {"_id": _id, "status": 400,
                                        "error": {"type": "mapper_parsing_exception", "reason": "bad"}}})
            else:
                items.append({"index": {"_id": _id, "status": 201}})
        return {"errors": self.bulk_failures > 0, "items": items}

    def search(self, index: str, body: dict) -> dict:
        from opensearchpy.exceptions import NotFoundError, RequestError

        if index not in self.indices.mappings:
            raise NotFoundError(404, "index_not_found_exception", {"index": index})
        dim = self.indices.mappings[index]["mappings"]["properties"]["vector"]["dimension"]
        if len(body["query"]["knn"]["vector"]["vector"]) != dim:
            raise RequestError(400, "illegal_argument_exception", "query vector has invalid dimension")
        self.last_search = body
        return {"hits": {"hits": [
            {"_score": 1.9, "_source": {"chip_id": "alps_r0000_c0000", "date": "2024-05-03", "region": "alps",
                                        "lon": 10.0, "lat": 45.0}},
            {"_score": 0.8, "_source": {"chip_id": "alps_r0000_c0001", "date": "2024-05-03", "region": "alps",
                                        "lon": 10.1, "lat": 45.0}},
        ]}}


def records(n: int, dim: int = 4) -> list[VectorRecord]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return [VectorRecord(f"alps_r0000_c{i:04d}", D1, "alps", vectors[i], 10.0, 45.0) for i in range(n)]


def test_upsert_creates_the_index_deletes_stale_docs_and_bulk_indexes() -> None:
    client = FakeClient()
    store = OpenSearchStore(client=client)
    assert store.upsert_partition("clay-v1", "alps", D1, records(3)) == 3
    index = store.index_name("clay-v1")
    assert store.dimension("clay-v1") == 4
    kept = client.deleted[0]["query"]["bool"]["must_not"][0]["ids"]["values"]
    assert kept[0] == "alps_r0000_c0000|2024-05-03|clay-v1"
    assert len(client.bulk_bodies) == 1 and index in client.bulk_bodies[0]
    with pytest.raises(StoreError, match=r"dimension 8 .*'clay-v1'.* dimension 4"):
        store.upsert_partition("clay-v1", "alps", D1, records(2, dim=8))
    hits = store.search("clay-v1", np.ones(4, np.float32), 2, SearchFilter(regions=("alps",)))
    assert [h.score for h in hits] == pytest.approx([0.9, 1 - 1 / 0.8])
    assert client.last_search["query"]["knn"]["vector"]["filter"]["bool"]["filter"][0] == {
        "terms": {"region": ["alps"]}}
    with pytest.raises(StoreError, match="query dimension 3"):
        store.search("clay-v1", np.ones(3, np.float32), 2)
    with pytest.raises(StoreError, match="nothing is indexed for model 'rcf'"):
        store.search("rcf", np.ones(4, np.float32), 2)


def test_upsert_raises_on_bulk_item_errors() -> None:
    store = OpenSearchStore(client=FakeClient(bulk_failures=2))
    with pytest.raises(StoreError, match=r"2 documents failed to index .*alps_r0000_c0000\|2024-05-03\|rcf"):
        store.upsert_partition("rcf", "alps", D1, records(3))


def test_connection_settings() -> None:
    assert redact_url("https://admin:secret@search.example.com:9200/") == "https://search.example.com:9200/"
    store = OpenSearchStore(url="https://localhost:9200", username="admin", password="pw")
    assert store.client.transport.hosts[0]["host"] == "localhost"
    with pytest.raises(StoreError, match="needs a url"):
        OpenSearchStore()
    with pytest.raises(StoreError, match="aws_service"):
        OpenSearchStore(url="https://x.es.amazonaws.com", aws_region="eu-west-1", aws_service="s3")


def test_search_reads_the_mapping_once_and_again_after_the_index_changes() -> None:
    client = FakeClient()
    store = OpenSearchStore(client=client)
    store.upsert_partition("clay-v1", "alps", D1, records(3))
    reads = client.indices.mapping_reads
    for _ in range(3):
        store.search("clay-v1", np.ones(4, np.float32), 2)
    assert client.indices.mapping_reads == reads + 1  # one request a search after the first
    # the index is re-created elsewhere with another dimension: the next search finds out,
    # reads the new mapping and answers (or says what is wrong with the query)
    index = store.index_name("clay-v1")
    client.indices.create(index, index_body(8, "clay-v1"))
    assert len(store.search("clay-v1", np.ones(8, np.float32), 2)) == 2
    with pytest.raises(StoreError, match="query dimension 4 differs from the dimension 8"):
        store.search("clay-v1", np.ones(4, np.float32), 2)
    # and a deleted index is "nothing indexed", not a stale answer
    del client.indices.mappings[index]
    with pytest.raises(StoreError, match="nothing is indexed for model 'clay-v1'"):
        store.search("clay-v1", np.ones(8, np.float32), 2)
