"""Chips: 256 x 256 windows of a region mosaic on the region's chip grid, each written as a
NetCDF datacube and an RGB thumbnail, with cloud/shadow/no-data fractions from SCL.

The mosaic is tiled on the chip grid, so each chip is one tile read from a dataset opened once
per chip row; rows are spread over worker processes.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geofm_assets.bands import (
    SCL_CLOUD_CLASSES,
    SCL_NO_DATA,
    SCL_SHADOW_CLASSES,
    SPECTRAL_BAND_NAMES,
    SPECTRAL_BANDS,
)
from geofm_assets.geo.datacube import DatacubeWriter
from geofm_assets.geo.png import fast_png
from geofm_assets.geo.regions import ChipGrid

SCL_INDEX = len(SPECTRAL_BANDS)
RGB_INDEX = tuple(SPECTRAL_BAND_NAMES.index(n) for n in ("red", "green", "blue"))
THUMBNAIL_WHITE_DN = 3000.0  # reflectance 0.30 maps to white; a fixed stretch compares dates
DROP_REASONS = ("nodata", "cloud", "shadow")


@dataclass(frozen=True)
class ChipThresholds:
    max_cloud_fraction: float = 0.10
    max_shadow_fraction: float = 0.10
    max_nodata_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"chip threshold {name} must be within [0, 1], got {value}")


@dataclass
class ChipRecord:
    chip_id: str
    row: int
    col: int
    cloud_fraction: float
    shadow_fraction: float
    nodata_fraction: float
    band_means: list[float]  # harmonized DN per spectral band, over valid pixels
    datacube_path: str  # relative to the partition directory
    thumbnail_path: str


@dataclass
class ChippingResult:
    kept: list[ChipRecord] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in DROP_REASONS})
    # how the datacubes were written ("template", "netcdf4"; both when workers differed) and,
    # where a writer could not use a template, why (see geo.datacube.DatacubeWriter)
    datacube_writers: set[str] = field(default_factory=set)
    template_fallbacks: set[str] = field(default_factory=set)

    @property
    def dropped_counts(self) -> dict[str, int]:
        return {r: len(ids) for r, ids in self.dropped.items()}


# SCL class -> 1 cloud, 2 cloud shadow, 0 anything else (classes past 255 are not SCL's)
_SCL_KIND = np.zeros(256, np.uint8)
_SCL_KIND[list(SCL_CLOUD_CLASSES)] = 1
_SCL_KIND[list(SCL_SHADOW_CLASSES)] = 2


def chip_fractions(
    scl: np.ndarray, spectral: np.ndarray, spectral_valid: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(cloud, shadow, nodata) fractions of a chip: nodata over all pixels, cloud and shadow
    over the pixels with data (SCL 8, 9, 10 are cloud; 3 is cloud shadow).
    ``spectral_valid``: every spectral band > 0, when the caller has it already."""
    if spectral_valid is None:
        spectral_valid = spectral.min(axis=0) > 0
    valid = spectral_valid & (scl != SCL_NO_DATA)
    n = scl.size
    n_valid = int(np.count_nonzero(valid))
    if n_valid == 0:
        return 0.0, 0.0, 1.0
    kinds = np.bincount(np.take(_SCL_KIND, np.minimum(scl, 255))[valid], minlength=3)
    return int(kinds[1]) / n_valid, int(kinds[2]) / n_valid, (n - n_valid) / n


def band_means(spectral: np.ndarray, spectral_valid: np.ndarray) -> list[float]:
    """Per band mean DN over the pixels where every band has data (0.0 where none has)."""
    if spectral_valid.all():
        # the same float64 sums, band by band, as indexing every pixel would give
        return [float(m) for m in spectral.reshape(len(spectral), -1).mean(axis=1)]
    if not spectral_valid.any():
        return [0.0] * len(spectral)
    return [float(b[spectral_valid].mean()) for b in spectral]


def drop_reason(fractions: tuple[float, float, float], t: ChipThresholds) -> str | None:
    cloud, shadow, nodata = fractions
    if nodata > t.max_nodata_fraction:
        return "nodata"
    if cloud > t.max_cloud_fraction:
        return "cloud"
    if shadow > t.max_shadow_fraction:
        return "shadow"
    return None


def rgb_thumbnail(spectral: np.ndarray) -> np.ndarray:
    """[H W 3] uint8 from harmonized DN with a fixed stretch and gamma 1/2.2."""
    rgb = spectral[list(RGB_INDEX)].astype(np.float32) / THUMBNAIL_WHITE_DN  # [3 H W]
    rgb = np.clip(rgb, 0.0, 1.0) ** (1 / 2.2)
    return (rgb * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


@dataclass(frozen=True)
class _RowTask:
    tile_path: str
    grid: ChipGrid
    row: int
    cols: tuple[int, ...]
    date: dt.date
    scene_ids: tuple[str, ...]
    out_dir: str
    thresholds: ChipThresholds
    compress: bool


# The process's datacube writer for the partition it is chipping (its template is made once,
# not once per task): keyed by what a datacube's shared bytes depend on.
_WRITER: dict[tuple[object, ...], DatacubeWriter] = {}


def _datacube_writer(task: _RowTask, crs_wkt: str) -> DatacubeWriter:
    key = (task.grid, task.date, task.scene_ids, crs_wkt, task.compress)
    writer = _WRITER.get(key)
    if writer is None:
        _WRITER.clear()
        writer = _WRITER[key] = DatacubeWriter(
            task.grid, task.date, task.scene_ids, crs_wkt, compress=task.compress
        )
    return writer


@dataclass
class _RowOutcome:
    kept: list[ChipRecord]
    dropped: list[tuple[str, str]]  # (reason, chip id)
    writer_mode: str | None  # None: no chip written
    fallback_reason: str | None


def _chip_row(task: _RowTask) -> _RowOutcome:
    grid, cs = task.grid, task.grid.chip_size
    kept: list[ChipRecord] = []
    dropped: list[tuple[str, str]] = []
    out_dir = Path(task.out_dir)
    with rasterio.open(task.tile_path) as ds:
        writer = _datacube_writer(task, ds.crs.to_wkt())
        for col in task.cols:
            # the mosaic is tiled on the chip grid: a chip is one tile, read into one
            # contiguous [C H W] array
            chip = ds.read(window=Window(col * cs, task.row * cs, cs, cs))
            record = _one_chip(task, col, chip, writer, out_dir)
            if isinstance(record, ChipRecord):
                kept.append(record)
            else:
                dropped.append((record, grid.chip_id(task.row, col)))
    if not kept:  # this task wrote nothing (the writer may be a reused one that did)
        return _RowOutcome(kept, dropped, None, None)
    return _RowOutcome(kept, dropped, writer.mode, writer.fallback_reason)


def _one_chip(
    task: _RowTask, col: int, chip: np.ndarray, writer: DatacubeWriter, out_dir: Path
) -> ChipRecord | str:
    """The chip's record once its datacube and thumbnail are written, or why it is dropped."""
    spectral, scl = chip[:SCL_INDEX], chip[SCL_INDEX]
    chip_id = task.grid.chip_id(task.row, col)
    spectral_valid = spectral.min(axis=0) > 0
    fractions = chip_fractions(scl, spectral, spectral_valid)
    reason = drop_reason(fractions, task.thresholds)
    if reason is not None:
        return reason
    datacube = f"datacubes/{chip_id}.nc"
    thumbnail = f"thumbnails/{chip_id}.png"
    writer.write(out_dir / datacube, spectral, scl, task.row, col)
    png_tmp = out_dir / f"thumbnails/.{chip_id}.png.tmp"
    png_tmp.write_bytes(fast_png(rgb_thumbnail(spectral)))
    os.replace(png_tmp, out_dir / thumbnail)
    return ChipRecord(chip_id, task.row, col, *fractions, band_means=band_means(spectral, spectral_valid),
                      datacube_path=datacube, thumbnail_path=thumbnail)


def chip_region_mosaic(
    tile_path: Path,
    grid: ChipGrid,
    date: dt.date,
    scene_ids: Sequence[str],
    out_dir: Path,
    thresholds: ChipThresholds | None = None,
    *,
    workers: int | None = None,
    compress: bool = False,
) -> ChippingResult:
    """Cut the region mosaic into the grid's chips; write kept chips under ``out_dir``."""
    thresholds = thresholds or ChipThresholds()
    out_dir = Path(out_dir)
    (out_dir / "datacubes").mkdir(parents=True, exist_ok=True)
    (out_dir / "thumbnails").mkdir(parents=True, exist_ok=True)
    rows: dict[int, list[int]] = {}
    for r, c in grid.cells:
        rows.setdefault(r, []).append(c)
    workers = workers if workers is not None else os.cpu_count() or 1
    # tasks of up to a chip row, small enough that each worker gets about 8 (the last ones
    # then end close together)
    per_task = max(1, -(-len(grid.cells) // (8 * workers)))
    tasks = [
        _RowTask(str(tile_path), grid, r, tuple(cols[i : i + per_task]), date, tuple(scene_ids),
                 str(out_dir), thresholds, compress)
        for r, cols in sorted(rows.items())
        for i in range(0, len(cols), per_task)
    ]
    workers = min(workers, len(tasks))
    if workers > 1 and len(grid.cells) >= 2 * workers * 4:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            outcomes = list(pool.map(_chip_row, tasks))
    else:
        outcomes = [_chip_row(t) for t in tasks]
    result = ChippingResult()
    for outcome in outcomes:
        result.kept.extend(outcome.kept)
        for reason, chip_id in outcome.dropped:
            result.dropped[reason].append(chip_id)
        if outcome.writer_mode is not None:
            result.datacube_writers.add(outcome.writer_mode)
        if outcome.fallback_reason is not None:
            result.template_fallbacks.add(outcome.fallback_reason)
    result.kept.sort(key=lambda k: (k.row, k.col))
    return result


