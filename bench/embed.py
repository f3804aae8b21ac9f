"""Embedding throughput per encoder: model-only and end to end, with model FLOP utilization.

    .venv/bin/python bench/embed.py [--encoders rcf,clay-v1,clay-v1.5] [--device auto] [--batch 8]

Model-only: ``embed_datacube`` on batches of real chips already in memory. End to end: the
embedding worker's ``embed_partition`` on a lake partition (datacubes read from disk by the
prefetching reader thread, GeoParquet written), as the Pipes step runs it. MFU: achieved model
FLOP/s (FLOPs counted by torch's FlopCounterMode on one forward) over the GEMM peak measured
here, in the same process, on the same device and dtype. Clay runs with random weights of the
published shapes (no checkpoint can be downloaded here; speed does not depend on the values).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def make_encoder(name: str, device: str, cpu_bf16: bool) -> Encoder:
    if name.startswith("clay-"):
        torch.manual_seed(0)
        model = ClayEncoderModel(CLAY_CONFIGS[name])
        return ClayEncoder(model, checkpoint_digest="random-init", name=name, device=device,
                           cpu_bf16=cpu_bf16)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="rcf,clay-v1,clay-v1.5")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=0, help="0: 32 on CUDA, 4 on CPU")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU for Clay")
    p.add_argument("--e2e-max-seconds", type=float, default=120.0,
                   help="skip the end-to-end run of an encoder whose model-only estimate exceeds this")
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

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        lake, region, date, dn, rows = sample_lake(Path(tmp))
        print(f"# {len(dn)} chips of {date}|{region} (bench sample), batch {batch}")
        picks = [rows[i % len(rows)] for i in range(batch)]
        cube = make_datacube(
            np.stack([dn[i % len(dn)] for i in range(batch)]), [r["datetime"] for r in picks],
            [r["centroid_lat"] for r in picks], [r["centroid_lon"] for r in picks],
        )
        for name in args.encoders.split(","):
            encoder = make_encoder(name, device, args.cpu_bf16)
            flops = flops_per_chip(encoder, cube)
            encoder.embed_datacube(cube)  # warm-up
            runs, t0 = 0, time.perf_counter()
            while runs < 3 and (runs == 0 or time.perf_counter() - t0 < 30):
                encoder.embed_datacube(cube)
                runs += 1
            if device == "cuda":
                torch.cuda.synchronize()
            model_rate = runs * batch / (time.perf_counter() - t0)
            mfu = model_rate * flops / peak
            line = (f"{name:10s} dim {encoder.dim:5d}  {flops / 1e9:8.1f} GFLOP/chip  model-only "
                    f"{model_rate:8.2f} chips/s  MFU {100 * mfu:5.1f}%")
            e2e_rate = None
            if len(dn) / model_rate <= args.e2e_max_seconds:
                stats = embed_partition(lake, region, date, encoder, batch_size=batch, device=device,
                                        log=lambda _m: None)
                e2e_rate = stats.chips_per_s
                share = 100 * e2e_rate / model_rate
                line += f"  end-to-end {e2e_rate:8.2f} chips/s ({share:.0f}% of model-only)"
            else:
                line += "  end-to-end skipped (too slow here; raise --e2e-max-seconds)"
            print(line, flush=True)
            results[name] = {"model_chips_per_s": round(model_rate, 3), "mfu": round(mfu, 4),
                             "gflop_per_chip": round(flops / 1e9, 1),
                             "e2e_chips_per_s": round(e2e_rate, 3) if e2e_rate else None}
    print(json.dumps({"device": where, "peak_tflops": round(peak / 1e12, 3), "results": results}))


if __name__ == "__main__":
    sys.exit(main())
