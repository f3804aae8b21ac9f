"""Labels for heads trained on frozen embeddings: chip observations read from the lake, and
their classes from a land-cover raster (the sample's truth by default) or from a user's
labelled points or polygons (GeoJSON or GeoParquet).

Chip labels from a raster: the majority class of the raster under the chip's footprint (read
on the chip's own 10 m grid, in its UTM CRS). Forest cleared by a deforestation event on or
before the observation date is no longer what the raster says (the raster is the land cover
before any event), so those pixels are left out of the count; an observation whose footprint is
mostly cleared (more than ``max_cleared``) is dropped, and counted as such. Pixel labels for
segmentation mark the same cleared pixels ``IGNORE`` (neither in the loss nor in the metrics).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, checked_segment
from geofm_assets.models.quality import embedding_matrix

IGNORE = 255  # pixel label: no truth here (outside the raster, or cleared by then)
MIXED = "mixed"  # chip class when no class covers ``min_share`` of the footprint
CHIP_GSD = 10.0  # metres: the chips' pixel size, and the grid label windows are read on
LONLAT = CRS.from_epsg(4326)


class LabelError(ValueError):
    """A labels source that cannot be used (missing file, property, geometry or CRS)."""


class HeadEncoderMismatch(ValueError):
    """A head used with embeddings or features of an encoder it was not trained on."""


def check_same_encoder(what: str, trained: tuple[str, str], given: tuple[str, str]) -> None:
    """Raise ``HeadEncoderMismatch`` unless ``given`` (encoder name, checkpoint digest) is the
    ``trained`` one."""
    if tuple(trained) != tuple(given):
        raise HeadEncoderMismatch(
            f"{what} was trained on {trained[0]} (checkpoint {trained[1]}) but is given "
            f"{given[0]} (checkpoint {given[1]}); a head only works with the encoder it was trained "
            f"on: retrain it on {given[0]}, or embed with {trained[0]}"
        )


def write_head_meta(path: Path, doc: Mapping[str, Any]) -> None:
    """A head's JSON description at ``path``, written to a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def read_head_meta(folder: Path, weights_file: str, meta_file: str, format_version: int, what: str,
                   asset: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON description of the head saved in ``folder`` (beside ``weights_file``), after
    checking both files are there and the format is the one this code reads; ``error`` names
    ``what`` is missing and the ``asset`` to materialize."""
    weights, meta = folder / weights_file, folder / meta_file
    if not weights.exists() or not meta.exists():
        raise error(f"no {what} in {folder} ({weights_file} and {meta_file} expected): "
                    f"materialize {asset} first")
    doc: dict[str, Any] = json.loads(meta.read_text())
    if doc.get("format_version") != format_version:
        raise error(f"{meta} has format {doc.get('format_version')}, this code reads "
                    f"{format_version}: materialize {asset} again")
    return doc


# --- chip observations ------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ChipObservations:
    """Embedded chips, one row per (chip, date), read from the lake's ``embeddings`` and
    ``chips`` partitions."""

    chip_ids: np.ndarray  # [M] str
    regions: np.ndarray  # [M] str
    dates: np.ndarray  # [M] datetime64[D]
    epsg: np.ndarray  # [M] int
    bounds: np.ndarray  # [M 4] float64: x_min, y_min, x_max, y_max in the chip's UTM CRS
    rows: np.ndarray  # [M] int: the chip's row and col on its region's grid
    cols: np.ndarray  # [M] int
    geometries: list[bytes]  # [M] WKB footprint, EPSG:4326
    vectors: np.ndarray  # [M D] float32
    model: str | None
    checkpoint_digest: str | None

    def __len__(self) -> int:
        return len(self.chip_ids)

    @property
    def encoder(self) -> tuple[str, str]:
        return (str(self.model), str(self.checkpoint_digest))

    def subset(self, keep: np.ndarray) -> ChipObservations:
        """The observations where the bool mask ``keep`` [M] is true (or at integer indices)."""
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        return ChipObservations(
            self.chip_ids[idx], self.regions[idx], self.dates[idx], self.epsg[idx],
            self.bounds[idx], self.rows[idx], self.cols[idx],
            [self.geometries[i] for i in idx], self.vectors[idx], self.model, self.checkpoint_digest,
        )


def partition_tables(lake_root: Path, region: str, date: str) -> tuple[pa.Table, pa.Table] | None:
    """(embeddings, chips) tables of one partition, or None when embeddings are missing."""
    base = Path(lake_root)
    emb_path = base / "embeddings" / f"region={region}" / f"date={date}" / EMBEDDINGS_TABLE
    if not emb_path.exists():
        return None
    chips_path = base / "chips" / f"region={region}" / f"date={date}" / CHIPS_TABLE
    if not chips_path.exists():
        raise LabelError(f"{emb_path} exists but its chips table {chips_path} does not: "
                         f"materialize chips and embeddings for {date}|{region} again")
    return pq.read_table(emb_path), pq.read_table(chips_path)


def observations_from_tables(emb: pa.Table, chips: pa.Table) -> ChipObservations:
    """Join one partition's embeddings to its chips table (UTM bounds, grid row/col) by chip id."""
    chip_rows = {r["chip_id"]: r for r in chips.select(
        ["chip_id", "epsg", "x_min", "y_min", "x_max", "y_max", "row", "col"]).to_pylist()}
    ids = emb.column("chip_id").to_pylist()
    missing = [c for c in ids if c not in chip_rows]
    if missing:
        raise LabelError(f"embeddings of chips {missing[:5]} have no row in the chips table: "
                         "materialize embeddings again after chips")
    rows = [chip_rows[c] for c in ids]
    models = set(zip(emb.column("model").to_pylist(), emb.column("checkpoint_digest").to_pylist(),
                     strict=True))
    if len(models) > 1:
        raise LabelError(f"one embeddings partition holds vectors of several models: {sorted(models)}")
    model, digest = next(iter(models)) if models else (None, None)
    n = len(ids)
    return ChipObservations(
        chip_ids=np.asarray(ids, dtype=object),
        regions=np.asarray(emb.column("region").to_pylist(), dtype=object),
        dates=np.asarray(emb.column("date").to_numpy(), dtype="datetime64[D]"),
        epsg=np.asarray([r["epsg"] for r in rows], np.int64),
        bounds=np.asarray([[r["x_min"], r["y_min"], r["x_max"], r["y_max"]] for r in rows],
                          np.float64).reshape(n, 4),
        rows=np.asarray([r["row"] for r in rows], np.int64),
        cols=np.asarray([r["col"] for r in rows], np.int64),
        geometries=emb.column("geometry").to_pylist(),
        vectors=embedding_matrix(emb) if n else np.zeros((0, 0), np.float32),
        model=model, checkpoint_digest=digest,
    )


def concat_observations(parts: Sequence[ChipObservations]) -> ChipObservations:
    parts = [p for p in parts if len(p)]
    if not parts:
        empty = np.array([], dtype=object)
        return ChipObservations(empty, empty, np.array([], "datetime64[D]"), np.array([], np.int64),
                                np.zeros((0, 4)), np.array([], np.int64), np.array([], np.int64), [],
                                np.zeros((0, 0), np.float32), None, None)
    encoders = sorted({p.encoder for p in parts})
    if len(encoders) > 1:
        raise LabelError(
            "the embeddings come from more than one model/checkpoint "
            f"({', '.join(f'{m} {c[:16]}' for m, c in encoders)}): materialize them again with one "
            "encoder before training a head on them")
    dims = {p.vectors.shape[1] for p in parts}
    if len(dims) > 1:
        raise LabelError(f"the embeddings have different sizes {sorted(dims)}")
    return ChipObservations(
        np.concatenate([p.chip_ids for p in parts]), np.concatenate([p.regions for p in parts]),
        np.concatenate([p.dates for p in parts]), np.concatenate([p.epsg for p in parts]),
        np.concatenate([p.bounds for p in parts]), np.concatenate([p.rows for p in parts]),
        np.concatenate([p.cols for p in parts]), [g for p in parts for g in p.geometries],
        np.concatenate([p.vectors for p in parts]), parts[0].model, parts[0].checkpoint_digest,
    )


def load_observations(lake_root: Path, regions: Sequence[str] | None = None) -> ChipObservations:
    """Every materialized ``embeddings`` partition of ``regions`` (default: all in the lake),
    joined to its chips table. All must come from one encoder and checkpoint."""
    base = Path(lake_root) / "embeddings"
    if regions:
        names = [checked_segment("region", r) for r in regions]
    else:
        names = sorted(p.name.removeprefix("region=") for p in base.glob("region=*")) if base.exists() else []
    parts = []
    for region in names:
        for part in sorted((base / f"region={region}").glob("date=*")):
            tables = partition_tables(lake_root, region, part.name.removeprefix("date="))
            if tables is not None and tables[0].num_rows:
                parts.append(observations_from_tables(*tables))
    return concat_observations(parts)


# --- labels from a land-cover raster ----------------------------------------------------------
@dataclass(frozen=True)
class ClearingEvent:
    event_id: str
    date_cleared: dt.date
    polygon: BaseGeometry  # EPSG:4326


def read_clearing_events(path: Path) -> list[ClearingEvent]:
    """Deforestation events (GeoJSON polygons in lon/lat with a ``date_cleared`` property)."""
    doc = read_json(path, "deforestation events")
    events = []
    for i, feature in enumerate(doc.get("features") or []):
        props = feature.get("properties") or {}
        try:
            day = dt.date.fromisoformat(str(props["date_cleared"]))
            polygon = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelError(f"{path}, feature {i}: needs a polygon and a YYYY-MM-DD date_cleared ({exc})"
                             ) from exc
        events.append(ClearingEvent(str(props.get("event_id", feature.get("id", i))), day, polygon))
    return events


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LabelError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise LabelError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise LabelError(f"{what} file {path} is not a GeoJSON object")
    return doc


def chip_shape(bounds: np.ndarray, resolution: float = CHIP_GSD) -> tuple[int, int]:
    x0, y0, x1, y1 = bounds
    return round((y1 - y0) / resolution), round((x1 - x0) / resolution)


class LandcoverTruth:
    """A land-cover class raster (any CRS) read onto chip grids, plus the deforestation events
    that make its forest out of date.

    ``classes``: code -> name, from ``landcover_classes.json`` beside the raster, else the
    raster's ``CLASS_<code>`` tags; code 0 and the raster's nodata are no class."""

    def __init__(self, raster_path: Path, events_path: Path | None = None,
                 classes: dict[int, str] | None = None) -> None:
        self.path = Path(raster_path)
        if not self.path.exists():
            raise LabelError(
                f"land-cover raster {self.path} does not exist: run `geofm sample-data` (it writes "
                "truth/landcover.tif beside the catalog) or give a labels file")
        self.dataset = rasterio.open(self.path)
        self.nodata = int(self.dataset.nodata) if self.dataset.nodata is not None else 0
        self.classes = classes or self._read_classes()
        self.events = read_clearing_events(events_path) if events_path and Path(events_path).exists() else []
        self.events_path = events_path
        self._to_utm: dict[int, Transformer] = {}

    @classmethod
    def beside_catalog(cls, catalog: str | Path) -> LandcoverTruth:
        """The sample's truth: ``truth/landcover.tif`` and ``truth/deforestation.geojson``
        beside the catalog file."""
        if "://" in str(catalog):
            raise LabelError(f"the STAC catalog {catalog} is not a local sample: it has no truth raster "
                             "beside it; give a labels file (labels_path) instead")
        truth = Path(catalog).parent / "truth"
        return cls(truth / "landcover.tif", truth / "deforestation.geojson")

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> LandcoverTruth:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _read_classes(self) -> dict[int, str]:
        table = self.path.with_name("landcover_classes.json")
        if table.exists():
            return {int(k): str(v) for k, v in json.loads(table.read_text()).items()}
        tags = self.dataset.tags()
        found = {int(k.removeprefix("CLASS_")): v for k, v in tags.items()
                 if k.startswith("CLASS_") and k.removeprefix("CLASS_").isdigit()}
        if not found:
            raise LabelError(f"land-cover raster {self.path} has no class table: put landcover_classes.json "
                             "({\"1\": \"forest\", ...}) beside it or CLASS_<code> tags in it")
        return found

    def window(self, bounds: np.ndarray, epsg: int, resolution: float = CHIP_GSD) -> np.ndarray:
        """[H W] uint8 class codes on the chip's grid (nearest neighbour; 0 where the raster has
        no data or does not reach)."""
        h, w = chip_shape(bounds, resolution)
        x0, y0, x1, y1 = (float(v) for v in bounds)
        dst_transform = Affine(resolution, 0.0, x0, 0.0, -resolution, y1)
        src = self.dataset
        sb = rasterio.warp.transform_bounds(f"EPSG:{epsg}", src.crs, x0, y0, x1, y1, densify_pts=21)
        exact = rasterio.windows.from_bounds(*sb, transform=src.transform)
        col0, row0 = int(np.floor(exact.col_off)) - 1, int(np.floor(exact.row_off)) - 1
        win = rasterio.windows.Window(col0, row0, int(np.ceil(exact.width)) + 3,
                                      int(np.ceil(exact.height)) + 3)  # a pixel of margin around
        block = src.read(1, window=win, boundless=True, fill_value=self.nodata)  # [h' w']
        out = np.zeros((h, w), np.uint8)
        rasterio.warp.reproject(
            block, out, src_transform=src.window_transform(win), src_crs=src.crs,
            src_nodata=self.nodata, dst_transform=dst_transform, dst_crs=f"EPSG:{epsg}",
            dst_nodata=0, resampling=rasterio.warp.Resampling.nearest,
        )
        if self.nodata != 0:
            out[out == self.nodata] = 0
        return out

    def cleared(self, bounds: np.ndarray, epsg: int, day: dt.date,
                resolution: float = CHIP_GSD) -> np.ndarray:
        """[H W] bool: cleared by an event on or before ``day``."""
        h, w = chip_shape(bounds, resolution)
        if epsg not in self._to_utm:
            self._to_utm[epsg] = Transformer.from_crs(LONLAT, CRS.from_epsg(epsg), always_xy=True)
        to_utm = self._to_utm[epsg]
        footprint = box(*(float(v) for v in bounds))
        shapes = []
        for event in self.events:
            if event.date_cleared > day:
                continue
            poly = shapely.transform(event.polygon, lambda x, y: to_utm.transform(x, y), interleaved=False)
            if poly.intersects(footprint):
                shapes.append(poly)
        if not shapes:
            return np.zeros((h, w), bool)
        transform = Affine(resolution, 0.0, float(bounds[0]), 0.0, -resolution, float(bounds[3]))
        return rasterio.features.rasterize(shapes, out_shape=(h, w), transform=transform,
                                           dtype=np.uint8).astype(bool)

    def pixel_labels(self, bounds: np.ndarray, epsg: int, day: dt.date) -> np.ndarray:
        """[H W] uint8 class codes of the chip on ``day``; ``IGNORE`` where there is no class
        or the forest was cleared by then."""
        codes = self.window(bounds, epsg)
        codes = np.where(codes == 0, IGNORE, codes).astype(np.uint8)
        codes[self.cleared(bounds, epsg, day)] = IGNORE
        return codes


@dataclass
class ChipLabels:
    """One label per observation (None where dropped), the class names, and why rows dropped."""

    labels: np.ndarray  # [M] object: class name or None
    classes: tuple[str, ...]  # every class name the source knows, in its own order
    dropped: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        """[M] bool: observations with a label."""
        return np.array([v is not None for v in self.labels], bool)


def labels_from_truth(
    obs: ChipObservations,
    truth: LandcoverTruth,
    *,
    min_share: float = 0.0,
    max_cleared: float = 0.5,
    min_valid: float = 0.5,
) -> ChipLabels:
    """Each observation's majority class under its footprint, cleared pixels left out (see the
    module doc). Dropped: ``mostly_cleared`` (cleared share > ``max_cleared``), ``no_truth``
    (less than ``min_valid`` of the footprint has a class). With ``min_share`` > 0, a chip whose
    majority class covers less than that share of its classified pixels is ``mixed``."""
    if not 0 <= min_share <= 1 or not 0 <= max_cleared <= 1 or not 0 <= min_valid <= 1:
        raise LabelError("min_share, max_cleared and min_valid are shares between 0 and 1")
    names = dict(truth.classes)
    labels = np.full(len(obs), None, dtype=object)
    dropped: Counter[str] = Counter()
    windows: dict[str, np.ndarray] = {}
    for i in range(len(obs)):
        cid = str(obs.chip_ids[i])
        if cid not in windows:
            windows[cid] = truth.window(obs.bounds[i], int(obs.epsg[i]))
        codes = windows[cid]
        cleared = truth.cleared(obs.bounds[i], int(obs.epsg[i]), obs.dates[i].item())
        if cleared.mean() > max_cleared:
            dropped["mostly_cleared"] += 1
            continue
        valid = (codes != 0) & ~cleared
        if valid.mean() < max(min_valid, 1e-9):
            dropped["no_truth"] += 1
            continue
        counts = np.bincount(codes[valid], minlength=256)
        code = int(counts.argmax())
        share = counts[code] / valid.sum()
        labels[i] = MIXED if share < min_share else names.get(code, f"class_{code}")
    classes = tuple(names[k] for k in sorted(names)) + ((MIXED,) if min_share > 0 else ())
    return ChipLabels(labels, classes, dict(dropped), {
        "kind": "raster", "path": str(truth.path), "events": str(truth.events_path or ""),
        "rule": "majority class under the footprint; pixels cleared by the observation date left out",
        "min_share": min_share, "max_cleared": max_cleared,
    })


# --- labels from a user's points or polygons --------------------------------------------------
@dataclass(frozen=True)
class LabelFeatures:
    geometries: list[BaseGeometry]  # EPSG:4326
    classes: list[str]


def read_label_features(path: Path, class_property: str) -> LabelFeatures:
    """Labelled points or polygons from GeoJSON (lon/lat) or (Geo)Parquet (WKB ``geometry``, CRS
    from its ``geo`` metadata; or ``lon``/``lat`` columns), reprojected to EPSG:4326. Features
    whose class is null are skipped."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"labels file {path} does not exist")
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        geoms, values, available = _read_parquet_labels(path, class_property)
    elif path.suffix.lower() in (".geojson", ".json"):
        geoms, values, available = _read_geojson_labels(path, class_property)
    else:
        raise LabelError(f"labels file {path}: use GeoJSON (.geojson) or GeoParquet (.parquet)")
    if values is None:
        raise LabelError(f"labels file {path} has no property {class_property!r}; it has "
                         f"{', '.join(sorted(available)) or 'none'}: set class_property to one of them")
    keep = [(g, str(v)) for g, v in zip(geoms, values, strict=True) if v is not None and g is not None]
    bad = sorted({g.geom_type for g, _ in keep} - {"Point", "MultiPoint", "Polygon", "MultiPolygon"})
    if bad:
        raise LabelError(f"labels file {path} has {', '.join(bad)} geometries: use points or polygons")
    if not keep:
        raise LabelError(f"labels file {path} has no feature with a {class_property!r} value")
    return LabelFeatures([g for g, _ in keep], [v for _, v in keep])


LabelColumns = tuple[list[BaseGeometry | None], list[Any] | None, set[str]]  # geometries, classes, names


def _read_geojson_labels(path: Path, prop: str) -> LabelColumns:
    doc = read_json(path, "labels")
    crs_name = ((doc.get("crs") or {}).get("properties") or {}).get("name", "")
    if crs_name and not any(s in crs_name.upper() for s in ("CRS84", "4326")):
        raise LabelError(f"labels file {path} declares CRS {crs_name}; GeoJSON must be lon/lat (RFC 7946)")
    features = doc.get("features")
    if not isinstance(features, list):
        raise LabelError(f"labels file {path} is not a GeoJSON FeatureCollection")
    available: set[str] = set()
    geoms: list[BaseGeometry | None] = []
    values: list[Any] = []
    for i, feature in enumerate(features):
        props = feature.get("properties") or {}
        available |= set(props)
        try:
            geoms.append(shape(feature["geometry"]) if feature.get("geometry") else None)
        except (KeyError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
            raise LabelError(f"labels file {path}, feature {i}: bad geometry ({exc})") from exc
        values.append(props.get(prop))
    return geoms, (values if prop in available else None), available


def _read_parquet_labels(path: Path, prop: str) -> LabelColumns:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
    available = set(table.column_names)
    if geo is not None:
        column = geo.get("primary_column", "geometry")
        info = geo.get("columns", {}).get(column, {})
        if info.get("encoding", "WKB").upper() != "WKB":
            raise LabelError(f"labels file {path}: geometry encoding {info.get('encoding')} is not "
                             "supported; write WKB")
        geoms = list(shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False)))
        crs = info.get("crs")
        if crs is not None:
            source = CRS.from_json_dict(crs) if isinstance(crs, dict) else CRS.from_user_input(crs)
            if not source.equals(LONLAT, ignore_axis_order=True):
                to_lonlat = Transformer.from_crs(source, LONLAT, always_xy=True)
                geoms = [None if g is None else shapely.transform(
                    g, lambda x, y: to_lonlat.transform(x, y), interleaved=False) for g in geoms]
        available.discard(column)
    elif {"lon", "lat"} <= available:
        geoms = list(shapely.points(table.column("lon").to_numpy(), table.column("lat").to_numpy()))
    else:
        raise LabelError(f"labels file {path} is neither GeoParquet (a `geo` metadata key) nor has lon/lat "
                         "columns")
    values = table.column(prop).to_pylist() if prop in table.column_names else None
    return geoms, values, available


def labels_from_features(
    obs: ChipObservations, features: LabelFeatures, *, min_cover: float = 0.5,
    source: dict[str, Any] | None = None,
) -> ChipLabels:
    """Join labelled points or polygons to chips spatially; a chip's label holds on every date.

    Polygons: the class covering most of the chip's footprint, kept when it covers at least
    ``min_cover`` of it. Points (for chips no polygon labels): the class of most points inside
    the footprint; a tie is ``conflicting_points``. Chips with neither are ``unlabelled``."""
    if not 0 < min_cover <= 1:
        raise LabelError(f"min_cover is a share of the chip in (0, 1], got {min_cover}")
    is_point = np.array([g.geom_type in ("Point", "MultiPoint") for g in features.geometries])
    polygons = [g for g, p in zip(features.geometries, is_point, strict=True) if not p]
    poly_cls = [c for c, p in zip(features.classes, is_point, strict=True) if not p]
    points = [g for g, p in zip(features.geometries, is_point, strict=True) if p]
    point_cls = [c for c, p in zip(features.classes, is_point, strict=True) if p]
    poly_tree = shapely.STRtree(polygons) if polygons else None
    point_tree = shapely.STRtree(points) if points else None
    per_chip: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for i in range(len(obs)):
        cid = str(obs.chip_ids[i])
        if cid in per_chip:
            continue
        footprint = shapely.from_wkb(obs.geometries[i])
        label: str | None = None
        reason = "unlabelled"
        if poly_tree is not None:
            cover: Counter[str] = Counter()
            for j in poly_tree.query(footprint, predicate="intersects"):
                area = footprint.intersection(polygons[j]).area
                if area > 0:  # touching edges are no cover
                    cover[poly_cls[j]] += area
            if cover:
                cls, area = cover.most_common(1)[0]
                if area / footprint.area >= min_cover:
                    label = cls
                else:
                    reason = "too_little_cover"
        if label is None and point_tree is not None:
            votes = Counter(point_cls[j] for j in point_tree.query(footprint, predicate="intersects"))
            if votes:
                top = votes.most_common(2)
                if len(top) > 1 and top[0][1] == top[1][1]:
                    reason = "conflicting_points"
                else:
                    label = top[0][0]
        per_chip[cid] = label
        reasons[cid] = reason
    labels = np.array([per_chip[str(c)] for c in obs.chip_ids], dtype=object)
    dropped = Counter(reasons[str(c)] for c, v in zip(obs.chip_ids, labels, strict=True) if v is None)
    return ChipLabels(labels, tuple(sorted(set(features.classes))), dict(dropped), {
        "kind": "features", "n_features": len(features.classes), "points": int(is_point.sum()),
        "polygons": int((~is_point).sum()), "min_cover": min_cover, **(source or {}),
    })


def labels_from_file(obs: ChipObservations, path: Path, class_property: str,
                     *, min_cover: float = 0.5) -> ChipLabels:
    """``labels_from_features`` on a GeoJSON / GeoParquet labels file."""
    features = read_label_features(path, class_property)
    return labels_from_features(obs, features, min_cover=min_cover,
                                source={"path": str(path), "class_property": class_property})
