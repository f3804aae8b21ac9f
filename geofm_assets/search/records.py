"""From the lake's embeddings tables to vector-store records."""

from __future__ import annotations

import pyarrow as pa

from geofm_assets.models.quality import embedding_matrix
from geofm_assets.search import VectorRecord


def records_from_embeddings(table: pa.Table) -> list[VectorRecord]:
    """One record per row of an ``embeddings.parquet`` table."""
    if table.num_rows == 0:
        return []
    matrix = embedding_matrix(table)
    cols = table.select(["chip_id", "date", "region", "centroid_lon", "centroid_lat"]).to_pydict()
    return [
        VectorRecord(chip_id=c, date=d, region=r, vector=matrix[i], lon=lon, lat=lat)
        for i, (c, d, r, lon, lat) in enumerate(
            zip(cols["chip_id"], cols["date"], cols["region"], cols["centroid_lon"],
                cols["centroid_lat"], strict=True)
        )
    ]
