"""Named regions of interest and the chip grid anchored to each region's origin."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

DEFAULT_REGIONS_FILE = Path(__file__).resolve().parent.parent / "data" / "regions.geojson"
REGION_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CHIP_ID_PATTERN = re.compile(r"^(?P<region>[a-z0-9][a-z0-9-]*)_r(?P<row>\d{4})_c(?P<col>\d{4})$")


class RegionError(ValueError):
    """A regions file or region name that cannot be used."""


@dataclass(frozen=True)
class Region:
    name: str
    geometry: BaseGeometry  # EPSG:4326, lon/lat
    description: str = ""

    @property
    def epsg(self) -> int:
        """EPSG code of the UTM zone (WGS 84) that holds the region's centroid."""
        return utm_epsg(self.geometry.centroid.x, self.geometry.centroid.y)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        minx, miny, maxx, maxy = self.geometry.bounds
        return (minx, miny, maxx, maxy)


def utm_epsg(lon: float, lat: float) -> int:
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def reproject(geom: BaseGeometry, transformer: Transformer) -> BaseGeometry:
    return shapely.transform(geom, lambda x, y: transformer.transform(x, y), interleaved=False)


def load_regions(path: Path | str = DEFAULT_REGIONS_FILE) -> dict[str, Region]:
    """Read a GeoJSON FeatureCollection of named polygons (EPSG:4326).

    Each feature needs a ``name`` property made of lowercase letters, digits and hyphens (it
    becomes a partition key and a directory name).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RegionError(
            f"regions file {path} does not exist; set GEOFM_REGIONS_FILE to a GeoJSON "
            "FeatureCollection of named polygons"
        ) from exc
    except json.JSONDecodeError as exc:
        raise RegionError(f"regions file {path} is not valid JSON: {exc}") from exc
    features = doc.get("features") if isinstance(doc, dict) else None
    if not features:
        raise RegionError(f"regions file {path} has no features; it must be a FeatureCollection")
    regions: dict[str, Region] = {}
    for i, feature in enumerate(features):
        props = feature.get("properties") or {}
        name = props.get("name")
        if not isinstance(name, str) or not REGION_NAME_PATTERN.match(name):
            raise RegionError(
                f"regions file {path}, feature {i}: name {name!r} must be lowercase letters, "
                "digits and hyphens (it becomes a partition key and a directory name)"
            )
        if name in regions:
            raise RegionError(f"regions file {path}: region {name!r} is defined twice")
        try:
            geom = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
            raise RegionError(f"regions file {path}, region {name!r}: bad geometry: {exc}") from exc
        if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon") or not geom.is_valid:
            raise RegionError(
                f"regions file {path}, region {name!r}: geometry must be a valid, non-empty "
                f"(Multi)Polygon in lon/lat, got {geom.geom_type}"
            )
        minx, miny, maxx, maxy = geom.bounds
        if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
            raise RegionError(
                f"regions file {path}, region {name!r}: coordinates are not lon/lat degrees"
            )
        regions[name] = Region(name=name, geometry=geom, description=props.get("description", ""))
    return regions


def get_region(regions: dict[str, Region], name: str) -> Region:
    try:
        return regions[name]
    except KeyError:
        known = ", ".join(sorted(regions)) or "(none)"
        raise RegionError(
            f"unknown region {name!r}; known regions: {known}. Add it to the regions file "
            "(GEOFM_REGIONS_FILE) and reload the code location."
        ) from None


@dataclass(frozen=True)
class ChipGrid:
    """A grid of square chips over a region, on the region's UTM grid.

    The origin is the region's upper-left corner snapped outwards to a multiple of
    ``snap`` metres (20 m: whole Sentinel-2 20 m pixels, which also aligns the 10 m grid), so
    the same chip id names the same ground on every date.
    """

    region: str
    epsg: int
    x0: float  # upper-left x of chip (0, 0), metres
    y0: float  # upper-left y of chip (0, 0), metres
    n_rows: int
    n_cols: int
    cells: tuple[tuple[int, int], ...]  # (row, col) of the chips that touch the region
    chip_size: int = 256  # pixels
    resolution: float = 10.0  # metres

    @classmethod
    def for_region(
        cls, region: Region, chip_size: int = 256, resolution: float = 10.0, snap: float = 20.0
    ) -> ChipGrid:
        epsg = region.epsg
        to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
        utm_geom = reproject(shapely.segmentize(region.geometry, 0.001), to_utm)
        minx, miny, maxx, maxy = utm_geom.bounds
        x0 = math.floor(minx / snap) * snap
        y0 = math.ceil(maxy / snap) * snap
        step = chip_size * resolution
        n_cols = max(1, math.ceil((maxx - x0) / step))
        n_rows = max(1, math.ceil((y0 - miny) / step))
        shapely.prepare(utm_geom)
        cells = tuple(
            (r, c)
            for r in range(n_rows)
            for c in range(n_cols)
            if utm_geom.intersects(
                box(x0 + c * step, y0 - (r + 1) * step, x0 + (c + 1) * step, y0 - r * step)
            )
        )
        return cls(region.name, epsg, x0, y0, n_rows, n_cols, cells, chip_size, resolution)

    @property
    def step(self) -> float:
        return self.chip_size * self.resolution

    @property
    def width(self) -> int:
        return self.n_cols * self.chip_size

    @property
    def height(self) -> int:
        return self.n_rows * self.chip_size

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y0)

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def chip_id(self, row: int, col: int) -> str:
        return f"{self.region}_r{row:04d}_c{col:04d}"

    def parse_chip_id(self, chip_id: str) -> tuple[int, int]:
        m = CHIP_ID_PATTERN.match(chip_id)
        if not m or m["region"] != self.region:
            raise ValueError(f"chip id {chip_id!r} is not a chip of region {self.region!r}")
        row, col = int(m["row"]), int(m["col"])
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise ValueError(f"chip id {chip_id!r} lies outside the {self.n_rows}x{self.n_cols} grid")
        return row, col

    def chip_bounds(self, row: int, col: int) -> tuple[float, float, float, float]:
        s = self.step
        return (self.x0 + col * s, self.y0 - (row + 1) * s, self.x0 + (col + 1) * s, self.y0 - row * s)

    def chip_transform(self, row: int, col: int) -> Affine:
        minx, _, _, maxy = self.chip_bounds(row, col)
        return Affine(self.resolution, 0.0, minx, 0.0, -self.resolution, maxy)

    @cached_property
    def _to_lonlat(self) -> Transformer:
        return Transformer.from_crs(self.epsg, 4326, always_xy=True)

    def chip_polygon_lonlat(self, row: int, col: int) -> BaseGeometry:
        """The chip's footprint in EPSG:4326 (edges densified, so it follows the UTM square)."""
        utm = shapely.segmentize(box(*self.chip_bounds(row, col)), self.step / 4)
        return reproject(utm, self._to_lonlat)

    def to_dict(self) -> dict[str, object]:
        return {
            "region": self.region,
            "epsg": self.epsg,
            "x0": self.x0,
            "y0": self.y0,
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "chip_size": self.chip_size,
            "resolution": self.resolution,
            "n_chips": len(self.cells),
        }
