"""Chipping throughput and memory against the machine's limit, measured in one process.

    .venv/bin/python bench/chipping.py [--size bench] [--workers N] [--repeat 3] [--cog-compression NONE]

Pipeline: ``sentinel2_tiles`` + ``chips`` for a region x date as the assets run them
(scene COG windows -> mosaic COG -> chips with NetCDF datacubes, thumbnails, fractions).
Limit: the same scene COG windows read with rasterio (rows of chips from open datasets), the
20 m bands upsampled, and each chip's bytes written as an uncompressed NetCDF and a PNG, the
fastest way we have (the pipeline's own ``geo.datacube.DatacubeWriter``, which writes the same
file as netCDF4 does in an eighth of the time, and ``geo.png.fast_png``), nothing else, on all
cores. Every chip is kept
in both (thresholds at 1.0), so both do the same chips. Peak memory is measured for a small and
a large region in fresh processes.
Both are timed ``--repeat`` times over the dates, the two in alternating order; the figures
are the median pass (this VM's neighbours make single passes vary by +-15%).
Prints chips/s for both, the ratio, and the multiple of the public reference pipeline
(about 7.5 chips/s on a 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import shapely
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from geofm_assets.bands import SPECTRAL_BANDS, TILE_BAND_NAMES
from geofm_assets.geo.catalog import StaticCatalog
from geofm_assets.geo.chipping import ChipThresholds, chip_region_mosaic, rgb_thumbnail
from geofm_assets.geo.datacube import DatacubeWriter
from geofm_assets.geo.mosaic import COG_COMPRESSIONS, upsample2x_bilinear
from geofm_assets.geo.png import fast_png
from geofm_assets.geo.regions import ChipGrid, Region
from geofm_assets.geo.sample_data import SIZE_PRESETS, generate_sample
from geofm_assets.geo.scenes import Scene, scenes_on_date

REFERENCE_CHIPS_PER_S = 7.5
OUT = Path(__file__).resolve().parent / "out"


def bench_sample(size: str) -> Path:
    root = OUT / f"sample-{size}"
    if not (root / "catalog.json").exists():
        t0 = time.perf_counter()
        generate_sample(root, size=size, seed=0)
        print(f"# wrote the {size} sample in {time.perf_counter() - t0:.1f} s", flush=True)
    return root / "catalog.json"


def tile_region(catalog: StaticCatalog, chips_wide: int, chips_high: int) -> Region:
    """A region of chips_wide x chips_high chips inside the first MGRS tile."""
    item = catalog.items()[0]
    t = item.assets["blue"].extra_fields["proj:transform"]
    x0, y0 = t[2] + 2000, t[5] - 2000
    step = 2560
    to_ll = Transformer.from_crs(32720, 4326, always_xy=True)
    utm = shapely.box(x0 + 30, y0 - chips_high * step + 30, x0 + chips_wide * step - 30, y0 - 30)
    ll = shapely.transform(utm, lambda x, y: to_ll.transform(x, y), interleaved=False)
    return Region(name=f"bench-{chips_wide}x{chips_high}", geometry=ll)


def pipeline(
    scenes: list[Scene], grid: ChipGrid, date: dt.date, out: Path, workers: int, compress: str = "NONE"
) -> int:
    from geofm_assets.geo.mosaic import write_region_mosaic

    write_region_mosaic(scenes, grid, out / "mosaic.tif", threads=workers, compress=compress)
    result = chip_region_mosaic(
        out / "mosaic.tif", grid, date, [s.item_id for s in scenes], out / "chips",
        ChipThresholds(1.0, 1.0, 1.0), workers=workers,
    )
    return len(result.kept)


def _limit_rows(args: tuple[list[Scene], ChipGrid, list[int], str]) -> int:
    """One worker's share of chip rows: every scene band opened once (so GDAL's block cache
    decodes each internal tile once), each row's windows read, 20 m bands upsampled, and each
    chip written as an uncompressed NetCDF and a fast PNG."""
    scenes, grid, rows, out = args
    cs = grid.chip_size
    datasets = {(s.item_id, n): rasterio.open(s.assets[n].href) for s in scenes for n in TILE_BAND_NAMES}
    date = scenes[0].datetime.date()
    writer = DatacubeWriter(grid, date, [s.item_id for s in scenes], CRS.from_epsg(grid.epsg).to_wkt())
    n = 0
    try:
        for row in rows:
            strips = []
            for scene in scenes:
                bands = []
                for name in TILE_BAND_NAMES:
                    asset, ds = scene.assets[name], datasets[(scene.item_id, name)]
                    f = round(asset.resolution / grid.resolution)
                    c0 = round((grid.x0 - asset.transform.c) / asset.resolution)
                    r0 = round((asset.transform.f - grid.y0) / asset.resolution) + row * cs // f
                    w = grid.width // f
                    if f == 2 and name != "scl":
                        a = ds.read(1, window=Window(c0 - 1, r0 - 1, w + 2, cs // f + 2))
                        bands.append(upsample2x_bilinear(a).astype(np.uint16))
                    else:
                        a = ds.read(1, window=Window(c0, r0, w, cs // f))
                        bands.append(np.repeat(np.repeat(a, f, 0), f, 1) if f > 1 else a)
                strips.append(np.stack(bands))
            for col in range(grid.n_cols):
                chip = strips[0][:, :, col * cs : (col + 1) * cs]
                spectral = chip[: len(SPECTRAL_BANDS)]
                writer.write(Path(out) / f"{row}_{col}.nc", spectral, chip[len(SPECTRAL_BANDS)], row, col)
                (Path(out) / f"{row}_{col}.png").write_bytes(fast_png(rgb_thumbnail(spectral)))
                n += 1
    finally:
        for ds in datasets.values():
            ds.close()
    return n


def limit(scenes: list[Scene], grid: ChipGrid, out: Path, workers: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(range(grid.n_rows))
    shares = [rows[i * len(rows) // workers : (i + 1) * len(rows) // workers] for i in range(workers)]
    tasks = [(scenes, grid, share, str(out)) for share in shares if share]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return sum(pool.map(_limit_rows, tasks))


def _peak_rss_run(args: tuple[str, int, int, int, str]) -> tuple[float, float]:
    """In a fresh process: run the pipeline on a region; (own peak MiB, largest child MiB)."""
    catalog_path, chips_wide, chips_high, workers, compress = args
    catalog = StaticCatalog(catalog_path)
    region = tile_region(catalog, chips_wide, chips_high)
    grid = ChipGrid.for_region(region)
    date = catalog.items()[0].datetime.date()
    scenes = scenes_on_date(catalog.search(region.bounds, date, date), date)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline(scenes, grid, date, Path(tmp), workers, compress)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="bench", choices=sorted(SIZE_PRESETS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dates", type=int, default=2, help="dates to time")
    p.add_argument("--repeat", type=int, default=3, help="timed passes over the dates")
    p.add_argument("--cog-compression", default="NONE", choices=COG_COMPRESSIONS,
                   help="the region COG's compression (sentinel2_tiles' cog_compression)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    catalog_path = bench_sample(args.size)
    catalog = StaticCatalog(catalog_path)
    tile_chips = (SIZE_PRESETS[args.size].tile_pixels - 4000 // 10) // 256
    region = tile_region(catalog, tile_chips, tile_chips)
    grid = ChipGrid.for_region(region)
    dates = sorted({i.datetime.date() for i in catalog.items()})[: args.dates]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {dt.date.today()}; region {grid.n_rows}x{grid.n_cols} chips, "
          f"{len(dates)} dates, {args.workers} workers, {args.repeat} passes, "
          f"region COG {args.cog_compression}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="geofm-bench-"))
    passes: list[tuple[float, float]] = []  # (limit chips/s, pipeline chips/s)
    n_pipe = n_lim = 0
    try:
        for rep in range(args.repeat):
            t_pipe = t_lim = 0.0
            n_pipe = n_lim = 0
            for i, date in enumerate(dates):
                scenes = scenes_on_date(catalog.search(region.bounds, date, date), date)
                for which in ("limit", "pipeline") if (rep + i) % 2 == 0 else ("pipeline", "limit"):
                    t0 = time.perf_counter()
                    if which == "limit":
                        n_lim += limit(scenes, grid, work / f"limit-{i}", args.workers)
                        t_lim += time.perf_counter() - t0
                    else:
                        n_pipe += pipeline(scenes, grid, date, work / f"pipe-{i}", args.workers,
                                           args.cog_compression)
                        t_pipe += time.perf_counter() - t0
                shutil.rmtree(work / f"limit-{i}")
                shutil.rmtree(work / f"pipe-{i}")
            passes.append((n_lim / t_lim, n_pipe / t_pipe))
            print(f"# pass {rep + 1}: limit {passes[-1][0]:.1f}, pipeline {passes[-1][1]:.1f} chips/s, "
                  f"ratio {passes[-1][1] / passes[-1][0]:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lim_rate = statistics.median(lim for lim, _ in passes)
    pipe_rate = statistics.median(pipe for _, pipe in passes)
    ratio = statistics.median(pipe / lim for lim, pipe in passes)
    print(f"limit     (read windows + upsample + NetCDF + PNG): {lim_rate:7.1f} chips/s ({n_lim} a pass)")
    print(f"pipeline  (sentinel2_tiles + chips):                {pipe_rate:7.1f} chips/s ({n_pipe} a pass)")
    print(f"ratio pipeline/limit: {ratio:.2f}   (median of the passes' ratios; target >= 0.70)")
    print(f"vs the public reference ({REFERENCE_CHIPS_PER_S} chips/s): "
          f"{pipe_rate / REFERENCE_CHIPS_PER_S:.1f}x   (target >= 10x)")

    ctx = multiprocessing.get_context("spawn")
    memory = {}
    for wide, high in ((2, 2), (tile_chips, tile_chips)):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            own, kid = pool.submit(
                _peak_rss_run, (str(catalog_path), wide, high, args.workers, args.cog_compression)
            ).result()
        memory[f"{wide}x{high}"] = (own, kid)
        print(f"peak RSS, region {wide}x{high} chips: main {own:.0f} MiB, largest worker {kid:.0f} MiB, "
              f"sum {own + kid * max(args.workers, 1):.0f} MiB (target < 2048)")
    print(json.dumps({"pipeline_chips_per_s": round(pipe_rate, 1), "limit_chips_per_s": round(lim_rate, 1),
                      "ratio": round(ratio, 3),
                      "peak_rss_mib": {k: [round(v) for v in m] for k, m in memory.items()}}))


if __name__ == "__main__":
    sys.exit(main())
