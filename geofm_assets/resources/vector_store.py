"""The vector store: FAISS index files in the lake (embedded default) or OpenSearch k-NN."""

from __future__ import annotations

from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from geofm_assets.search import FaissStore, OpenSearchStore, VectorStore


class VectorStoreResource(ConfigurableResource):
    """``kind`` picks the store. Secrets (OpenSearch basic-auth credentials) come only through
    ``EnvVar``s in the resource definition, never literal configuration."""

    kind: Literal["faiss", "opensearch"] = "faiss"
    root: str | None = Field(default=None, description="FAISS: index folder (default: lake/vector_index)")
    url: str | None = Field(default=None, description="OpenSearch endpoint, e.g. https://host:9200")
    username: str | None = None
    password: str | None = None
    aws_region: str | None = Field(default=None, description="SigV4 signing region (managed service)")
    aws_service: Literal["es", "aoss"] = "es"
    index_prefix: str = "geofm-embeddings"

    def store(self) -> VectorStore:
        if self.kind == "faiss":
            if not self.root:
                raise ValueError("the FAISS vector store needs a root folder")
            return FaissStore(self.root)
        if not self.url:
            raise ValueError("the OpenSearch vector store needs url (set GEOFM_OPENSEARCH_URL)")
        return OpenSearchStore(
            url=self.url, username=self.username, password=self.password,
            aws_region=self.aws_region, aws_service=self.aws_service, index_prefix=self.index_prefix,
        )
