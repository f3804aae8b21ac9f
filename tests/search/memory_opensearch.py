"""An in-memory stand-in for the part of opensearch-py's client that OpenSearchStore and
bench/search.py call, answering k-NN queries by exact search. It runs their code paths where
no cluster can be had; what OpenSearch itself does is tested against a live cluster
(test_opensearch_live.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
from opensearchpy.exceptions import NotFoundError
from opensearchpy.serializer import JSONSerializer


def _matches(query: dict[str, Any], doc_id: str, src: dict[str, Any]) -> bool:
    (kind, body), = query.items()
    if kind == "match_all":
        return True
    if kind == "bool":
        return all(_matches(q, doc_id, src) for q in body.get("filter", [])) and not any(
            _matches(q, doc_id, src) for q in body.get("must_not", [])
        )
    if kind == "term":
        (field, value), = body.items()
        return bool(src.get(field) == value)
    if kind == "terms":
        (field, values), = body.items()
        return src.get(field) in values
    if kind == "range":
        (field, bounds), = body.items()
        v = src.get(field)
        return ("gte" not in bounds or v >= bounds["gte"]) and ("lte" not in bounds or v <= bounds["lte"])
    if kind == "ids":
        return doc_id in body["values"]
    raise ValueError(f"query {kind!r} is not supported by the in-memory client")


class _Indices:
    def __init__(self, owner: MemoryOpenSearch) -> None:
        self.owner = owner

    def exists(self, index: str) -> bool:
        return index in self.owner.docs

    def create(self, index: str, body: dict[str, Any]) -> None:
        self.owner.docs[index] = {}
        self.owner.mappings[index] = body["mappings"]

    def get_mapping(self, index: str) -> dict[str, Any]:
        if index not in self.owner.mappings:
            raise NotFoundError(404, "index_not_found_exception", {"index": index})
        return {index: {"mappings": self.owner.mappings[index]}}

    def refresh(self, index: str) -> None:
        self.owner.calls.append(("refresh", index))

    def forcemerge(self, index: str, **kwargs: Any) -> None:
        self.owner.calls.append(("forcemerge", index))

    def stats(self, index: str, metric: str) -> dict[str, Any]:
        size = sum(len(json.dumps(d)) for d in self.owner.docs[index].values())
        return {"indices": {index: {"primaries": {"store": {"size_in_bytes": size}}}}}

    def delete(self, index: str, ignore_unavailable: bool = False) -> None:
        self.owner.calls.append(("delete", index))
        self.owner.docs.pop(index, None)
        self.owner.mappings.pop(index, None)


class MemoryOpenSearch:
    def __init__(self) -> None:
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.mappings: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.indices = _Indices(self)
        self.transport = SimpleNamespace(serializer=JSONSerializer(), perform_request=self._perform)

    def _perform(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        if url.startswith("/_plugins/_knn/warmup/"):
            self.calls.append(("warmup", url.rsplit("/", 1)[1]))
            return {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if url.startswith("/_plugins/_knn/stats"):
            warmed = {i for c, i in self.calls if c == "warmup"}
            kib = sum(len(docs) for i, docs in self.docs.items() if i in warmed)  # ~1 KiB a vector
            return {"nodes": {"node-1": {"graph_memory_usage": kib}}}
        raise ValueError(f"{method} {url} is not supported by the in-memory client")

    def bulk(self, body: str, **kwargs: Any) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line]
        items = []
        for action, src in zip(lines[::2], lines[1::2], strict=True):
            meta = action["index"]
            self.docs[meta["_index"]][meta["_id"]] = src
            items.append({"index": {"_id": meta["_id"], "status": 201}})
        return {"errors": False, "items": items}

    def delete_by_query(self, index: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        docs = self.docs[index]
        gone = [i for i, src in docs.items() if _matches(body["query"], i, src)]
        for i in gone:
            del docs[i]
        return {"deleted": len(gone)}

    def count(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"count": sum(_matches(body["query"], i, s) for i, s in self.docs[index].items())}

    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        knn = body["query"]["knn"]["vector"]
        q = np.asarray(knn["vector"], np.float32)
        flt = knn.get("filter", {"match_all": {}})
        hits = []
        for doc_id, src in self.docs[index].items():
            if _matches(flt, doc_id, src):
                ip = float(np.asarray(src["vector"], np.float32) @ q)
                score = 1.0 + ip if ip > 0 else 1.0 / (1.0 - ip)
                hits.append({"_id": doc_id, "_score": score,
                             "_source": {k: v for k, v in src.items() if k != "vector"}})
        hits.sort(key=lambda h: -h["_score"])
        return {"hits": {"hits": hits[: knn["k"]]}}
