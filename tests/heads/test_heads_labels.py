"""Chip labels: the truth raster's majority class (cleared forest left out) and a user's
points / polygons joined to chips spatially."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.windows import from_bounds
from shapely.geometry import mapping

from geofm_assets.heads.classifier import train_classifier
from geofm_assets.heads.labels import (
    IGNORE,
    ChipObservations,
    LabelError,
    LandcoverTruth,
    labels_from_file,
    labels_from_truth,
    load_observations,
)


@pytest.fixture(scope="module")
def observations(tiny_lake) -> ChipObservations:
    return load_observations(tiny_lake.root)


@pytest.fixture
def truth(tiny_lake):
    with LandcoverTruth.beside_catalog(tiny_lake.sample.catalog_path) as t:
        yield t


def raster_counts(path: Path, bounds: np.ndarray) -> np.ndarray:
    """Class counts [7] under a chip, read straight from the raster (the sample's grid is the
    chips' grid: same CRS, 10 m, aligned)."""
    with rasterio.open(path) as ds:
        codes = ds.read(1, window=from_bounds(*bounds, transform=ds.transform), boundless=True, fill_value=0)
    assert codes.shape == (256, 256)
    return np.bincount(codes.ravel(), minlength=7)


def forest_share(truth_path: Path, obs: ChipObservations, i: int) -> float:
    counts = raster_counts(truth_path, obs.bounds[i])
    return float(counts[1] / counts.sum())


def test_observations_are_every_embedded_chip_of_the_lake(observations, tiny_lake):
    tables = list(Path(tiny_lake.root, "embeddings").glob("region=*/date=*/embeddings.parquet"))
    assert len(observations) == sum(pq.read_metadata(t).num_rows for t in tables) > 0
    assert observations.vectors.shape == (len(observations), 512)
    assert observations.model == "rcf" and set(observations.regions) == {"jamari", "candeias"}


def test_truth_label_is_the_majority_class_under_the_footprint(observations, truth, tiny_lake):
    before_events = observations.dates == np.datetime64(tiny_lake.dates[0])  # 2020: nothing cleared yet
    first = observations.subset(before_events)
    labels = labels_from_truth(first, truth)
    assert labels.kept.all() and labels.dropped == {}
    for i in range(len(first)):
        counts = raster_counts(truth.path, first.bounds[i])
        assert labels.labels[i] == truth.classes[int(counts[1:].argmax()) + 1]
    assert labels.classes == ("forest", "pasture", "crops", "water", "bare_soil", "urban")


def test_forest_cleared_by_the_observation_date_is_left_out(observations, truth):
    event = truth.events[0]  # each event lies in forest, inside one chip or across a few
    footprints = shapely.from_wkb(observations.geometries)
    hit = np.array([f.intersects(event.polygon) for f in footprints])
    before = hit & (observations.dates < np.datetime64(event.date_cleared))
    after = hit & (observations.dates >= np.datetime64(event.date_cleared))
    assert before.any() and after.any(), "the tiny sample has a chip observed before and after event 1"
    i, j = np.flatnonzero(before)[0], np.flatnonzero(after)[0]
    bounds, epsg, days = observations.bounds, observations.epsg, observations.dates
    assert not truth.cleared(bounds[i], int(epsg[i]), days[i].item()).any()
    cleared = truth.cleared(bounds[j], int(epsg[j]), days[j].item())
    assert cleared.any()
    codes = truth.window(observations.bounds[j], int(observations.epsg[j]))
    assert (codes[cleared] == 1).all()  # it was forest ...
    pixels = truth.pixel_labels(bounds[j], int(epsg[j]), days[j].item())
    assert (pixels[cleared] == IGNORE).all() and (pixels[~cleared] == codes[~cleared]).all()  # ... no longer
    strict = labels_from_truth(observations.subset(after | before), truth, max_cleared=0.0)
    assert strict.dropped["mostly_cleared"] >= 1  # observations with any cleared pixel dropped
    sub = observations.subset(after | before)
    dropped_dates = sub.dates[~strict.kept]
    assert (dropped_dates >= np.datetime64(min(e.date_cleared for e in truth.events))).all()


def test_min_share_makes_a_mixed_class(observations, truth):
    plain = labels_from_truth(observations, truth)
    mixed = labels_from_truth(observations, truth, min_share=0.7)
    assert "mixed" in set(mixed.labels) and "mixed" not in set(plain.labels)
    changed = mixed.labels != plain.labels
    assert (mixed.labels[changed] == "mixed").all()


def write_points(path: Path, points: list[tuple[float, float, str | None]], prop: str = "class") -> Path:
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
                 "properties": {prop: c, "note": "field visit"}} for x, y, c in points]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def centroid_points(obs: ChipObservations, truth_path: Path) -> dict[str, tuple[float, float, str]]:
    """A point at each chip's centre labelled 'forest' (forest >= 70 %) or 'mosaic'."""
    out = {}
    for i in range(len(obs)):
        cid = str(obs.chip_ids[i])
        if cid not in out:
            c = shapely.from_wkb(obs.geometries[i]).centroid
            out[cid] = (c.x, c.y, "forest" if forest_share(truth_path, obs, i) >= 0.7 else "mosaic")
    return out


def test_user_points_are_joined_to_the_chips_they_fall_in(observations, truth, tmp_path):
    points = centroid_points(observations, truth.path)
    ids = sorted(points)
    conflict, unlabelled = ids[0], ids[1]
    x, y, _ = points[conflict]
    rows = [p for cid, p in points.items() if cid not in (conflict, unlabelled)]
    rows += [(x, y, "forest"), (x + 1e-4, y, "mosaic"), (-60.0, -5.0, "forest"), (x, y + 1e-4, None)]
    path = write_points(tmp_path / "labels.geojson", rows)
    labels = labels_from_file(observations, path, "class")
    for i, cid in enumerate(observations.chip_ids):
        expected = None if cid in (conflict, unlabelled) else points[str(cid)][2]
        assert labels.labels[i] == expected, cid
    per_obs = {str(c): n for c, n in zip(*np.unique(observations.chip_ids.astype(str), return_counts=True),
                                        strict=True)}
    assert labels.dropped == {"conflicting_points": per_obs[conflict], "unlabelled": per_obs[unlabelled]}
    assert labels.classes == ("forest", "mosaic") and labels.source["points"] == len(rows) - 1

    # the classifier learns the labels from the embeddings, on chips it never saw
    _clf, report = train_classifier(observations.vectors, labels.labels, observations.chip_ids,
                                   encoder=observations.encoder)
    assert report.n_groups == len(ids) - 2
    assert report.accuracy > report.baseline_accuracy
    assert report.macro_f1 > report.baseline_macro_f1


def test_polygon_labels_and_geoparquet_points(observations, truth, tmp_path):
    points = centroid_points(observations, truth.path)
    cid = sorted(points)[0]
    i = int(np.flatnonzero(observations.chip_ids == cid)[0])
    footprint = shapely.from_wkb(observations.geometries[i])
    west, south, _, north = footprint.bounds
    half = shapely.box(*footprint.bounds).intersection(
        shapely.box(west, south, footprint.centroid.x + 0.002, north))
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": mapping(half), "properties": {"lc": "pasture"}}]}
    (tmp_path / "poly.geojson").write_text(json.dumps(doc))
    labels = labels_from_file(observations, tmp_path / "poly.geojson", "lc", min_cover=0.5)
    assert set(labels.labels[observations.chip_ids == cid]) == {"pasture"}
    assert sum(v is not None for v in labels.labels) == (observations.chip_ids == cid).sum()
    strict = labels_from_file(observations, tmp_path / "poly.geojson", "lc", min_cover=0.9)
    assert not strict.kept.any()  # (neighbours the polygon grazes are too little covered as well)
    assert strict.dropped["too_little_cover"] >= (observations.chip_ids == cid).sum()

    table = pa.table({"lon": [p[0] for p in points.values()], "lat": [p[1] for p in points.values()],
                      "landcover": [p[2] for p in points.values()]})
    pq.write_table(table, tmp_path / "points.parquet")
    from_parquet = labels_from_file(observations, tmp_path / "points.parquet", "landcover")
    from_geojson = labels_from_file(observations, write_points(tmp_path / "p.geojson", list(points.values())),
                                    "class")
    assert list(from_parquet.labels) == list(from_geojson.labels)


def test_bad_label_files_are_clear_errors(observations, tmp_path):
    path = write_points(tmp_path / "labels.geojson", [(-63.0, -9.1, "forest")], prop="kind")
    with pytest.raises(LabelError, match=r"no property 'class'.*kind"):
        labels_from_file(observations, path, "class")
    with pytest.raises(LabelError, match="does not exist"):
        labels_from_file(observations, tmp_path / "missing.geojson", "class")
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(LabelError, match="GeoJSON"):
        labels_from_file(observations, tmp_path / "labels.csv", "class")
    with pytest.raises(LabelError, match=r"landcover\.tif does not exist"):
        LandcoverTruth.beside_catalog(tmp_path / "catalog.json")


def test_a_day_before_every_event_clears_nothing(truth, observations):
    day = min(e.date_cleared for e in truth.events) - dt.timedelta(days=1)
    assert not any(truth.cleared(observations.bounds[i], int(observations.epsg[i]), day).any()
                   for i in range(len(observations)))
