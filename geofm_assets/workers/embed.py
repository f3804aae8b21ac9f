"""The embedding worker: the external (GPU) step of the ``embeddings`` asset.

Runs outside Dagster's process and talks to it only through ``dagster-pipes``:

    python -m geofm_assets.workers.embed        # launched by PipesSubprocessClient / PipesECSClient

It reads the partition's chip table and datacubes from the lake, batches them with data
loading overlapped with compute (a reader thread keeps the next batches ready), runs the
encoder on CUDA when there is one (bf16 autocast) or the CPU, and writes one GeoParquet per
partition atomically. A batch that fails, or yields a non-finite vector, fails the run with an
error naming its chips; nothing is written then.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geofm_assets.bands import SPECTRAL_BAND_NAMES
from geofm_assets.geo.geoparquet import write_geoparquet
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, partition_dir, write_partition
from geofm_assets.models.base import Encoder, resolve_device
from geofm_assets.models.datacube import make_datacube

PATCHES_FILE = "patches.npy"


class EmbeddingError(RuntimeError):
    """A batch that could not be embedded, or produced non-finite vectors."""


@dataclass
class EmbedStats:
    count: int
    dim: int
    model: str
    checkpoint_digest: str
    device: str
    seconds: float
    model_seconds: float

    @property
    def chips_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    chip_ids: list[str]
    dn: np.ndarray  # [B C H W] uint16
    moments: list[dt.datetime]
    lats: list[float]
    lons: list[float]


def read_datacube(path: Path) -> np.ndarray:
    """[C H W] uint16 harmonized DN of a chip's datacube, bands in SPECTRAL_BAND_NAMES order."""
    with netCDF4.Dataset(path) as nc:
        names = [str(b) for b in nc["band"][:]]
        if names != list(SPECTRAL_BAND_NAMES):
            raise EmbeddingError(f"datacube {path} has bands {names}, expected {list(SPECTRAL_BAND_NAMES)}")
        refl = nc["reflectance"]
        refl.set_auto_maskandscale(False)
        return np.asarray(refl[:], dtype=np.uint16)


def _batches(lake_root: Path, rows: list[dict[str, Any]], batch_size: int) -> Iterator[_Batch]:
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        ids = [r["chip_id"] for r in part]
        try:
            dn = np.stack([read_datacube(lake_root / r["datacube_path"]) for r in part])
        except (OSError, KeyError) as exc:
            raise EmbeddingError(f"cannot read the datacubes of chips {ids}: {exc}") from exc
        moments = [r["datetime"] for r in part]
        yield _Batch(ids, dn, moments, [r["centroid_lat"] for r in part], [r["centroid_lon"] for r in part])


def _prefetched(iterator: Iterator[_Batch], depth: int = 2) -> Iterator[_Batch]:
    """Run ``iterator`` in a reader thread, ``depth`` batches ahead of the consumer."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=fill, name="datacube-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


def embed_partition(
    lake_root: Path,
    region: str,
    date: str,
    encoder: Encoder,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    patch_embeddings: bool = False,
    log: Callable[[str], None] = print,
) -> EmbedStats:
    """Embed every kept chip of a region x date partition and write
    ``embeddings/region=R/date=D/embeddings.parquet`` (GeoParquet, ``emb`` metadata).

    ``patch_embeddings``: also write ``patches.npy`` ([N L D] float16, rows in table order,
    L patch tokens row-major) for encoders with patch tokens (Clay), from the same forward pass.
    """
    lake_root = Path(lake_root)
    tokens_of = getattr(encoder, "tokens", None)
    if patch_embeddings and tokens_of is None:
        raise EmbeddingError(
            f"{encoder.name} has no patch tokens; patch embeddings need a ViT encoder such as clay-v1.5"
        )
    chips_path = partition_dir(lake_root, "chips", region, date) / CHIPS_TABLE
    if not chips_path.exists():
        raise EmbeddingError(
            f"chips table {chips_path} is missing: materialize chips for {date}|{region} first"
        )
    chips = pq.read_table(chips_path)
    rows = chips.to_pylist()
    started = time.perf_counter()
    model_seconds = 0.0
    vectors: list[np.ndarray] = []
    patches: list[np.ndarray] = []
    done = 0
    for batch in _prefetched(_batches(lake_root, rows, batch_size)):
        t0 = time.perf_counter()
        try:
            cube = make_datacube(batch.dn, batch.moments, batch.lats, batch.lons)
            if patch_embeddings and tokens_of is not None:
                tokens = np.asarray(tokens_of(cube), dtype=np.float32)  # [B 1+L D]
                emb = tokens[:, 0]
                patches.append(tokens[:, 1:].astype(np.float16))
            else:
                emb = np.asarray(encoder.embed_datacube(cube), dtype=np.float32)
        except Exception as exc:
            raise EmbeddingError(f"embedding failed for chips {batch.chip_ids}: {exc}") from exc
        model_seconds += time.perf_counter() - t0
        if emb.shape != (len(batch.chip_ids), encoder.dim):
            raise EmbeddingError(
                f"{encoder.name} returned shape {emb.shape} for chips {batch.chip_ids}, "
                f"expected ({len(batch.chip_ids)}, {encoder.dim})"
            )
        bad = [cid for cid, v in zip(batch.chip_ids, emb, strict=True) if not np.isfinite(v).all()]
        if bad:
            raise EmbeddingError(f"{encoder.name} produced non-finite vectors for chips {bad}")
        vectors.append(emb)
        done += len(batch.chip_ids)
        log(f"embedded {done}/{len(rows)} chips")
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
    table = embeddings_table(chips, matrix, encoder)
    emb_meta = {
        "model": encoder.name,
        "checkpoint_digest": encoder.checkpoint_digest,
        "dim": encoder.dim,
        "bands": list(SPECTRAL_BAND_NAMES),
        "gsd": 10.0,
        "chip_size": 256,
        "column": "embedding",
    }
    with write_partition(lake_root, "embeddings", region, date) as staging:
        if patch_embeddings:
            emb_meta["patches"] = PATCHES_FILE
            stacked = np.concatenate(patches) if patches else np.zeros((0, 0, encoder.dim), np.float16)
            np.save(staging / PATCHES_FILE, stacked)
        write_geoparquet(table, staging / EMBEDDINGS_TABLE, extra_metadata={"emb": emb_meta})
    return EmbedStats(
        count=len(rows), dim=encoder.dim, model=encoder.name,
        checkpoint_digest=encoder.checkpoint_digest, device=device,
        seconds=time.perf_counter() - started, model_seconds=model_seconds,
    )


def embeddings_table(chips: pa.Table, matrix: np.ndarray, encoder: Encoder) -> pa.Table:
    n, d = matrix.shape
    flat = pa.array(matrix.reshape(-1), type=pa.float32())
    return pa.table(
        {
            "chip_id": chips.column("chip_id"),
            "region": chips.column("region"),
            "date": chips.column("date"),
            "geometry": chips.column("geometry"),
            "centroid_lon": chips.column("centroid_lon"),
            "centroid_lat": chips.column("centroid_lat"),
            "model": pa.array([encoder.name] * n, pa.string()),
            "checkpoint_digest": pa.array([encoder.checkpoint_digest] * n, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )


def embed_lake_partition(
    lake_root: str, region: str, date: str, encoder: Encoder, **kwargs: Any
) -> EmbedStats:
    """``embed_partition`` on a lake given by URI: a local directory, or ``s3://bucket/prefix``
    (the chips partition is fetched into a scratch cache and the embeddings partition is
    committed back with single PUTs and a ``_SUCCESS`` manifest written last)."""
    if not lake_root.startswith("s3://"):
        return embed_partition(Path(lake_root), region, date, encoder, **kwargs)
    import os
    import tempfile

    from geofm_assets.lake_s3 import S3Lake, s3_client

    log = kwargs.get("log", print)
    with tempfile.TemporaryDirectory(prefix="geofm-worker-") as cache:
        s3 = S3Lake.from_uri(
            lake_root,
            s3_client(os.environ.get("GEOFM_S3_ENDPOINT_URL"), os.environ.get("AWS_REGION")),
            cache_root=cache, log=log,
        )
        s3.fetch(partition_dir(Path(), "chips", region, date).as_posix())
        local_root = Path(cache)
        stats = embed_partition(local_root, region, date, encoder, **kwargs)
        rel = partition_dir(Path(), "embeddings", region, date).as_posix()
        s3.commit(local_root / rel, rel)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    from dagster_pipes import open_dagster_pipes

    from geofm_assets.models import build_encoder

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        device = str(resolve_device(str(extras.get("device", "auto"))))
        checkpoint = extras.get("checkpoint")
        encoder = build_encoder(
            str(extras["model"]), checkpoint=Path(checkpoint) if checkpoint else None, device=device
        )
        pipes.log.info(f"embedding {extras['date']}|{extras['region']} with {encoder.name} on {device}")
        stats = embed_lake_partition(
            str(extras["lake_root"]), str(extras["region"]), str(extras["date"]), encoder,
            batch_size=int(extras.get("batch_size", 16)), device=device,
            patch_embeddings=bool(extras.get("patch_embeddings", False)), log=pipes.log.info,
        )
        pipes.report_asset_materialization(
            metadata={
                "count": stats.count,
                "dims": stats.dim,
                "model": stats.model,
                "checkpoint_digest": stats.checkpoint_digest,
                "device": stats.device,
                "chips_per_s": round(stats.chips_per_s, 2),
                "model_seconds": round(stats.model_seconds, 3),
                "seconds": round(stats.seconds, 3),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
