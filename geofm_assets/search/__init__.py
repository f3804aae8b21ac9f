"""Vector stores for chip embeddings: FAISS over Parquet in the lake (embedded default) and
OpenSearch k-NN (production). No Dagster imports here."""

from geofm_assets.search.base import SearchFilter, SearchHit, StoreError, VectorRecord, VectorStore
from geofm_assets.search.faiss_store import FaissStore
from geofm_assets.search.opensearch_store import OpenSearchStore

__all__ = [
    "FaissStore",
    "OpenSearchStore",
    "SearchFilter",
    "SearchHit",
    "StoreError",
    "VectorRecord",
    "VectorStore",
]
