"""The production vector store: one OpenSearch k-NN index per model (opensearch-py).

Each model gets the index ``{index_prefix}-{slug(model)}-{hash8(model)}`` (lowercase; the
hash keeps ``clay-v1.5`` and ``clay-v1-5`` apart), created on the first upsert with an HNSW
``knn_vector`` field in the ``innerproduct`` space. Vectors are L2-normalized on write and the
query on read, so the inner product is the cosine similarity.

Scores. For ``innerproduct`` OpenSearch turns the engine's distance into a score that grows
with similarity (docs: "k-NN vector > Spaces", field-types/supported-field-types/knn-spaces).
Faiss/NMSLIB use d = -x.y: score = 1 / (1 + d) when d >= 0, score = -d + 1 when d < 0;
Lucene uses d = x.y with the mirrored rule. In terms of ip = x.y both give
``score = 1 + ip`` for ip > 0 and ``score = 1 / (1 - ip)`` for ip <= 0, so the cosine is
recovered as ``score - 1`` when score > 1 and ``1 - 1 / score`` otherwise (``score_to_cosine``).

Documents have the deterministic id ``{chip_id}|{date}|{model}``: re-indexing a partition
overwrites its documents, and a delete-by-query removes the partition's documents that are
not in the new set, so a partition never holds duplicates or leftovers.

Filters go inside the ``knn`` clause (efficient filtering: the engine searches only matching
documents), so a filtered search returns k hits whenever k documents match.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

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

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128
MAX_K = 10_000  # OpenSearch's cap on k and on a search's size
VECTOR_FIELD = "vector"


# -- request bodies (pure functions, unit-tested without a server) ------------------------------


def index_name(prefix: str, model: str) -> str:
    """The model's index: lowercase, only [a-z0-9-], never starting with '-', '_' or '+'."""
    check_model(model)
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60] or "model"
    digest = hashlib.sha1(model.encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9_-]+", "-", prefix.lower()).strip("-_+") or "geofm-embeddings"
    return f"{base}-{slug}-{digest}"


def doc_id(chip_id: str, date: dt.date, model: str) -> str:
    return f"{chip_id}|{date.isoformat()}|{model}"


def index_body(dim: int, model: str, engine: str = "faiss") -> dict[str, Any]:
    """Settings and mappings of a model's index."""
    if engine not in ("faiss", "lucene"):
        raise StoreError(f"unsupported k-NN engine {engine!r}: use 'faiss' or 'lucene'")
    return {
        "settings": {"index": {"knn": True}},
        "mappings": {
            "_meta": {"model": model, "normalized": "l2", "score": "cosine = score - 1 if score > 1 "
                      "else 1 - 1 / score"},
            "properties": {
                VECTOR_FIELD: {
                    "type": "knn_vector",
                    "dimension": int(dim),
                    "method": {
                        "name": "hnsw",
                        "engine": engine,
                        "space_type": "innerproduct",
                        "parameters": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION},
                    },
                },
                "chip_id": {"type": "keyword"},
                "region": {"type": "keyword"},
                "model": {"type": "keyword"},
                "date": {"type": "date", "format": "strict_date"},
                "location": {"type": "geo_point"},
                "lon": {"type": "float"},
                "lat": {"type": "float"},
            },
        },
    }


def bulk_actions(
    index: str, model: str, records: Sequence[VectorRecord], matrix: np.ndarray
) -> list[dict[str, Any]]:
    """One ``index`` action per record (``matrix`` [N D]: the records' normalized vectors)."""
    return [
        {
            "_op_type": "index",
            "_index": index,
            "_id": doc_id(r.chip_id, r.date, model),
            "_source": {
                "chip_id": r.chip_id,
                "region": r.region,
                "model": model,
                "date": r.date.isoformat(),
                "location": {"lat": float(r.lat), "lon": float(r.lon)},
                "lon": float(r.lon),
                "lat": float(r.lat),
                VECTOR_FIELD: [float(x) for x in matrix[i]],
            },
        }
        for i, r in enumerate(records)
    ]


def partition_filter(region: str, date: dt.date) -> list[dict[str, Any]]:
    return [{"term": {"region": region}}, {"term": {"date": date.isoformat()}}]


def stale_docs_query(region: str, date: dt.date, keep_ids: Sequence[str]) -> dict[str, Any]:
    """Delete-by-query body: the partition's documents whose id is not in ``keep_ids``."""
    query: dict[str, Any] = {"bool": {"filter": partition_filter(region, date)}}
    if keep_ids:
        query["bool"]["must_not"] = [{"ids": {"values": list(keep_ids)}}]
    return {"query": query}


def filter_clause(flt: SearchFilter | None) -> dict[str, Any] | None:
    """The bool filter of a search (regions, date range, excluded (chip_id, date) pairs)."""
    if flt is None or flt.is_empty():
        return None
    musts: list[dict[str, Any]] = []
    if flt.regions is not None:
        musts.append({"terms": {"region": list(flt.regions)}})
    if flt.date_from is not None or flt.date_to is not None:
        bounds: dict[str, str] = {}
        if flt.date_from is not None:
            bounds["gte"] = flt.date_from.isoformat()
        if flt.date_to is not None:
            bounds["lte"] = flt.date_to.isoformat()
        musts.append({"range": {"date": bounds}})
    clause: dict[str, Any] = {"filter": musts}
    if flt.exclude:
        clause["must_not"] = [
            {"bool": {"filter": [{"term": {"chip_id": c}}, {"term": {"date": d.isoformat()}}]}}
            for c, d in flt.exclude
        ]
    return {"bool": clause}


def knn_query(vector: np.ndarray, k: int, flt: SearchFilter | None = None) -> dict[str, Any]:
    """The search body: k-NN on ``vector`` (already normalized) with the filter inside the knn
    clause, so the engine returns the k best *matching* documents."""
    if not 1 <= k <= MAX_K:
        raise StoreError(f"k must be between 1 and {MAX_K} for OpenSearch, got {k}")
    knn: dict[str, Any] = {"vector": [float(x) for x in np.asarray(vector, np.float32)], "k": int(k)}
    clause = filter_clause(flt)
    if clause is not None:
        knn["filter"] = clause
    return {
        "size": int(k),
        "query": {"knn": {VECTOR_FIELD: knn}},
        "_source": {"excludes": [VECTOR_FIELD]},
    }


def score_to_cosine(score: float) -> float:
    """OpenSearch's ``innerproduct`` score back to the inner product (= cosine, normalized vectors)."""
    score = float(score)
    if score > 1.0:
        return score - 1.0
    if score <= 0.0:
        raise StoreError(f"unexpected k-NN score {score} for the innerproduct space")
    return 1.0 - 1.0 / score


def bulk_error(index: str, errors: Sequence[dict[str, Any]]) -> StoreError | None:
    """A StoreError naming the failed documents of a bulk request (``helpers.bulk`` error items,
    ``{op_type: {"_id", "status", "error", ...}}``), or None when there are none."""
    if not errors:
        return None
    failed: list[str] = []
    reasons: dict[str, int] = {}
    for item in errors:
        body: dict[str, Any] = next(iter(item.values()), {}) if isinstance(item, dict) and item else {}
        failed.append(str(body.get("_id", "?")))
        err = body.get("error", "unknown error")
        reason = f"{err.get('type', '?')}: {err.get('reason', '')}" if isinstance(err, dict) else str(err)
        reason = f"status {body.get('status', '?')} {reason}"
        reasons[reason] = reasons.get(reason, 0) + 1
    shown = ", ".join(failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
    why = "; ".join(f"{r} (x{n})" for r, n in reasons.items())
    return StoreError(f"{len(failed)} documents failed to index into {index}: {shown} -- {why}")


def mapping_dimension(mapping_response: dict[str, Any]) -> int | None:
    """The ``vector`` field's dimension from a get-mapping response, None when absent."""
    for body in mapping_response.values():
        field = body.get("mappings", {}).get("properties", {}).get(VECTOR_FIELD)
        if field is not None and "dimension" in field:
            return int(field["dimension"])
    return None


def hit_from_doc(doc: dict[str, Any]) -> SearchHit:
    src = doc["_source"]
    return SearchHit(
        chip_id=src["chip_id"], date=dt.date.fromisoformat(str(src["date"])[:10]), region=src["region"],
        score=score_to_cosine(doc["_score"]), lon=float(src["lon"]), lat=float(src["lat"]),
    )


def redact_url(url: str) -> str:
    """The URL without any user:password part, for messages and metadata."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# -- the store -------------------------------------------------------------------------------


class OpenSearchStore(VectorStore):
    """OpenSearch k-NN, with basic auth (``username``/``password``) or AWS SigV4 (``aws_region``
    and ``aws_service`` "es" for managed domains or "aoss" for Serverless, credentials from
    boto3's default chain). ``client`` replaces the one built from the other arguments."""

    def __init__(
        self,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        aws_region: str | None = None,
        aws_service: str = "es",
        index_prefix: str = "geofm-embeddings",
        engine: str = "faiss",
        verify_certs: bool = True,
        timeout: float = 60.0,
        client: Any = None,
    ) -> None:
        if engine not in ("faiss", "lucene"):
            raise StoreError(f"unsupported k-NN engine {engine!r}: use 'faiss' or 'lucene'")
        self.url = url or ""
        self.index_prefix = index_prefix
        self.engine = engine
        self.client = client if client is not None else self._connect(
            url, username, password, aws_region, aws_service, verify_certs, timeout
        )
        # index -> its vector dimension, as last read from its mapping: a search is then one
        # request, not three (exists, mapping, search); dropped when a search fails
        self._dims: dict[str, int] = {}

    @staticmethod
    def _connect(
        url: str | None, username: str | None, password: str | None, aws_region: str | None,
        aws_service: str, verify_certs: bool, timeout: float,
    ) -> Any:
        from opensearchpy import AWSV4SignerAuth, OpenSearch, RequestsHttpConnection

        if not url:
            raise StoreError("the OpenSearch store needs a url, e.g. https://host:9200")
        kwargs: dict[str, Any] = {
            "hosts": [url], "verify_certs": verify_certs, "timeout": timeout,
            "use_ssl": url.startswith("https"),
        }
        if aws_region:
            if aws_service not in ("es", "aoss"):
                raise StoreError(f"aws_service must be 'es' or 'aoss', got {aws_service!r}")
            import boto3

            credentials = boto3.Session().get_credentials()
            if credentials is None:
                raise StoreError(
                    f"no AWS credentials found to sign requests to {redact_url(url)} (SigV4, "
                    f"{aws_service} in {aws_region}): configure a profile, role or environment keys"
                )
            kwargs["http_auth"] = AWSV4SignerAuth(credentials, aws_region, aws_service)
            kwargs["connection_class"] = RequestsHttpConnection
        elif username:
            kwargs["http_auth"] = (username, password or "")
        return OpenSearch(**kwargs)

    def index_name(self, model: str) -> str:
        return index_name(self.index_prefix, model)

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        from opensearchpy.exceptions import OpenSearchException

        try:
            yield
        except OpenSearchException as exc:
            raise StoreError(f"OpenSearch {what} failed at {redact_url(self.url)}: {exc}") from exc

    def _exists(self, index: str) -> bool:
        with self._calling(f"checking index {index}"):
            return bool(self.client.indices.exists(index=index))

    def _stored_dimension(self, index: str) -> int | None:
        with self._calling(f"reading the mapping of {index}"):
            return mapping_dimension(self.client.indices.get_mapping(index=index))

    def _create_index(self, index: str, dim: int, model: str) -> None:
        from opensearchpy.exceptions import RequestError

        with self._calling(f"creating index {index}"):
            try:
                self.client.indices.create(index=index, body=index_body(dim, model, self.engine))
            except RequestError as exc:  # created meanwhile by a concurrent upsert: fine
                if "resource_already_exists_exception" not in str(exc):
                    raise

    def upsert_partition(
        self, model: str, region: str, date: dt.date, records: Sequence[VectorRecord]
    ) -> int:
        from opensearchpy import helpers

        matrix = partition_matrix(model, region, date, records)  # [N D]
        index = self.index_name(model)
        if not self._exists(index):
            if not records:
                return 0
            self._create_index(index, matrix.shape[1], model)
        if records:
            stored = self._stored_dimension(index)
            if stored is None:
                raise StoreError(f"index {index} has no knn_vector field {VECTOR_FIELD!r} in its mapping")
            if stored != matrix.shape[1]:
                raise dimension_mismatch(model, matrix.shape[1], stored)
        keep = [doc_id(r.chip_id, r.date, model) for r in records]
        with self._calling(f"deleting the stale documents of {region} {date} in {index}"):
            self.client.delete_by_query(
                index=index, body=stale_docs_query(region, date, keep), conflicts="proceed", refresh=True
            )
        if records:
            with self._calling(f"bulk indexing {len(records)} documents into {index}"):
                _, errors = helpers.bulk(
                    self.client, bulk_actions(index, model, records, matrix), raise_on_error=False,
                    chunk_size=500, max_retries=3,
                )
            failure = bulk_error(index, errors)
            if failure is not None:
                raise failure
        with self._calling(f"refreshing {index}"):
            self.client.indices.refresh(index=index)
        return len(records)

    def count(self, model: str, region: str | None = None, date: dt.date | None = None) -> int:
        index = self.index_name(model)
        if not self._exists(index):
            return 0
        filters: list[dict[str, Any]] = []
        if region is not None:
            filters.append({"term": {"region": region}})
        if date is not None:
            filters.append({"term": {"date": date.isoformat()}})
        body = {"query": {"bool": {"filter": filters}}} if filters else {"query": {"match_all": {}}}
        with self._calling(f"counting documents of {index}"):
            return int(self.client.count(index=index, body=body)["count"])

    def search(
        self, model: str, vector: np.ndarray, k: int, filter: SearchFilter | None = None
    ) -> list[SearchHit]:
        index = self.index_name(model)
        cached = index in self._dims
        try:
            response = self._knn_search(index, model, vector, k, filter)
        except StoreError:
            self._dims.pop(index, None)
            if not cached:
                raise
            # the index may have been deleted or re-created since its dimension was read
            response = self._knn_search(index, model, vector, k, filter)
        hits = [hit_from_doc(doc) for doc in response["hits"]["hits"]]
        if not hits and self.count(model) == 0:
            raise nothing_indexed(model)
        return sorted(hits, key=lambda h: -h.score)[:k]

    def _knn_search(
        self, index: str, model: str, vector: np.ndarray, k: int, filter: SearchFilter | None
    ) -> dict[str, Any]:
        dim = self._dims.get(index)
        if dim is None:
            if not self._exists(index):
                raise nothing_indexed(model)
            dim = self._stored_dimension(index)
            if dim is None:
                raise nothing_indexed(model)
        q = normalize_query(vector, model, dim)  # a wrong query dimension is the caller's
        with self._calling(f"k-NN search in {index}"):
            response: dict[str, Any] = self.client.search(index=index, body=knn_query(q, k, filter))
        self._dims[index] = dim
        return response

    def get_vector(self, model: str, chip_id: str, date: dt.date) -> np.ndarray | None:
        from opensearchpy.exceptions import NotFoundError

        index = self.index_name(model)
        with self._calling(f"reading {chip_id} {date} from {index}"):
            try:
                doc = self.client.get(index=index, id=doc_id(chip_id, date, model),
                                      _source_includes=[VECTOR_FIELD])
            except NotFoundError:  # no such document, or no index for the model
                return None
        vector = doc.get("_source", {}).get(VECTOR_FIELD)
        return None if vector is None else np.asarray(vector, np.float32)

    def dimension(self, model: str) -> int | None:
        index = self.index_name(model)
        return self._stored_dimension(index) if self._exists(index) else None

    def describe(self, model: str) -> dict[str, Any]:
        index = self.index_name(model)
        exists = self._exists(index)
        return {
            "store": "opensearch",
            "url": redact_url(self.url),
            "model": model,
            "index": index,
            "index_type": "hnsw",
            "engine": self.engine,
            "space_type": "innerproduct",
            "parameters": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION},
            "score": "cosine = score - 1 if score > 1 else 1 - 1 / score",
            "vectors": self.count(model) if exists else 0,
            "dimension": self._stored_dimension(index) if exists else None,
        }
