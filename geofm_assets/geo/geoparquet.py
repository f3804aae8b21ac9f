"""GeoParquet tables (WKB geometry in lon/lat, with the ``geo`` metadata key) written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import shapely

GEOPARQUET_VERSION = "1.1.0"


def geo_metadata(table: pa.Table, geometry_column: str = "geometry") -> dict[str, Any]:
    geoms = shapely.from_wkb(table.column(geometry_column).to_numpy(zero_copy_only=False))
    types = sorted({g.geom_type for g in geoms if g is not None})
    bbox = list(shapely.total_bounds(geoms)) if len(geoms) else []
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": types}
    if bbox and all(v == v for v in bbox):  # no NaN (empty table)
        column["bbox"] = bbox
    # no "crs" member: GeoParquet's default, OGC:CRS84 (lon/lat)
    return {"version": GEOPARQUET_VERSION, "primary_column": geometry_column,
            "columns": {geometry_column: column}}


def write_geoparquet(
    table: pa.Table,
    path: Path,
    *,
    geometry_column: str = "geometry",
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``table`` with GeoParquet metadata (plus any JSON ``extra_metadata`` keys) to a
    temporary name and rename it into place, so readers never see a partial file."""
    meta = dict(table.schema.metadata or {})
    meta[b"geo"] = json.dumps(geo_metadata(table, geometry_column)).encode()
    for key, value in (extra_metadata or {}).items():
        meta[key.encode()] = json.dumps(value).encode()
    table = table.replace_schema_metadata(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_json_metadata(path: Path, key: str) -> Any:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(key.encode())
    return json.loads(raw) if raw is not None else None
