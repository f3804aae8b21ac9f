"""Embedding throughput per encoder: model-only and end to end, with model FLOP utilization.

    .venv/bin/python bench/embed.py [--encoders rcf,clay-v1,clay-v1.5] [--device auto] [--batch 8]
        [--lake DIR --partition DATE|REGION] [--replicate N] [--compile] [--readers N] [--json FILE]

Model-only: ``embed_datacube`` on batches of real chips already in memory (on a GPU, already
on the device and normalized: the model's time alone). End to end: the embedding worker's
``embed_partition`` on a lake partition (datacubes read by reader processes or a reader thread,
uploaded and normalized on a side CUDA stream on a GPU, spatial features pooled, GeoParquet
and spatial.npy written), as the Pipes step runs it. MFU: achieved model FLOP/s (FLOPs counted
by torch's FlopCounterMode on one eager forward) over the GEMM peak measured here, in the same
process, on the same device and dtype. Clay runs with random weights of the published shapes
(no checkpoint can be downloaded here; speed does not depend on the values).

Chips come from the bench sample, materialized with Dagster on first use, or from ``--lake``
(an existing lake partition: no Dagster, rasterio or STAC needed, e.g. on a GPU machine).
``--replicate N`` copies that partition's datacubes into an N-chip partition for the end-to-end
run, so that it lasts long enough on a fast device. The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from geofm_assets.models import build_encoder
from geofm_assets.models.base import Encoder, resolve_device
from geofm_assets.models.clay import CLAY_CONFIGS, ClayEncoder, ClayEncoderModel
from geofm_assets.models.datacube import make_datacube
from geofm_assets.workers.embed import embed_partition, read_datacube

OUT = Path(__file__).resolve().parent / "out"


def gemm_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul, best of a few runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def make_encoder(name: str, device: str, cpu_bf16: bool, compile: bool = False) -> Encoder:
    if name.startswith("clay-"):
        torch.manual_seed(0)
        model = ClayEncoderModel(CLAY_CONFIGS[name])
        return ClayEncoder(model, checkpoint_digest="random-init", name=name, device=device,
                           cpu_bf16=cpu_bf16, compile=compile)
    return build_encoder(name, device=device)


def flops_per_chip(encoder: Encoder, cube: dict) -> float:
    one = {**cube, "pixels": cube["pixels"][:1], "time": cube["time"][:1], "latlon": cube["latlon"][:1]}
    with FlopCounterMode(display=False) as counter:
        encoder.embed_datacube(one)
    return float(counter.get_total_flops())


def sample_lake(tmp: Path) -> tuple[Path, str, str, list[np.ndarray], dict]:
    """Chips of one region x date of the bench sample, materialized into ``tmp``'s lake."""
    from dagster import DagsterInstance, materialize

    from geofm_assets.assets.chips import chips
    from geofm_assets.assets.tiles import sentinel2_tiles
    from geofm_assets.geo.sample_data import generate_sample
    from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
    from geofm_assets.resources.lake import LocalLakeResource
    from geofm_assets.resources.stac import StacResource

    sample_root = OUT / "sample-bench"
    if not (sample_root / "catalog.json").exists():
        generate_sample(sample_root, size="bench", seed=0)
    date, region = "2021-07-31", "jamari"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, [date])
    lake = tmp / "lake"
    resources = {"stac": StacResource(catalog=str(sample_root / "catalog.json")),
                 "lake": LocalLakeResource(root=str(lake))}
    ok = materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                     partition_key=str(partition_key(date, region)),
                     run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}}).success
    if not ok:
        raise SystemExit("could not materialize the bench chips")
    table = pq.read_table(lake / f"chips/region={region}/date={date}/chips.parquet").to_pylist()
    dn = [read_datacube(lake / r["datacube_path"]) for r in table]
    return lake, region, date, dn, table


def existing_lake(lake: Path, partition: str) -> tuple[Path, str, str, list[np.ndarray], list[dict]]:
    date, region = partition.split("|")
    table = pq.read_table(lake / f"chips/region={region}/date={date}/chips.parquet").to_pylist()
    dn = [read_datacube(lake / r["datacube_path"]) for r in table]
    return lake, region, date, dn, table


def replicate(lake: Path, region: str, date: str, n: int, dest: Path) -> Path:
    """A lake in ``dest`` whose ``date|region`` chips partition holds ``n`` chips: the source
    partition's rows and datacube files copied round-robin under new chip ids."""
    src = lake / f"chips/region={region}/date={date}"
    table = pq.read_table(src / "chips.parquet")
    rows = table.to_pylist()
    out = dest / f"chips/region={region}/date={date}"
    (out / "datacubes").mkdir(parents=True, exist_ok=True)
    picked = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        row["chip_id"] = f"{row['chip_id']}_copy{i:05d}"
        rel = f"chips/region={region}/date={date}/datacubes/{row['chip_id']}.nc"
        shutil.copyfile(lake / rows[i % len(rows)]["datacube_path"], dest / rel)
        row["datacube_path"] = rel
        picked.append(row)
    pq.write_table(pa.Table.from_pylist(picked, schema=table.schema), out / "chips.parquet")
    return dest


def timed_rate(encoder: Encoder, cube: dict, batch: int, device: str, min_runs: int, min_s: float) -> float:
    encoder.embed_datacube(cube)  # warm-up (and, compiled, the compile)
    if device == "cuda":
        torch.cuda.synchronize()
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_s:
        encoder.embed_datacube(cube)
        runs += 1
        if runs >= 3 and time.perf_counter() - t0 > 30:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return runs * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="rcf,clay-v1,clay-v1.5")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=0, help="0: 32 on CUDA, 4 on CPU")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU for Clay")
    p.add_argument("--e2e-max-seconds", type=float, default=120.0,
                   help="skip the end-to-end run of an encoder whose model-only estimate exceeds this")
    p.add_argument("--lake", help="use this lake's --partition instead of materializing the bench sample")
    p.add_argument("--partition", default="2021-07-31|jamari", help="DATE|REGION of --lake")
    p.add_argument("--replicate", type=int, default=0, help="end to end over this many chips (copies)")
    p.add_argument("--compile", action="store_true", help="Clay under torch.compile (instead of eager)")
    p.add_argument("--readers", type=int, default=-1, help="worker reader processes (-1: its default)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = resolve_device(args.device).type
    batch = args.batch or (32 if device == "cuda" else 4)
    dtype = torch.bfloat16 if device == "cuda" or args.cpu_bf16 else torch.float32
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                 f"{torch.get_num_threads()} torch threads")
    peak = gemm_peak(device, dtype, 8192 if device == "cuda" else 2048)
    print(f"# {where}; {dt.date.today()}; torch {torch.__version__}; "
          f"GEMM peak {peak / 1e12:.2f} TFLOP/s ({dtype})")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.lake:
            lake, region, date, dn, rows = existing_lake(Path(args.lake), args.partition)
        else:
            lake, region, date, dn, rows = sample_lake(Path(tmp))
        e2e_lake = lake
        if args.replicate:
            e2e_lake = replicate(lake, region, date, args.replicate, Path(tmp) / "copies")
        n_e2e = args.replicate or len(dn)
        print(f"# {len(dn)} chips of {date}|{region}; end to end over {n_e2e}; batch {batch}")
        picks = [rows[i % len(rows)] for i in range(batch)]
        cube = make_datacube(
            np.stack([dn[i % len(dn)] for i in range(batch)]), [r["datetime"] for r in picks],
            [r["centroid_lat"] for r in picks], [r["centroid_lon"] for r in picks],
        )
        for name in args.encoders.split(","):
            variants = [True] if args.compile and name.startswith("clay-") else [False]
            for compiled in variants:
                label = name + (" compiled" if compiled else "")
                encoder = make_encoder(name, device, args.cpu_bf16, compile=compiled)
                # FLOPs counted on an eager forward (a compiled one hides them from the counter)
                eager = make_encoder(name, device, args.cpu_bf16) if compiled else encoder
                flops = flops_per_chip(eager, cube)
                run_cube = cube
                if device == "cuda" and encoder.accepts_device_pixels:
                    run_cube = {**cube, "pixels": torch.as_tensor(cube["pixels"], device="cuda")}
                t_start = time.perf_counter()
                model_rate = timed_rate(encoder, run_cube, batch, device, min_runs=3,
                                        min_s=5.0 if device == "cuda" else 0.0)
                mfu = model_rate * flops / peak
                line = (f"{label:19s} dim {encoder.dim:5d}  {flops / 1e9:7.1f} GFLOP/chip  model-only "
                        f"{model_rate:8.2f} chips/s  MFU {100 * mfu:5.1f}%")
                entry: dict = {"model_chips_per_s": round(model_rate, 3), "mfu": round(mfu, 4),
                               "gflop_per_chip": round(flops / 1e9, 1),
                               "warmup_and_timing_s": round(time.perf_counter() - t_start, 1)}
                if n_e2e / model_rate <= args.e2e_max_seconds:
                    for grid in (16, 0):
                        stats = embed_partition(e2e_lake, region, date, encoder, batch_size=batch,
                                                device=device, spatial_grid=grid, readers=args.readers,
                                                log=lambda _m: None)
                        key = "e2e_chips_per_s" if grid else "e2e_no_spatial_chips_per_s"
                        entry[key] = round(stats.chips_per_s, 3)
                        entry["readers"] = stats.readers
                        entry[key.replace("chips_per_s", "breakdown_s")] = {
                            "total": round(stats.seconds, 3),
                            "first_batch": round(stats.first_batch_seconds, 3),
                            "model": round(stats.model_seconds, 3), "write": round(stats.write_seconds, 3)}
                        line += (f"  end-to-end{'' if grid else ' (no spatial)'} {stats.chips_per_s:8.2f} "
                                 f"chips/s ({100 * stats.chips_per_s / model_rate:.0f}%)")
                else:
                    line += "  end-to-end skipped (too slow here; raise --e2e-max-seconds)"
                print(line, flush=True)
                results[label] = entry
                del encoder
                if device == "cuda":
                    torch.cuda.empty_cache()
    summary = {"device": where, "date": str(dt.date.today()), "torch": torch.__version__,
               "batch": batch, "chips_e2e": n_e2e, "peak_tflops": round(peak / 1e12, 3),
               "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
