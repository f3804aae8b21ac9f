"""Similar-chip search for people and programs: reference chips (or a point) -> ranked chips.

``find_similar`` is what ``geofm search`` runs; notebooks call it directly.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import shapely
from shapely.geometry import mapping

from geofm_assets.lake import table_glob
from geofm_assets.search import SearchFilter, StoreError, VectorStore


class SearchRequestError(ValueError):
    """A search that cannot be answered: unknown chip, date without embeddings, ..."""


@dataclass(frozen=True)
class ChipRef:
    chip_id: str
    date: dt.date
    region: str


def _query(sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    try:
        return duckdb.execute(sql, list(params)).fetchall()
    except duckdb.IOException:
        return []  # no file matches the glob: nothing materialized yet


def embedded_dates(lake_root: Path, chip_id: str, model: str) -> list[tuple[dt.date, str]]:
    """(date, region) of every embedding of ``chip_id`` by ``model`` in the lake, newest first."""
    rows = _query(
        f"SELECT DISTINCT date, region FROM read_parquet('{table_glob(lake_root, 'embeddings')}') "
        "WHERE chip_id = ? AND model = ? ORDER BY date DESC",
        [chip_id, model],
    )
    return [(r[0], r[1]) for r in rows]


def chip_at_point(lake_root: Path, lon: float, lat: float, date: dt.date) -> ChipRef:
    """The kept chip of ``date`` whose footprint holds (lon, lat)."""
    rows = _query(
        f"SELECT chip_id, region, geometry FROM read_parquet('{table_glob(lake_root, 'chips')}') "
        "WHERE date = ? AND ? BETWEEN centroid_lon - 0.05 AND centroid_lon + 0.05 "
        "AND ? BETWEEN centroid_lat - 0.05 AND centroid_lat + 0.05",
        [date, lon, lat],
    )
    point = shapely.Point(lon, lat)
    for chip_id, region, wkb in rows:
        if shapely.from_wkb(wkb).covers(point):
            return ChipRef(chip_id, date, region)
    raise SearchRequestError(f"no kept chip on {date} covers the point ({lon}, {lat})")


def resolve_reference(lake_root: Path, chip_id: str, date: dt.date | None, model: str) -> ChipRef:
    dates = embedded_dates(lake_root, chip_id, model)
    if not dates:
        raise SearchRequestError(
            f"chip {chip_id!r} has no {model} embedding in the lake: check the id (`geofm sql "
            f"\"SELECT DISTINCT chip_id FROM embeddings\"`) or materialize its embeddings"
        )
    if date is None:
        return ChipRef(chip_id, dates[0][0], dates[0][1])
    for d, region in dates:
        if d == date:
            return ChipRef(chip_id, d, region)
    listed = ", ".join(str(d) for d, _ in sorted(dates))
    raise SearchRequestError(f"chip {chip_id!r} has no {model} embedding on {date}; it has: {listed}")


def find_similar(
    store: VectorStore,
    lake_root: Path,
    model: str,
    *,
    chips: Sequence[str] = (),
    date: dt.date | None = None,
    point: tuple[float, float] | None = None,
    k: int = 10,
    min_score: float | None = None,
    regions: Sequence[str] | None = None,
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
    exclude_self: bool = False,
) -> dict[str, Any]:
    """Chips most like the reference chips (their average vector) or the chip under ``point``.

    Returns ``{"query": {...}, "results": [{chip_id, date, region, score, lon, lat,
    thumbnail}, ...]}``, cosine scores best first. ``exclude_self`` leaves out the reference
    chips' own ground on every date, so the results are other places."""
    lake_root = Path(lake_root)
    if k < 1:
        raise SearchRequestError("k must be at least 1")
    if point is not None:
        if date is None:
            raise SearchRequestError("--point needs --date: chips are kept per date")
        refs = [chip_at_point(lake_root, point[0], point[1], date)]
    elif chips:
        refs = [resolve_reference(lake_root, c, date, model) for c in chips]
    else:
        raise SearchRequestError("give reference chips (--chip/--chips) or a --point")
    vectors = []
    for ref in refs:
        try:
            v = store.get_vector(model, ref.chip_id, ref.date)
        except StoreError as exc:
            raise SearchRequestError(str(exc)) from exc
        if v is None:
            raise SearchRequestError(
                f"chip {ref.chip_id} on {ref.date} is not in the {model} index: materialize "
                f"vector_index for {ref.date}|{ref.region}"
            )
        vectors.append(np.asarray(v, np.float32))
    query = np.mean(vectors, axis=0)
    query /= max(float(np.linalg.norm(query)), 1e-12)
    exclude: list[tuple[str, dt.date]] = []
    if exclude_self:
        for ref in refs:
            exclude.extend((ref.chip_id, d) for d, _ in embedded_dates(lake_root, ref.chip_id, model))
    flt = SearchFilter(
        regions=tuple(regions) if regions else None, date_from=date_from, date_to=date_to,
        exclude=tuple(exclude),
    )
    try:
        hits = store.search(model, query, k, flt)
    except StoreError as exc:
        raise SearchRequestError(str(exc)) from exc
    results = [
        {
            "chip_id": h.chip_id, "date": h.date.isoformat(), "region": h.region,
            "score": round(float(h.score), 6), "lon": h.lon, "lat": h.lat,
            "thumbnail": str(lake_root / "chips" / f"region={h.region}" / f"date={h.date}"
                             / "thumbnails" / f"{h.chip_id}.png"),
        }
        for h in hits
        if min_score is None or h.score >= min_score
    ]
    return {
        "query": {
            "model": model, "chips": [{"chip_id": r.chip_id, "date": r.date.isoformat(),
                                       "region": r.region} for r in refs],
            "point": list(point) if point else None, "k": k, "min_score": min_score,
            "regions": list(regions) if regions else None,
            "from": date_from.isoformat() if date_from else None,
            "to": date_to.isoformat() if date_to else None, "exclude_self": exclude_self,
        },
        "results": results,
    }


def results_geojson(lake_root: Path, answer: dict[str, Any]) -> dict[str, Any]:
    """The results as a FeatureCollection of chip footprints (EPSG:4326), for QGIS."""
    features = []
    for r in answer["results"]:
        rows = _query(
            f"SELECT geometry FROM read_parquet('{table_glob(Path(lake_root), 'chips')}') "
            "WHERE chip_id = ? AND date = ?",
            [r["chip_id"], dt.date.fromisoformat(r["date"])],
        )
        geometry = mapping(shapely.from_wkb(rows[0][0])) if rows else None
        features.append({"type": "Feature", "geometry": geometry, "properties": dict(r)})
    return {"type": "FeatureCollection", "features": features, "query": answer["query"]}


def as_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, default=str)
