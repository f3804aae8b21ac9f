"""Sentinel-2 L2A scenes as found through STAC: parsing and validating items.

Works on items laid out like Earth Search v1's ``sentinel-2-l2a`` collection, whether they come
from a static catalog (pystac) or a STAC API (pystac-client).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pystac
from affine import Affine

from geofm_assets.bands import (
    BOA_ADD_OFFSET_DN,
    BOA_OFFSET_BASELINE,
    REFLECTANCE_SCALE,
    REQUIRED_ASSETS,
)


class MalformedItemError(ValueError):
    """A STAC item that lacks what the pipeline needs (projection, a band asset, ...)."""


@dataclass(frozen=True)
class SceneAsset:
    name: str  # Earth Search asset key
    href: str  # local path or URL (http(s)://, s3://)
    epsg: int
    transform: Affine
    shape: tuple[int, int]  # (height, width)
    dn_offset: int  # DN to subtract to reach the pre-04.00 scale (0 or 1000)

    @property
    def resolution(self) -> float:
        return abs(self.transform.a)


@dataclass(frozen=True)
class Scene:
    item_id: str
    datetime: dt.datetime
    mgrs_tile: str
    cloud_cover: float
    processing_baseline: str
    epsg: int
    assets: dict[str, SceneAsset]

    @property
    def date(self) -> dt.date:
        return self.datetime.date()


def _baseline_at_least(baseline: str, reference: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    return parts(baseline) >= parts(reference)


def _item_epsg(item: pystac.Item, asset: pystac.Asset | None = None) -> int | None:
    for props in ((asset.extra_fields if asset else {}), item.properties):
        if props.get("proj:epsg") is not None:
            return int(props["proj:epsg"])
        code = props.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":", 1)[1])
    return None


def _dn_offset(item: pystac.Item, asset: pystac.Asset, baseline: str | None) -> int:
    """The additive DN offset of this band: from ``raster:bands`` offset/scale when present,
    else from the processing baseline (>= 04.00 adds 1000), unless the provider already
    removed it (``earthsearch:boa_offset_applied``)."""
    if item.properties.get("earthsearch:boa_offset_applied") is True:
        return 0
    raster_bands = asset.extra_fields.get("raster:bands")
    if raster_bands:
        band = raster_bands[0]
        offset = band.get("offset")
        scale = band.get("scale", REFLECTANCE_SCALE)
        if offset is not None and scale:
            return round(-float(offset) / float(scale))
    if baseline is not None and _baseline_at_least(baseline, BOA_OFFSET_BASELINE):
        return BOA_ADD_OFFSET_DN
    return 0


def scene_from_item(item: pystac.Item, required_assets: Sequence[str] = REQUIRED_ASSETS) -> Scene:
    """Validate an item and turn it into a ``Scene``; a clear error names what is missing."""
    where = f"STAC item {item.id!r}"
    if item.datetime is None:
        raise MalformedItemError(f"{where} has no datetime")
    missing = [a for a in required_assets if a not in item.assets]
    if missing:
        raise MalformedItemError(
            f"{where} is missing band asset(s) {', '.join(missing)}; every item needs "
            f"{', '.join(required_assets)} (Earth Search sentinel-2-l2a asset names)"
        )
    baseline = item.properties.get("s2:processing_baseline")
    assets: dict[str, SceneAsset] = {}
    for name in required_assets:
        asset = item.assets[name]
        epsg = _item_epsg(item, asset)
        transform = asset.extra_fields.get("proj:transform")
        shape = asset.extra_fields.get("proj:shape")
        if epsg is None or transform is None or shape is None:
            absent = [
                k
                for k, v in (("proj:epsg/proj:code", epsg), ("proj:transform", transform),
                             ("proj:shape", shape))
                if v is None
            ]
            raise MalformedItemError(
                f"{where}, asset {name!r} has no projection information ({', '.join(absent)}); "
                "the item must carry the STAC projection extension"
            )
        if len(transform) < 6 or len(shape) != 2:
            raise MalformedItemError(
                f"{where}, asset {name!r}: proj:transform needs 6 numbers and proj:shape 2, "
                f"got {transform!r} and {shape!r}"
            )
        assets[name] = SceneAsset(
            name=name,
            href=asset.get_absolute_href() or asset.href,
            epsg=epsg,
            transform=Affine(*[float(v) for v in transform[:6]]),
            shape=(int(shape[0]), int(shape[1])),
            dn_offset=_dn_offset(item, asset, baseline),
        )
    item_epsg = _item_epsg(item) or assets[required_assets[0]].epsg
    tile = (
        item.properties.get("s2:mgrs_tile")
        or str(item.properties.get("grid:code", "")).removeprefix("MGRS-")
        or item.id
    )
    return Scene(
        item_id=item.id,
        datetime=item.datetime,
        mgrs_tile=tile,
        cloud_cover=float(item.properties.get("eo:cloud_cover", float("nan"))),
        processing_baseline=str(baseline) if baseline is not None else "unknown",
        epsg=item_epsg,
        assets=assets,
    )


def scenes_on_date(items: Iterable[pystac.Item], date: dt.date) -> list[Scene]:
    """Scenes whose acquisition (UTC) falls on ``date``, least cloudy first."""
    scenes = [scene_from_item(i) for i in items if i.datetime and i.datetime.date() == date]
    return sorted(scenes, key=lambda s: (s.cloud_cover, s.item_id))


def local_href(href: str) -> str:
    """Paths GDAL can open: local files as is, s3:// and http(s):// through GDAL's VSI."""
    if href.startswith("s3://"):
        return "/vsis3/" + href[len("s3://"):]
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("file://"):
        return str(Path(href[len("file://"):]))
    return href
