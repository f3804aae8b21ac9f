"""OpenSearchStore against a live cluster: set OPENSEARCH_URL (and OPENSEARCH_USERNAME /
OPENSEARCH_PASSWORD for basic auth; OPENSEARCH_VERIFY_CERTS=0 for a self-signed dev cluster)."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from geofm_assets.search import OpenSearchStore, SearchFilter, StoreError, VectorRecord

pytestmark = pytest.mark.integration

if not os.environ.get("OPENSEARCH_URL"):
    pytest.skip("OPENSEARCH_URL is not set: no OpenSearch cluster to test against", allow_module_level=True)

DATES = (dt.date(2024, 5, 3), dt.date(2024, 6, 2))


def partition(region: str, date: dt.date, n: int, seed: int, dim: int = 16) -> list[VectorRecord]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1).normal(size=(3, dim))
    vectors = centres[rng.choice(3, size=n, p=[0.6, 0.3, 0.1])] + 0.3 * rng.normal(size=(n, dim))
    return [VectorRecord(f"{region}_r0000_c{i:04d}", date, region, vectors[i].astype(np.float32),
                         10.0 + 0.01 * i, 45.0) for i in range(n)]


@pytest.fixture
def store() -> Iterator[OpenSearchStore]:
    s = OpenSearchStore(
        url=os.environ["OPENSEARCH_URL"], username=os.environ.get("OPENSEARCH_USERNAME"),
        password=os.environ.get("OPENSEARCH_PASSWORD"),
        verify_certs=os.environ.get("OPENSEARCH_VERIFY_CERTS", "1") != "0",
        index_prefix=f"geofm-test-{uuid.uuid4().hex[:8]}",
    )
    yield s
    s.client.indices.delete(index=f"{s.index_prefix}-*", ignore_unavailable=True)


def test_live_upsert_count_search_and_dimension(store: OpenSearchStore) -> None:
    model = "hf:org/vit-tiny"
    written = {}
    for r_i, region in enumerate(("alps", "delta")):
        for d_i, date in enumerate(DATES):
            recs = partition(region, date, 30 + 10 * d_i, seed=10 * r_i + d_i)
            written[(region, date)] = recs
            store.upsert_partition(model, region, date, recs)
    total = sum(len(v) for v in written.values())
    assert store.count(model) == total
    store.upsert_partition(model, "alps", DATES[0], written[("alps", DATES[0])])  # again: no duplicates
    assert store.count(model) == total
    store.upsert_partition(model, "alps", DATES[0], written[("alps", DATES[0])][:5])
    assert store.count(model, "alps", DATES[0]) == 5
    only = SearchFilter(regions=("delta",), date_from=DATES[1], date_to=DATES[1])
    hits = store.search(model, written[("delta", DATES[1])][0].vector, 10, only)
    assert len(hits) == 10 and all(h.region == "delta" and h.date == DATES[1] for h in hits)
    assert hits[0].chip_id == "delta_r0000_c0000" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    ex = store.search(model, written[("delta", DATES[1])][0].vector, 5,
                      SearchFilter(exclude=(("delta_r0000_c0000", DATES[1]),)))
    assert ("delta_r0000_c0000", DATES[1]) not in {(h.chip_id, h.date) for h in ex}
    with pytest.raises(StoreError, match="dimension 8"):
        store.upsert_partition(model, "alps", DATES[1], partition("alps", DATES[1], 3, seed=0, dim=8))
    assert store.get_vector(model, "delta_r0000_c0000", DATES[1]) is not None
    assert store.describe(model)["vectors"] == store.count(model)
