"""Seeded synthetic Sentinel-2 L2A sample: a static STAC catalog laid out like Earth Search v1.

Two adjacent MGRS tiles in Rondônia (UTM 20 S, EPSG:32720), 20LMQ and 20LNQ, overlapping by
256 px as real neighbouring tiles do, observed on the 5-day revisit grid from 2020 to 2022. The
ground is one land-cover raster over both tiles (forest, fishbone pasture, soy fields, a river,
a town) in which forest polygons are cleared at known dates; the truth is written beside the
catalog. Every scene adds what real L2A data has: seasonality, illumination, haze, clouds with
shadows, sensor noise, swath-edge no-data and the +1000 DN offset of processing baseline 04.00.

Randomness is seeded: the ground by ``seed``; the atmosphere of a date (both tiles are one
datatake) by ``(seed, date)``; sensor noise by ``(seed, tile, date)``. The processing baseline
never enters a generator, so one ground written under two baselines harmonizes identically.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pystac
import rasterio
import rasterio.features
from affine import Affine
from pyproj import Transformer
from scipy.ndimage import distance_transform_edt, gaussian_filter, zoom
from shapely import Polygon, box, segmentize
from shapely import transform as transform_coords
from shapely.geometry import mapping, shape

from geofm_assets import bands

# --- Geography ------------------------------------------------------------------------------
EPSG = 32720
TILES: tuple[str, ...] = ("20LMQ", "20LNQ")  # west to east, same latitude row
TILE_ORIGIN = (399960.0, 9000040.0)  # upper-left corner of 20LMQ
TILE_OVERLAP_PIXELS = 256
PIXEL_SIZE = 10.0
MAIN_ROAD_SPACING = 13000.0  # metres between parallel settlement roads
REGIONS_SOURCE = Path(__file__).resolve().parents[1] / "data" / "regions.geojson"
COLLECTION_ID = "sentinel-2-l2a"
COG_DIR = "sentinel-s2-l2a-cogs"

# --- Land cover (truth classes) and ground classes (what a scene is rendered from) ------------
LANDCOVER_CLASSES: dict[int, str] = {
    1: "forest", 2: "pasture", 3: "crops", 4: "water", 5: "bare_soil", 6: "urban",
}
FOREST, PASTURE, CROPS, WATER, BARE, URBAN = 1, 2, 3, 4, 5, 6
BURNED = 7  # freshly cleared forest, a ground class only
CROP_VARIANT_BASE, CROP_VARIANTS = 8, 5  # soy fields sown a week apart: ground classes 8..12
N_GROUND = CROP_VARIANT_BASE + CROP_VARIANTS

# --- Time -----------------------------------------------------------------------------------
PERIOD = (date(2020, 1, 1), date(2022, 12, 31))
REVISIT_ORIGIN = date(2020, 1, 3)  # a Sentinel-2A date; 2B flies 5 days later on the same orbit
REVISIT_DAYS = 5
S2B_LAST = date(2021, 12, 23)  # Sentinel-2B stopped acquiring after its power anomaly
OVERPASS_UTC = time(14, 25, 29)
BOA_OFFSET_FROM = date(2022, 1, 25)
CLEARING_PERIOD = (date(2021, 3, 1), date(2022, 9, 30))
LATITUDE = -9.1

# Generator streams (the first word after the seed): one stream per kind of randomness.
STREAM_GROUND, STREAM_EVENTS, STREAM_ATMOSPHERE, STREAM_NOISE, STREAM_PLAN = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SamplePreset:
    tile_pixels: int  # T: tile width and height at 10 m
    date_targets: tuple[date, ...] | None  # each snaps to the nearest revisit date; None: monthly
    cloud_fractions: tuple[float, ...] | None  # per target; None: drawn per date
    swath_edge_dates: tuple[int, ...] | None  # indices where 20LNQ is cut; None: drawn


SIZE_PRESETS: dict[str, SamplePreset] = {
    "tiny": SamplePreset(
        1280,
        (date(2020, 7, 15), date(2021, 6, 1), date(2022, 2, 10),
         date(2022, 5, 20), date(2022, 8, 1), date(2022, 10, 1)),
        (0.04, 0.06, 0.985, 0.03, 0.08, 0.10),
        (3, 5),
    ),
    "demo": SamplePreset(1280, None, None, None),
    "bench": SamplePreset(
        2560,
        (date(2020, 8, 1), date(2021, 8, 1), date(2022, 6, 1), date(2022, 9, 1)),
        (0.03, 0.12, 0.05, 0.15),
        (2,),
    ),
}


@dataclass(frozen=True)
class SampleCatalog:
    root: Path
    catalog_path: Path
    regions_path: Path
    deforestation_path: Path
    landcover_path: Path
    dates: list[date]
    item_ids: list[str]
    tiles: list[str]


@dataclass(frozen=True)
class Acquisition:
    date: date
    platform: str
    processing_baseline: str
    cloud_fraction: float  # target over both tiles
    swath_edge: bool  # 20LNQ lies at the edge of the swath: a diagonal no-data wedge


@dataclass(frozen=True)
class DeforestationEvent:
    event_id: str
    polygon: Polygon  # EPSG:32720
    date_cleared: date
    bare_days: int  # burned / bare soil this long, pasture afterwards
    region: str | None


@dataclass(frozen=True, eq=False)
class SampleWorld:
    """The ground over the union of both tiles at 10 m (arrays are [H W], H = T, W = 2T - 256)."""

    tile_pixels: int
    transform: Affine
    landcover: np.ndarray  # uint8 truth classes at the start
    ground: np.ndarray  # uint8 ground classes (crops split into sowing variants)
    brightness: np.ndarray  # float32 multiplicative texture, ~1
    vigor: np.ndarray  # float32 vegetation vigour anomaly, ~0
    event_index: np.ndarray  # uint8: 0 none, i + 1 inside events[i]
    events: tuple[DeforestationEvent, ...]


def preset_for(size: str) -> SamplePreset:
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown sample size {size!r}: choose one of {', '.join(SIZE_PRESETS)}")
    return SIZE_PRESETS[size]


def seeded_rng(seed: int, stream: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *words])


def tile_code(tile: str) -> int:
    return zlib.crc32(tile.encode())


# --- Revisit grid and acquisition plan --------------------------------------------------------
def platform_on(day: date) -> str:
    step = round((day - REVISIT_ORIGIN).days / REVISIT_DAYS)
    return "sentinel-2a" if step % 2 == 0 else "sentinel-2b"


def processing_baseline_on(day: date) -> str:
    if day >= BOA_OFFSET_FROM:
        return bands.BOA_OFFSET_BASELINE
    return "03.01" if day >= date(2021, 6, 30) else "02.14"


def boa_offset_dn(processing_baseline: str) -> int:
    """The DN added to reflectance x 10000 by this baseline: 1000 from 04.00 on, else 0."""
    major_minor = tuple(int(p) for p in processing_baseline.split("."))
    reference = tuple(int(p) for p in bands.BOA_OFFSET_BASELINE.split("."))
    return bands.BOA_ADD_OFFSET_DN if major_minor >= reference else 0


def revisit_dates() -> list[date]:
    """Every date a tile is acquired: 5-day grid while both satellites fly, 10 days after."""
    days, day = [], REVISIT_ORIGIN
    while day <= PERIOD[1]:
        if platform_on(day) == "sentinel-2a" or day <= S2B_LAST:
            days.append(day)
        day += timedelta(days=REVISIT_DAYS)
    return days


def drawn_cloud_fraction(seed: int, day: date) -> float:
    rng = seeded_rng(seed, STREAM_PLAN, day.toordinal())
    wet = 0.5 + 0.5 * math.cos(2 * math.pi * (day.timetuple().tm_yday - 45) / 365.25)
    draw = rng.random()
    if draw < 0.8 - 0.3 * wet:
        return float(rng.beta(0.7, 9.0))  # clear or nearly
    if draw < 0.93 - 0.13 * wet:
        return float(rng.uniform(0.2, 0.7))  # partly cloudy
    return float(rng.uniform(0.7, 0.99))


def nearest_revisit(grid: list[date], target: date, platform: str | None = None) -> date:
    """The revisit date nearest ``target``; with ``platform``, that satellite's if one is within
    a revisit step."""
    def rank(day: date) -> tuple[bool, bool, int, date]:
        distance = abs((day - target).days)
        return (platform is not None and distance > REVISIT_DAYS,
                platform is not None and platform_on(day) != platform, distance, day)
    return min(grid, key=rank)


def plan_acquisitions(preset: SamplePreset, seed: int) -> list[Acquisition]:
    grid = revisit_dates()
    if preset.date_targets:
        days = [nearest_revisit(grid, target) for target in preset.date_targets]
    else:  # monthly, near the 1st: 2A and 2B in turn while both fly
        firsts = [date(y, m, 1) for y in range(PERIOD[0].year, PERIOD[1].year + 1)
                  for m in range(1, 13)]
        days = [nearest_revisit(grid, first, ("sentinel-2a", "sentinel-2b")[i % 2])
                for i, first in enumerate(firsts)]
    if len(set(days)) != len(days):
        raise ValueError("two date targets snap to the same revisit date")
    fractions = preset.cloud_fractions or tuple(drawn_cloud_fraction(seed, d) for d in days)
    if preset.swath_edge_dates is None:
        rng = seeded_rng(seed, STREAM_PLAN)
        swath = set(rng.choice(np.arange(2, len(days)), size=3, replace=False).tolist())
    else:
        swath = set(preset.swath_edge_dates)
    return [
        Acquisition(d, platform_on(d), processing_baseline_on(d), f, i in swath)
        for i, (d, f) in enumerate(zip(days, fractions, strict=True))
    ]


def acquisition_on(day: date, size: str, seed: int) -> Acquisition:
    for acquisition in plan_acquisitions(preset_for(size), seed):
        if acquisition.date == day:
            return acquisition
    cloud = drawn_cloud_fraction(seed, day)
    return Acquisition(day, platform_on(day), processing_baseline_on(day), cloud, False)


# --- Geometry helpers ----------------------------------------------------------------------------
def tile_column_offset(tile: str, tile_pixels: int) -> int:
    return TILES.index(tile) * (tile_pixels - TILE_OVERLAP_PIXELS)


def tile_transform(tile: str, tile_pixels: int, resolution: float = PIXEL_SIZE) -> Affine:
    x0 = TILE_ORIGIN[0] + tile_column_offset(tile, tile_pixels) * PIXEL_SIZE
    return Affine(resolution, 0.0, x0, 0.0, -resolution, TILE_ORIGIN[1])


def to_lonlat(geometry: Polygon) -> Polygon:
    transformer = Transformer.from_crs(EPSG, 4326, always_xy=True)
    lonlat = transform_coords(geometry, lambda xy: np.column_stack(transformer.transform(*xy.T)))
    return transform_coords(lonlat, lambda xy: np.round(xy, 7))


def load_regions() -> dict[str, Polygon]:
    """The committed sample regions in EPSG:32720, by name."""
    transformer = Transformer.from_crs(4326, EPSG, always_xy=True)
    features = json.loads(REGIONS_SOURCE.read_text())["features"]
    return {
        f["properties"]["name"]: transform_coords(
            shape(f["geometry"]), lambda xy: np.column_stack(transformer.transform(*xy.T))
        )
        for f in features
    }


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, int], scales: Sequence[float], factor: int = 4
) -> np.ndarray:
    """Zero-mean, unit-std random field [H W] whose features are ~``scales`` pixels across:
    white noise Gaussian-filtered on a grid ``factor`` times coarser, bilinearly upsampled."""
    coarse_shape = (shape[0] // factor + 3, shape[1] // factor + 3)
    coarse = np.zeros(coarse_shape, np.float32)
    for octave, scale in enumerate(scales):
        noise = rng.standard_normal(coarse_shape, dtype=np.float32)
        layer = gaussian_filter(noise, sigma=max(scale / factor, 0.5), mode="wrap")
        coarse += layer / (layer.std() + 1e-9) * 0.5**octave
    field = zoom(coarse, factor, order=1)[: shape[0], : shape[1]]
    return ((field - field.mean()) / (field.std() + 1e-9)).astype(np.float32)


# --- The ground ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoadFrame:
    """Coordinates along (u) and across (v, north positive) the main road, metres."""

    x0: float
    y0: float
    angle: float

    def to_uv(self, x: float, y: float) -> tuple[float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return (x - self.x0) * c + (y - self.y0) * s, -(x - self.x0) * s + (y - self.y0) * c

    def to_xy(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.x0 + u * c - v * s, self.y0 + u * s + v * c


def pixel_centres(transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """x [1 W] and y [H 1] of pixel centres (float64 so subtraction keeps metres exact)."""
    x = transform.c + (np.arange(shape[1]) + 0.5) * transform.a
    y = transform.f + (np.arange(shape[0]) + 0.5) * transform.e
    return x[None, :], y[:, None]


def generate_landcover(
    rng: np.random.Generator, shape: tuple[int, int], transform: Affine,
    regions: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, RoadFrame]:
    """Land cover [H W] and crop sowing variants [H W] of a Rondônia settlement frontier: a main
    road with side roads every ~3 km ("fishbone"), lots cleared from the side roads, ranches
    along the main road, soy fields, a town at a junction and a meandering river."""
    frame = RoadFrame(407000 + rng.uniform(-1500, 1500), 8994400 + rng.uniform(-300, 300),
                      math.radians(rng.uniform(-12, 12)))
    x, y = pixel_centres(transform, shape)
    x, y = (x - frame.x0).astype(np.float32), (y - frame.y0).astype(np.float32)  # [1 W] [H 1]
    cos, sin = math.cos(frame.angle), math.sin(frame.angle)
    u, v = x * cos + y * sin, y * cos - x * sin  # [H W] metres along / across the main road
    # Parallel main roads 13 km apart (two on the bench preset): v is from the nearest one.
    road = np.rint(v * (1 / MAIN_ROAD_SPACING)).astype(np.int32)
    v -= road * MAIN_ROAD_SPACING
    anchor_road, road = -int(road.min()), road - road.min()
    n_roads = int(road.max()) + 1
    abs_v = np.abs(v)
    edge = 45 * smooth_field(rng, shape, (6, 2), factor=2)  # ragged clearing edges, metres
    landcover = np.full(shape, FOREST, np.uint8)
    variant = rng.integers(0, CROP_VARIANTS, size=4096).astype(np.uint8)

    # Lots along side roads: (side road k, lot j along it, north/south, east/west of it).
    spacing, lot_width = rng.uniform(2700, 3300), 500.0
    phases = rng.uniform(0, 3000, n_roads).astype(np.float32)
    phase = phases[road]
    k = np.rint((u - phase) / spacing).astype(np.int32)
    du = u - phase - k * spacing
    abs_du = np.abs(du)
    k -= k.min()
    n_k, n_j = int(k.max()) + 1, int(abs_v.max() // lot_width) + 1
    road_length = rng.uniform(2500, 7000, size=n_roads * n_k * 2).astype(np.float32)
    lot_depth = (rng.uniform(150, 1400, size=(road_length.size, n_j, 2))
                 * (rng.random((road_length.size, n_j, 2)) > 0.15)).astype(np.float32)
    lot_kind = rng.choice([PASTURE, CROPS, BARE], p=[0.78, 0.19, 0.03], size=lot_depth.shape)
    north = (v > 0).astype(np.int32)
    side_road = (road * n_k + k) * 2 + north
    lot = (side_road * n_j + (abs_v * (1 / lot_width)).astype(np.int32)) * 2 + (du > 0)
    length = road_length[side_road]
    on_side_road = abs_v < length
    reach = abs_v / length
    frontier = np.clip(1.15 - reach * np.sqrt(reach), 0, 1)  # older clearings near the road
    cleared = (abs_du < lot_depth.ravel()[lot] * frontier + edge) & on_side_road
    landcover[cleared] = lot_kind.ravel()[lot[cleared]]
    crop_variant = variant[lot % variant.size]

    # Ranches: blocks cleared from the main road, 2 km segments.
    along = ((u - u.min()) * (1 / 2000)).astype(np.int32)
    segment = (road * (int(along.max()) + 1) + along) * 2 + north  # (road, segment, side)
    n_seg = int(segment.max()) + 1
    ranch_depth = (rng.uniform(300, 1800, n_seg) * (rng.random(n_seg) > 0.45)).astype(np.float32)
    ranch_kind = rng.choice([PASTURE, CROPS], p=[0.85, 0.15], size=n_seg)
    ranch = abs_v < ranch_depth[segment] + edge
    landcover[ranch] = ranch_kind[segment[ranch]]
    crop_variant = np.where(ranch, variant[(segment + 7) % variant.size], crop_variant)

    # Within pastures: tree clumps and degraded bare patches.
    speckle = smooth_field(rng, shape, (2.5,), factor=2)
    landcover[(landcover == PASTURE) & (speckle > 2.1)] = FOREST
    landcover[(landcover == PASTURE) & (speckle < -2.3)] = BARE

    # A river meandering north with a forest buffer; then roads, the town, the water.
    southward = np.arange(shape[0]) * PIXEL_SIZE  # metres from the top edge
    wavelengths = rng.uniform([1800, 5000], [3200, 9000])
    amplitudes = rng.uniform([250, 400], [450, 900])
    wander = gaussian_filter(rng.standard_normal(shape[0] + 400), 60, mode="wrap")[200:-200]
    centre = (transform.c - frame.x0 + rng.uniform(0.25, 0.75) * shape[1] * PIXEL_SIZE
              + 250 * wander / wander.std() + sum(
                  a * np.sin(2 * math.pi * southward / w + p) for a, w, p in
                  zip(amplitudes, wavelengths, rng.uniform(0, 2 * math.pi, 2), strict=True)))
    across = 1 / np.sqrt(1 + np.gradient(centre, PIXEL_SIZE) ** 2)  # metres east -> across
    river_distance = np.abs(x - centre[:, None].astype(np.float32)) * across[:, None].astype(
        np.float32)  # [H W] metres
    half_width = rng.uniform(25, 45)
    landcover[river_distance < half_width + 90] = FOREST
    landcover[(abs_du < 6) & on_side_road] = BARE  # dirt side roads
    town_u = phases[anchor_road] + int(rng.integers(-3, 4)) * spacing  # a junction near the anchor
    town = np.hypot(x - town_u * cos, y - town_u * sin) < rng.uniform(400, 600) + 3 * edge
    landcover[town] = URBAN
    landcover[river_distance < half_width] = WATER
    landcover[abs_v < 12] = URBAN  # paved main road, bridge included

    for mask in regions.values():  # every region shows forest, pasture and crops
        for cls, source, fraction in ((PASTURE, FOREST, 0.08), (CROPS, PASTURE, 0.015)):
            for _ in range(20):
                if np.mean(landcover[mask] == cls) >= fraction:
                    break
                rows, cols = np.nonzero(mask & (landcover == source))
                if rows.size == 0:
                    break
                pick = rng.integers(rows.size)
                block = ((np.abs(u - u[rows[pick], cols[pick]]) < rng.uniform(150, 350))
                         & (np.abs(v - v[rows[pick], cols[pick]]) < rng.uniform(150, 300)))
                landcover[block & mask & (landcover == source)] = cls
    return landcover, crop_variant, frame


def clearing_polygon(rng: np.random.Generator, frame: RoadFrame, u0: float, v0: float,
                     length: float, width: float, area: float) -> Polygon:
    """A field-like clearing aligned with the lots, of exactly ``area`` m²: the corners and edge
    midpoints of a ``length`` x ``width`` rectangle, each pushed a little (star-shaped around
    its centre, hence simple)."""
    outline = np.array([[-1, -1], [0, -1], [1, -1], [1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0]],
                       float) + rng.uniform(-0.18, 0.18, (8, 2))
    outline *= [length / 2, width / 2]
    outline *= math.sqrt(area / Polygon(outline).area)
    x, y = frame.to_xy(u0 + outline[:, 0], v0 + outline[:, 1])
    return Polygon(np.column_stack([x, y]))


def place_events(
    rng: np.random.Generator, landcover: np.ndarray, transform: Affine, frame: RoadFrame,
    regions: dict[str, Polygon], region_masks: dict[str, np.ndarray],
) -> list[DeforestationEvent]:
    """8-12 forest polygons (5-60 ha) cleared between 2021-03 and 2022-09, most in a region,
    each wholly in forest at the start, near an existing clearing, apart from each other."""
    n_events = int(rng.integers(8, 13))
    names = list(regions)
    targets: list[str | None] = [names[i % len(names)]
                                 for i in range(n_events - int(rng.integers(1, 3)))]
    targets += [None] * (n_events - len(targets))
    forest = landcover == FOREST
    forest_depth = distance_transform_edt(forest) * PIXEL_SIZE  # metres to the nearest clearing
    placed: list[tuple[Polygon, str | None]] = []
    for target in targets:
        candidates = np.nonzero(region_masks[target] if target else forest)
        for attempt in range(600):
            area = math.exp(rng.uniform(math.log(5e4), math.log(6e5)))  # m^2
            aspect = rng.uniform(1.0, 2.5)
            length, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if rng.random() < 0.5:
                length, width = width, length
            pick = rng.integers(candidates[0].size)
            row, col = candidates[0][pick], candidates[1][pick]
            reach = 0.6 * math.hypot(length, width)
            if forest_depth[row, col] < reach or (
                attempt < 400 and forest_depth[row, col] > reach + 300
            ):
                continue
            x, y = transform @ (col + 0.5, row + 0.5)
            u0, v0 = frame.to_uv(x, y)
            polygon = clearing_polygon(rng, frame, u0, v0, length, width, area)
            if not polygon.is_valid or (target and not regions[target].contains(polygon)):
                continue
            if any(polygon.distance(other) < 60 for other, _ in placed):
                continue
            west, south, east, north = polygon.bounds
            c0, r0 = (math.floor(a) - 1 for a in ~transform @ (west, north))
            c1, r1 = (math.ceil(a) + 1 for a in ~transform @ (east, south))
            h, w = r1 - r0, c1 - c0
            if r0 < 0 or c0 < 0 or r0 + h > forest.shape[0] or c0 + w > forest.shape[1]:
                continue
            inside = rasterio.features.rasterize(
                [polygon], out_shape=(h, w), transform=transform @ Affine.translation(c0, r0),
                all_touched=True, dtype=np.uint8,
            ).astype(bool)
            if forest[r0 : r0 + h, c0 : c0 + w][inside].all():
                region = next((n for n, r in regions.items() if r.contains(polygon)), None)
                placed.append((polygon, region))
                break
        else:
            raise RuntimeError(f"could not place a deforestation event in {target or 'forest'}")
    span = (CLEARING_PERIOD[1] - CLEARING_PERIOD[0]).days
    days = sorted(int(d) for d in rng.integers(0, span + 1, size=len(placed)))
    return [
        DeforestationEvent(f"DF{i + 1:02d}", polygon, CLEARING_PERIOD[0] + timedelta(days=d),
                           int(rng.integers(60, 121)), region)
        for i, ((polygon, region), d) in enumerate(zip(placed, days, strict=True))
    ]


_WORLDS: dict[tuple[int, int], SampleWorld] = {}  # per process: (seed, tile_pixels) -> ground


def world_for(seed: int, tile_pixels: int) -> SampleWorld:
    """The ground of ``seed`` at this tile size, built once per process."""
    if (seed, tile_pixels) not in _WORLDS:
        _WORLDS.clear()
        _WORLDS[seed, tile_pixels] = build_world(seed, tile_pixels)
    return _WORLDS[seed, tile_pixels]


def build_world(seed: int, tile_pixels: int) -> SampleWorld:
    shape = (tile_pixels, 2 * tile_pixels - TILE_OVERLAP_PIXELS)
    transform = tile_transform(TILES[0], tile_pixels)
    regions = load_regions()
    masks = {
        name: rasterio.features.geometry_mask([r], shape, transform, invert=True)
        for name, r in regions.items()
    }
    rng = seeded_rng(seed, STREAM_GROUND)
    landcover, crop_variant, frame = generate_landcover(rng, shape, transform, masks)
    ground = np.where(landcover == CROPS, CROP_VARIANT_BASE + crop_variant, landcover)
    brightness = 1 + 0.025 * smooth_field(rng, shape, (2.0,), 2) + 0.02 * smooth_field(
        rng, shape, (15.0, 6.0), 3)
    vigor = 0.04 * smooth_field(rng, shape, (8.0, 3.0), 2)
    events = place_events(seeded_rng(seed, STREAM_EVENTS), landcover, transform, frame,
                          regions, masks)
    event_index = rasterio.features.rasterize(
        [(e.polygon, i + 1) for i, e in enumerate(events)], out_shape=shape,
        transform=transform, dtype=np.uint8,
    )
    return SampleWorld(tile_pixels, transform, landcover, ground.astype(np.uint8),
                       brightness.astype(np.float32), vigor, event_index, tuple(events))


# --- Spectra and the seasons -----------------------------------------------------------------
# Reflectance x 10000 in bands.SPECTRAL_BANDS order: blue green red re1 re2 re3 nir nir08 sw16 sw22
SPECTRA: dict[str, tuple[float, ...]] = {
    "forest": (210, 420, 260, 720, 1900, 2600, 2850, 2950, 1450, 620),
    "pasture": (330, 640, 480, 1050, 2200, 2700, 2900, 3000, 2300, 1250),
    "pasture_dry": (560, 860, 980, 1350, 1850, 2050, 2250, 2350, 3050, 2200),
    "crop_green": (240, 580, 300, 900, 2800, 3900, 4300, 4450, 2050, 900),
    "crop_fallow": (720, 1000, 1300, 1550, 1800, 1950, 2100, 2200, 2950, 2450),
    "water": (480, 700, 640, 560, 360, 300, 260, 240, 110, 70),
    "bare_soil": (820, 1180, 1750, 2050, 2250, 2400, 2550, 2650, 3350, 2850),
    "urban": (1150, 1280, 1380, 1480, 1560, 1620, 1700, 1750, 1950, 1800),
    "burned": (330, 420, 520, 620, 760, 860, 950, 1000, 1650, 1450),
}
CLOUD_SPECTRUM = np.array([5600, 5500, 5450, 5450, 5400, 5400, 5350, 5350, 4100, 2900],
                          np.float32)
WAVELENGTHS = np.array([b.wavelength for b in bands.SPECTRAL_BANDS], np.float32)
HAZE_WEIGHT = (WAVELENGTHS / WAVELENGTHS[0]) ** -1.5  # aerosol scattering falls with wavelength
VEGETATION_CLASSES = (FOREST, PASTURE, *range(CROP_VARIANT_BASE, N_GROUND))
VIGOR_RESPONSE = np.array([0, 0, -0.5, 0, 1, 1, 1, 1, 0, 0], np.float32)  # d(band)/d(vigour)


def dry_season(day: date) -> float:
    """0 in the wet season, 1 at the height of the Jun-Sep dry season (mid-August)."""
    offset = (day.timetuple().tm_yday - 225 + 182) % 365 - 182
    return math.exp(-0.5 * (offset / 45) ** 2)


def soy_greenness(day: date, delay_days: int) -> float:
    """Soy canopy cover: sown mid-October, peak January, harvested Feb-Mar, fallow after."""
    t = (day - date(day.year if day.month >= 10 else day.year - 1, 10, 1)).days - delay_days
    return float(np.interp(t, [30, 95, 125, 165], [0, 1, 1, 0]))


def ground_spectra(day: date) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance [N_GROUND 10] of every ground class on ``day`` and their SCL class [N_GROUND]."""
    s = {k: np.array(v, np.float32) for k, v in SPECTRA.items()}
    dry = dry_season(day)
    table = np.zeros((N_GROUND, len(WAVELENGTHS)), np.float32)
    scl = np.full(N_GROUND, bands.SCL_NOT_VEGETATED, np.uint8)
    forest_flush = np.array([0, 0, -0.03, 0, 0.02, 0.03, 0.04, 0.04, 0.05, 0.05], np.float32)
    table[FOREST] = s["forest"] * (1 + dry * forest_flush)
    table[PASTURE] = s["pasture"] + dry * (s["pasture_dry"] - s["pasture"])
    table[WATER] = s["water"] * (1 + 0.25 * (1 - dry) * (WAVELENGTHS < 0.7))  # wet-season silt
    table[BARE] = s["bare_soil"] * (1 + 0.03 * dry)
    table[URBAN] = s["urban"]
    table[BURNED] = s["burned"]
    for variant in range(CROP_VARIANTS):
        green = soy_greenness(day, 7 * variant)
        table[CROP_VARIANT_BASE + variant] = s["crop_fallow"] + green * (
            s["crop_green"] - s["crop_fallow"])
        scl[CROP_VARIANT_BASE + variant] = (
            bands.SCL_VEGETATION if green > 0.4 else bands.SCL_NOT_VEGETATED)
    table[CROPS] = table[CROP_VARIANT_BASE]
    scl[[FOREST, PASTURE]] = bands.SCL_VEGETATION
    scl[CROPS] = scl[CROP_VARIANT_BASE]
    scl[WATER] = bands.SCL_WATER
    return table, scl


def sun_position(day: date) -> tuple[float, float]:
    """Solar zenith and azimuth (radians) at the ~10:30 local overpass at LATITUDE."""
    declination = math.radians(-23.44) * math.cos(2 * math.pi * (day.timetuple().tm_yday + 10)
                                                  / 365)
    lat, hour_angle = math.radians(LATITUDE), math.radians(-22.5)
    cos_zenith = (math.sin(lat) * math.sin(declination)
                  + math.cos(lat) * math.cos(declination) * math.cos(hour_angle))
    zenith = math.acos(cos_zenith)
    cos_azimuth = (math.sin(declination) - math.sin(lat) * cos_zenith) / (
        math.cos(lat) * math.sin(zenith))
    return zenith, math.acos(max(-1.0, min(1.0, cos_azimuth)))  # morning: azimuth east of north


# --- One date's atmosphere over both tiles, at 20 m ------------------------------------------
@dataclass(frozen=True, eq=False)
class Atmosphere:
    """One datatake's atmosphere on the union grid at 20 m ([H/2 W/2]); 10 m pixels share it."""

    surface_factor: np.ndarray  # illumination x cloud-shadow darkening, multiplies the ground
    haze: np.ndarray  # additive DN in blue; other bands scale by HAZE_WEIGHT
    clear: np.ndarray  # 1 - cloud opacity
    cloud: np.ndarray  # cloud opacity x brightness; multiplies CLOUD_SPECTRUM
    cloud_class: np.ndarray  # uint8: 0, or SCL 8 / 9 / 10
    shadow: np.ndarray  # bool: cloud shadow (SCL 3)


def shifted(mask: np.ndarray, drow: int, dcol: int) -> np.ndarray:
    """``mask`` moved by (drow, dcol) pixels, without wrapping around."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(drow, 0) : h + min(drow, 0), max(dcol, 0) : w + min(dcol, 0)] = mask[
        max(-drow, 0) : h - max(drow, 0), max(-dcol, 0) : w - max(dcol, 0)]
    return out


def atmosphere_on(world: SampleWorld, acquisition: Acquisition, seed: int) -> Atmosphere:
    rng = seeded_rng(seed, STREAM_ATMOSPHERE, acquisition.date.toordinal())
    shape = (world.landcover.shape[0] // 2, world.landcover.shape[1] // 2)
    zenith, azimuth = sun_position(acquisition.date)
    illumination = math.sqrt(math.cos(zenith) / 0.85) * (1 + 0.025 * rng.standard_normal())
    dry = dry_season(acquisition.date)
    haze_blue = rng.gamma(2.0, 35.0) + dry * rng.gamma(2.0, 60.0)  # smoke in the dry season
    haze = haze_blue * np.clip(1 + 0.5 * smooth_field(rng, shape, (30.0,), 8), 0.1, None)
    field = smooth_field(rng, shape, (60.0, 25.0, 10.0, 4.0), 2)
    cloud_class = np.zeros(shape, np.uint8)
    opacity = np.zeros(shape, np.float32)
    cloud = np.zeros(shape, np.float32)  # opacity x cloud brightness
    shadow = np.zeros(shape, bool)
    darkening = 1.0
    if (fraction := acquisition.cloud_fraction) > 0:
        # Cloud where the field is in its top `fraction`: thin cirrus at the edges (the outer
        # fifth), then medium, then high probability (the inner half).
        edge, top, core = np.quantile(field, [1 - fraction, 1 - 0.8 * fraction,
                                              1 - 0.5 * fraction])
        cloud_class = np.select(
            [field > core, field > top, field > edge],
            [bands.SCL_CLOUD_HIGH, bands.SCL_CLOUD_MEDIUM, bands.SCL_THIN_CIRRUS], 0,
        ).astype(np.uint8)
        opacity = np.select(
            [field > core, field > top, field > edge],
            [1.0, 0.6 + 0.35 * (field - top) / (core - top + 1e-6),
             0.12 + 0.33 * (field - edge) / (top - edge + 1e-6)], 0.0,
        ).astype(np.float32)
        brightness = 0.65 + 0.75 * np.clip((field - edge) / (field.max() - edge + 1e-6), 0, 1)
        cloud = (opacity * brightness).astype(np.float32)
        # Shadows: the opaque cloud (0.5-1 km up) cast away from the sun, not where cloud is.
        reach = rng.uniform(500, 1000) * math.tan(zenith) / (2 * PIXEL_SIZE)
        drow, dcol = round(reach * math.cos(azimuth)), round(-reach * math.sin(azimuth))
        shadow = shifted(field > top, drow, dcol) & (cloud_class == 0)
        darkening = rng.uniform(0.3, 0.5)
    surface_factor = illumination * np.where(shadow, darkening, 1.0).astype(np.float32)
    return Atmosphere(surface_factor, haze.astype(np.float32), 1 - opacity, cloud, cloud_class,
                      shadow)


# --- Rendering and writing one scene -------------------------------------------------------
def swath_valid(tile: str, acquisition: Acquisition, seed: int, tile_pixels: int,
                resolution: float) -> np.ndarray | None:
    """[h w] bool valid-data mask where 20LNQ lies at the swath edge, else None."""
    if tile != TILES[1] or not acquisition.swath_edge:
        return None
    n = round(tile_pixels * PIXEL_SIZE / resolution)
    x, y = pixel_centres(tile_transform(tile, tile_pixels, resolution), (n, n))
    return (x - tile_transform(tile, tile_pixels).c) < swath_edge_line(acquisition, seed,
                                                                        tile_pixels, y)


def swath_edge_line(acquisition: Acquisition, seed: int, tile_pixels: int, y: np.ndarray
                    ) -> np.ndarray:
    """Metres from the west edge of 20LNQ to the swath edge at northing ``y`` (tilted ~12°)."""
    rng = seeded_rng(seed, STREAM_PLAN, acquisition.date.toordinal(), 1)
    width = tile_pixels * PIXEL_SIZE
    return rng.uniform(0.35, 0.75) * width + 0.21 * (TILE_ORIGIN[1] - y) - 0.1 * width


def block_mean(array: np.ndarray) -> np.ndarray:
    """[H W] -> [H/2 W/2]: the 20 m pixel as the mean of its four 10 m pixels."""
    return (array[::2, ::2] + array[1::2, ::2] + array[::2, 1::2] + array[1::2, 1::2]) * 0.25


def render_scene(world: SampleWorld, atmosphere: Atmosphere, acquisition: Acquisition,
                 tile: str, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """DN arrays per asset key: spectral bands uint16 at native resolution, SCL uint8 at 20 m."""
    t, c0 = world.tile_pixels, tile_column_offset(tile, world.tile_pixels)
    day = acquisition.date
    change = np.zeros(len(world.events) + 1, np.uint8)
    for i, event in enumerate(world.events):
        if event.date_cleared <= day:
            recent = day < event.date_cleared + timedelta(days=event.bare_days)
            change[i + 1] = BURNED if recent else PASTURE
    changed = change[world.event_index[:, c0 : c0 + t]]
    ground = np.where(changed > 0, changed, world.ground[:, c0 : c0 + t])  # [T T]
    spectra, scl_of_ground = ground_spectra(day)
    vegetation = np.zeros(N_GROUND, bool)
    vegetation[list(VEGETATION_CLASSES)] = True
    vigor = np.where(vegetation[ground], world.vigor[:, c0 : c0 + t], 0)
    brightness = world.brightness[:, c0 : c0 + t]
    at20 = {name: getattr(atmosphere, name)[:, c0 // 2 : (c0 + t) // 2]
            for name in ("surface_factor", "haze", "clear", "cloud")}  # [T/2 T/2]
    at10 = {name: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1) for name, a in at20.items()}
    rng = seeded_rng(seed, STREAM_NOISE, tile_code(tile), day.toordinal())
    offset = boa_offset_dn(acquisition.processing_baseline)
    valid = {r: swath_valid(tile, acquisition, seed, t, r) for r in (10, 20)}  # None: all valid
    arrays: dict[str, np.ndarray] = {}
    for b, band in enumerate(bands.SPECTRAL_BANDS):
        reflectance = spectra[:, b][ground]  # the ground, [T T]
        reflectance *= brightness
        if VIGOR_RESPONSE[b]:
            reflectance *= 1 + VIGOR_RESPONSE[b] * vigor
        at = at10
        if band.resolution == 20:  # mixed pixels at class edges
            reflectance, at = block_mean(reflectance), at20
        reflectance *= at["surface_factor"]
        reflectance += HAZE_WEIGHT[b] * at["haze"]
        reflectance *= at["clear"]
        reflectance += CLOUD_SPECTRUM[b] * at["cloud"]
        noise = rng.standard_normal(reflectance.shape, dtype=np.float32)
        noise *= 0.01 * np.abs(reflectance) + 5
        reflectance += noise
        # Clip first, then offset: both baselines hold the same reflectance, DN 1000 apart.
        dn = np.clip(np.rint(reflectance), 1, 65535 - offset) + offset
        arrays[band.name] = dn.astype(np.uint16)
    scl = scl_of_ground[ground[::2, ::2]]
    scl[atmosphere.shadow[:, c0 // 2 : (c0 + t) // 2]] = bands.SCL_CLOUD_SHADOW
    cloud_class = atmosphere.cloud_class[:, c0 // 2 : (c0 + t) // 2]
    scl = np.where(cloud_class > 0, cloud_class, scl).astype(np.uint8)
    for name, array in arrays.items():
        if (mask := valid[bands.BANDS_BY_NAME[name].resolution]) is not None:
            array[~mask] = bands.NODATA
    if (mask := valid[bands.SCL_RESOLUTION]) is not None:
        scl[~mask] = bands.SCL_NO_DATA
    return arrays, scl


def write_cog(path: Path, array: np.ndarray, transform: Affine, resampling: str,
              description: str | None = None, tags: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="COG", width=array.shape[1], height=array.shape[0], count=1, dtype=array.dtype,
        crs=f"EPSG:{EPSG}", transform=transform, nodata=bands.NODATA, compress="DEFLATE",
        predictor=2, level=1, blocksize=512, overview_resampling=resampling,  # level 1: fast, as small
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)
        if description:
            dst.set_band_description(1, description)
        if tags:
            dst.update_tags(**tags)


def item_id(tile: str, acquisition: Acquisition) -> str:
    satellite = "S2A" if acquisition.platform == "sentinel-2a" else "S2B"
    return f"{satellite}_{tile}_{acquisition.date:%Y%m%d}_0_L2A"


def scene_dir(root: Path, tile: str, acquisition: Acquisition) -> Path:
    d = acquisition.date
    return (root / COG_DIR / tile[:2] / tile[2] / tile[3:] / str(d.year) / str(d.month)
            / item_id(tile, acquisition))


def build_item(tile: str, acquisition: Acquisition, seed: int, tile_pixels: int,
               scl: np.ndarray, hrefs: dict[str, Path]) -> pystac.Item:
    footprint = box(*rasterio.transform.array_bounds(
        tile_pixels, tile_pixels, tile_transform(tile, tile_pixels)))
    if tile == TILES[1] and acquisition.swath_edge:
        top, bottom = footprint.bounds[3], footprint.bounds[1]
        x_top, x_bottom = (footprint.bounds[0] + swath_edge_line(acquisition, seed, tile_pixels,
                                                                 np.array(yy))
                           for yy in (top, bottom))
        footprint = footprint.intersection(Polygon(
            [(footprint.bounds[0], top), (float(x_top), top), (float(x_bottom), bottom),
             (footprint.bounds[0], bottom)]))
    geometry = to_lonlat(segmentize(footprint, 2000))
    valid = scl != bands.SCL_NO_DATA
    cloud_cover = 100 * np.isin(scl[valid], bands.SCL_CLOUD_CLASSES).sum() / max(valid.sum(), 1)
    when = datetime.combine(acquisition.date, OVERPASS_UTC, tzinfo=UTC)
    created = pystac.utils.datetime_to_str(when + timedelta(hours=5, minutes=17))
    baseline = acquisition.processing_baseline
    properties = {
        "platform": acquisition.platform, "constellation": "sentinel-2", "instruments": ["msi"],
        "eo:cloud_cover": round(float(cloud_cover), 4),
        "s2:nodata_pixel_percentage": round(float(100 * (1 - valid.mean())), 4),
        "proj:epsg": EPSG, "proj:code": f"EPSG:{EPSG}",
        "mgrs:utm_zone": int(tile[:2]), "mgrs:latitude_band": tile[2], "mgrs:grid_square": tile[3:],
        "grid:code": f"MGRS-{tile}", "s2:mgrs_tile": tile, "s2:processing_baseline": baseline,
        "s2:product_type": "S2MSI2A", "earthsearch:boa_offset_applied": False,
        "created": created, "updated": created,
    }
    item = pystac.Item(item_id(tile, acquisition), mapping(geometry), list(geometry.bounds),
                       when, properties, stac_extensions=STAC_EXTENSIONS)
    dn_offset = boa_offset_dn(baseline)
    offset = round(-dn_offset * bands.REFLECTANCE_SCALE, 6) if dn_offset else 0.0  # not -0.0
    for band in bands.SPECTRAL_BANDS:
        item.add_asset(band.name, asset_for(
            hrefs[band.name], tile, tile_pixels, band.resolution, f"{band.name} ({band.band_id})",
            eo_bands=[{"name": band.band_id, "common_name": band.name,
                       "center_wavelength": band.wavelength, "full_width_half_max": band.fwhm}],
            raster_band={"nodata": bands.NODATA, "data_type": "uint16", "bits_per_sample": 15,
                         "spatial_resolution": band.resolution,
                         "scale": bands.REFLECTANCE_SCALE, "offset": offset},
        ))
    item.add_asset(bands.SCL_ASSET, asset_for(
        hrefs[bands.SCL_ASSET], tile, tile_pixels, bands.SCL_RESOLUTION,
        "Scene classification map (SCL)", eo_bands=None,
        raster_band={"nodata": bands.SCL_NO_DATA, "data_type": "uint8",
                     "spatial_resolution": bands.SCL_RESOLUTION},
    ))
    return item


STAC_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
]


def asset_for(href: Path, tile: str, tile_pixels: int, resolution: int, title: str,
              eo_bands: list[dict[str, object]] | None, raster_band: dict[str, object]
              ) -> pystac.Asset:
    n = tile_pixels * int(PIXEL_SIZE) // resolution
    extra: dict[str, object] = {
        "gsd": resolution, "proj:shape": [n, n],
        "proj:transform": list(tile_transform(tile, tile_pixels, resolution))[:6],
        "raster:bands": [raster_band],
    }
    if eo_bands:
        extra["eo:bands"] = eo_bands
    roles = ["data", "reflectance"] if eo_bands else ["data"]
    return pystac.Asset(str(href), title=title, media_type=pystac.MediaType.COG, roles=roles,
                        extra_fields=extra)


def write_acquisition(root: Path, tile: str, acquisition: Acquisition, seed: int,
                      world: SampleWorld, atmosphere: Atmosphere) -> pystac.Item:
    arrays, scl = render_scene(world, atmosphere, acquisition, tile, seed)
    folder = scene_dir(root, tile, acquisition)
    hrefs: dict[str, Path] = {}
    for band in bands.SPECTRAL_BANDS:
        hrefs[band.name] = folder / f"{band.band_id}.tif"
        write_cog(hrefs[band.name], arrays[band.name],
                  tile_transform(tile, world.tile_pixels, band.resolution), "average")
    hrefs[bands.SCL_ASSET] = folder / f"{bands.SCL_FILE_STEM}.tif"
    write_cog(hrefs[bands.SCL_ASSET], scl,
              tile_transform(tile, world.tile_pixels, bands.SCL_RESOLUTION), "nearest")
    return build_item(tile, acquisition, seed, world.tile_pixels, scl, hrefs)


def write_scene(root: Path, tile: str, date: date, *, seed: int = 0, size: str = "tiny",
                processing_baseline: str | None = None) -> pystac.Item:
    """Write one scene's COGs under ``root`` (Earth Search bucket layout) and return its item,
    with absolute asset hrefs, in no catalog. ``processing_baseline`` overrides the date's."""
    if tile not in TILES:
        raise ValueError(f"unknown tile {tile!r}: choose one of {', '.join(TILES)}")
    preset = preset_for(size)
    acquisition = acquisition_on(date, size, seed)
    if processing_baseline is not None:
        acquisition = Acquisition(acquisition.date, acquisition.platform, processing_baseline,
                                  acquisition.cloud_fraction, acquisition.swath_edge)
    world = world_for(seed, preset.tile_pixels)
    return write_acquisition(Path(root), tile, acquisition, seed, world,
                             atmosphere_on(world, acquisition, seed))


def write_date(root: Path, acquisition: Acquisition, seed: int, tile_pixels: int,
               world_file: Path | None = None) -> list[pystac.Item]:
    """Both tiles of one datatake (they share the atmosphere). A pool worker reads the ground
    the parent pickled to ``world_file`` rather than building it again."""
    if world_file is not None and (seed, tile_pixels) not in _WORLDS:
        _WORLDS.clear()
        _WORLDS[seed, tile_pixels] = pickle.loads(world_file.read_bytes())
    world = world_for(seed, tile_pixels)
    atmosphere = atmosphere_on(world, acquisition, seed)
    return [write_acquisition(root, tile, acquisition, seed, world, atmosphere) for tile in TILES]


# --- Truth, catalog, the whole sample --------------------------------------------------------
def write_truth(root: Path, world: SampleWorld) -> tuple[Path, Path]:
    truth = root / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    features = [
        {"type": "Feature", "id": e.event_id, "geometry": mapping(to_lonlat(e.polygon)),
         "properties": {"event_id": e.event_id, "date_cleared": e.date_cleared.isoformat(),
                        "area_ha": round(e.polygon.area / 1e4, 2), "region": e.region}}
        for e in world.events
    ]
    deforestation = truth / "deforestation.geojson"
    deforestation.write_text(json.dumps(
        {"type": "FeatureCollection", "name": "deforestation", "features": features}, indent=1))
    classes = {str(k): v for k, v in LANDCOVER_CLASSES.items()}
    (truth / "landcover_classes.json").write_text(json.dumps(classes, indent=1))
    landcover = truth / "landcover.tif"
    write_cog(landcover, world.landcover, world.transform, "nearest",
              description="land cover: " + ", ".join(f"{k} {v}" for k, v in classes.items()),
              tags={f"CLASS_{k}": v for k, v in classes.items()})
    return deforestation, landcover


def build_catalog(root: Path, items: list[pystac.Item]) -> Path:
    boxes = np.array([i.bbox for i in items], float)  # [items 4]
    bbox = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
    times = sorted(i.datetime for i in items if i.datetime)
    clouds = [i.properties["eo:cloud_cover"] for i in items]
    eo_bands = [asset["eo:bands"][0] for asset in
                (items[0].assets[b.name].extra_fields for b in bands.SPECTRAL_BANDS)]
    collection = pystac.Collection(
        COLLECTION_ID,
        "Synthetic Sentinel-2 L2A scenes (seeded sample, laid out like Earth Search v1)",
        pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[times[0],
                                                                             times[-1]]])),
        title="Sentinel-2 Level-2A (sample)", license="proprietary",
        stac_extensions=STAC_EXTENSIONS,
        summaries=pystac.Summaries({
            "platform": sorted({i.properties["platform"] for i in items}),
            "constellation": ["sentinel-2"], "instruments": ["msi"], "gsd": [10, 20],
            "proj:code": [f"EPSG:{EPSG}"], "eo:bands": eo_bands,
            "s2:processing_baseline": sorted({i.properties["s2:processing_baseline"]
                                              for i in items}),
            "mgrs:grid_square": sorted({i.properties["mgrs:grid_square"] for i in items}),
            "eo:cloud_cover": {"minimum": min(clouds), "maximum": max(clouds)},
        }),
    )
    collection.add_items(items)
    catalog = pystac.Catalog("geofm-sample", "GeoFM sample data: synthetic Sentinel-2 L2A")
    catalog.add_child(collection)
    catalog.normalize_hrefs(str(root / "catalog.json"))  # a file href: any folder name works
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def generate_sample(out_dir: Path, size: str = "demo", seed: int = 0, *, processes: int = 2
                    ) -> SampleCatalog:
    """Write the whole sample (catalog, COGs, regions, truth) to ``out_dir``, atomically: it is
    built in a temporary folder beside ``out_dir`` and renamed into place once complete.
    Dates are written by a pool of ``processes`` workers (output does not depend on it)."""
    preset = preset_for(size)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build.chmod(0o755)
        acquisitions = plan_acquisitions(preset, seed)
        shutil.copyfile(REGIONS_SOURCE, build / "regions.geojson")
        t = preset.tile_pixels
        if processes > 1:
            context = multiprocessing.get_context("spawn")  # never fork a threaded parent
            with ProcessPoolExecutor(processes, mp_context=context) as pool:
                for _ in range(processes):  # workers start (import) while the ground is built
                    pool.submit(int)
                world = world_for(seed, t)
                world_file = build / ".world.pickle"
                world_file.write_bytes(pickle.dumps(world, protocol=pickle.HIGHEST_PROTOCOL))
                per_date = [pool.submit(write_date, build, a, seed, t, world_file)
                            for a in acquisitions]
                write_truth(build, world)
                items = [item for future in per_date for item in future.result()]
            world_file.unlink()
        else:
            world = world_for(seed, t)
            write_truth(build, world)
            items = [item for a in acquisitions for item in write_date(build, a, seed, t)]
        build_catalog(build, items)
        replace_dir(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return SampleCatalog(
        root=out_dir, catalog_path=out_dir / "catalog.json",
        regions_path=out_dir / "regions.geojson",
        deforestation_path=out_dir / "truth" / "deforestation.geojson",
        landcover_path=out_dir / "truth" / "landcover.tif",
        dates=sorted({a.date for a in acquisitions}), item_ids=sorted(i.id for i in items),
        tiles=list(TILES),
    )


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing ``target`` only now that ``new`` is done."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    target.rename(old / target.name)
    new.rename(target)
    shutil.rmtree(old)
