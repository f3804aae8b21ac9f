"""The embedding worker: the external (GPU) step of the ``embeddings`` asset.

Runs outside Dagster's process and talks to it only through ``dagster-pipes``:

    python -m geofm_assets.workers.embed        # launched by PipesSubprocessClient / PipesECSClient

It reads the partition's chip table and datacubes from the lake, batches them with data
loading overlapped with compute (a reader thread keeps the next batches ready), runs the
encoder on CUDA when there is one (bf16 autocast) or the CPU, and writes one GeoParquet per
partition atomically. A batch that fails, or yields a non-finite vector, fails the run with an
error naming its chips; nothing is written then.

Spatial features (``spatial_grid`` g > 0, on by default): beside the table, ``spatial.npy``
``[N g g D]`` float16 (rows in table order; row-major cells, cell (0, 0) at the chip's
north-west corner) holds the encoder's features on a g x g grid of cells inside each chip, and
``spatial_valid.npy`` ``[N g g]`` float16 the clear-pixel fraction of each cell from the
datacube's SCL band (not no-data, saturated, cloud or cloud shadow), so that change can be
detected where clearings happen (a 5 ha clearing is < 1% of a 655 ha chip, ~2 cells of 2.56 ha
at g = 16). Clay: the patch tokens of the same forward pass, average-pooled from 32 x 32 to
g x g. rcf: ``RCFEncoder.feature_map`` (the embedding's features before their spatial mean,
texture responses every ``SPATIAL_RCF_STRIDE`` px), a second pass over the chip. Encoders with
neither (``hf:``) write none and say so in the ``emb`` metadata (``spatial: null``).
"""

from __future__ import annotations

import datetime as dt
import math
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

from geofm_assets.bands import (
    SCL_CLOUD_CLASSES,
    SCL_NO_DATA,
    SCL_SATURATED_OR_DEFECTIVE,
    SCL_SHADOW_CLASSES,
    SPECTRAL_BAND_NAMES,
)
from geofm_assets.geo.geoparquet import write_geoparquet
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, partition_dir, write_partition
from geofm_assets.models.base import Encoder, resolve_device
from geofm_assets.models.datacube import make_datacube

PATCHES_FILE = "patches.npy"
SPATIAL_FILE = "spatial.npy"
SPATIAL_VALID_FILE = "spatial_valid.npy"
CHIP_SIZE = 256  # px, as the chips asset cuts them
DEFAULT_SPATIAL_GRID = 16  # 16 x 16 cells of 16 px (160 m, 2.56 ha) in a 256 px chip
SPATIAL_RCF_STRIDE = 2  # rcf texture responses every 2 px: 64 per 16 px cell
NOT_CLEAR_SCL: tuple[int, ...] = (
    SCL_NO_DATA, SCL_SATURATED_OR_DEFECTIVE, *SCL_SHADOW_CLASSES, *SCL_CLOUD_CLASSES,
)


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
    spatial_grid: int = 0  # g of spatial.npy; 0 when none was written
    spatial_seconds: float = 0.0  # of model_seconds: the spatial features' share

    @property
    def chips_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    chip_ids: list[str]
    dn: np.ndarray  # [B C H W] uint16
    scl: np.ndarray  # [B H W] uint8
    moments: list[dt.datetime]
    lats: list[float]
    lons: list[float]


def read_datacube(path: Path) -> np.ndarray:
    """[C H W] uint16 harmonized DN of a chip's datacube, bands in SPECTRAL_BAND_NAMES order."""
    return read_datacube_and_scl(path)[0]


def read_datacube_and_scl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """([C H W] uint16 harmonized DN, bands in SPECTRAL_BAND_NAMES order, [H W] uint8 SCL) of a
    chip's datacube, from one open of the file."""
    with netCDF4.Dataset(path) as nc:
        names = [str(b) for b in nc["band"][:]]
        if names != list(SPECTRAL_BAND_NAMES):
            raise EmbeddingError(f"datacube {path} has bands {names}, expected {list(SPECTRAL_BAND_NAMES)}")
        if "scl" not in nc.variables:
            raise EmbeddingError(f"datacube {path} has no scl variable: materialize its chips again")
        refl = nc["reflectance"]
        refl.set_auto_maskandscale(False)
        scl = nc["scl"]
        scl.set_auto_maskandscale(False)
        return np.asarray(refl[:], dtype=np.uint16), np.asarray(scl[:], dtype=np.uint8)


def cell_clear_fraction(dn: np.ndarray, scl: np.ndarray, grid: int) -> np.ndarray:
    """``[B g g]`` float32: the fraction of each cell's pixels that are clear, i.e. have data in
    every band and an SCL class other than no-data, saturated, cloud shadow or cloud (8, 9, 10).

    dn ``[B C H W]``, scl ``[B H W]``; H and W multiples of ``grid``."""
    b, _, h, w = dn.shape
    if h % grid or w % grid:
        raise EmbeddingError(f"spatial grid {grid} does not divide the {h} x {w} px chips")
    clear = ~np.isin(scl, NOT_CLEAR_SCL) & (dn > 0).all(axis=1)  # [B H W]
    cells = clear.reshape(b, grid, h // grid, grid, w // grid)
    return cells.mean(axis=(2, 4), dtype=np.float32)


def pooled_patch_tokens(patches: np.ndarray, grid: int) -> np.ndarray:
    """``[B g g D]``: a ViT's row-major patch tokens ``[B L D]`` (a square L = s x s grid)
    average-pooled to ``grid`` x ``grid`` cells."""
    b, n_tokens, d = patches.shape
    side = math.isqrt(n_tokens)
    if side * side != n_tokens or side % grid:
        raise EmbeddingError(
            f"{n_tokens} patch tokens are not a square grid divisible into {grid} x {grid} cells: "
            "choose a spatial_grid that divides the token grid (e.g. 16 or 8 for 32 x 32 tokens)"
        )
    f = side // grid
    return patches.reshape(b, grid, f, grid, f, d).mean(axis=(2, 4), dtype=np.float32)


def spatial_source(encoder: Encoder) -> str | None:
    """How ``encoder`` gives spatial features: "tokens" (ViT patch tokens), "feature_map" (rcf),
    or None."""
    if getattr(encoder, "tokens", None) is not None:
        return "tokens"
    if getattr(encoder, "feature_map", None) is not None:
        return "feature_map"
    return None


def _batches(lake_root: Path, rows: list[dict[str, Any]], batch_size: int) -> Iterator[_Batch]:
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        ids = [r["chip_id"] for r in part]
        try:
            cubes = [read_datacube_and_scl(lake_root / r["datacube_path"]) for r in part]
        except (OSError, KeyError) as exc:
            raise EmbeddingError(f"cannot read the datacubes of chips {ids}: {exc}") from exc
        dn = np.stack([c[0] for c in cubes])  # [B C H W]
        scl = np.stack([c[1] for c in cubes])  # [B H W]
        moments = [r["datetime"] for r in part]
        yield _Batch(ids, dn, scl, moments, [r["centroid_lat"] for r in part],
                     [r["centroid_lon"] for r in part])


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
    spatial_grid: int = DEFAULT_SPATIAL_GRID,
    log: Callable[[str], None] = print,
) -> EmbedStats:
    """Embed every kept chip of a region x date partition and write
    ``embeddings/region=R/date=D/embeddings.parquet`` (GeoParquet, ``emb`` metadata).

    ``patch_embeddings``: also write ``patches.npy`` ([N L D] float16, rows in table order,
    L patch tokens row-major) for encoders with patch tokens (Clay), from the same forward pass.
    ``spatial_grid`` g > 0: also write ``spatial.npy`` ([N g g D] float16) and
    ``spatial_valid.npy`` ([N g g] float16 clear fraction) where the encoder has spatial features
    (module doc); 0: none.
    """
    lake_root = Path(lake_root)
    tokens_of = getattr(encoder, "tokens", None)
    if patch_embeddings and tokens_of is None:
        raise EmbeddingError(
            f"{encoder.name} has no patch tokens; patch embeddings need a ViT encoder such as clay-v1.5"
        )
    if spatial_grid < 0 or (spatial_grid and CHIP_SIZE % spatial_grid):
        raise EmbeddingError(
            f"spatial_grid {spatial_grid} does not divide the {CHIP_SIZE} px chips into cells: choose "
            "0 (none) or a divisor such as 8, 16 or 32"
        )
    source = spatial_source(encoder) if spatial_grid > 0 else None
    if spatial_grid > 0 and source is None:
        log(f"{encoder.name} has no patch tokens or feature map: no spatial features written "
            "(change_maps' patch_distance series needs them; use rcf or clay-*)")
    chips_path = partition_dir(lake_root, "chips", region, date) / CHIPS_TABLE
    if not chips_path.exists():
        raise EmbeddingError(
            f"chips table {chips_path} is missing: materialize chips for {date}|{region} first"
        )
    chips = pq.read_table(chips_path)
    rows = chips.to_pylist()
    started = time.perf_counter()
    model_seconds = 0.0
    spatial_seconds = 0.0
    vectors: list[np.ndarray] = []
    patches: list[np.ndarray] = []
    spatial: list[np.ndarray] = []
    spatial_valid: list[np.ndarray] = []
    done = 0
    for batch in _prefetched(_batches(lake_root, rows, batch_size)):
        t0 = time.perf_counter()
        try:
            cube = make_datacube(batch.dn, batch.moments, batch.lats, batch.lons)
            if (patch_embeddings or source == "tokens") and tokens_of is not None:
                tokens = np.asarray(tokens_of(cube), dtype=np.float32)  # [B 1+L D]
                emb = tokens[:, 0]
                if patch_embeddings:
                    patches.append(tokens[:, 1:].astype(np.float16))
                if source == "tokens":
                    t1 = time.perf_counter()
                    spatial.append(pooled_patch_tokens(tokens[:, 1:], spatial_grid).astype(np.float16))
                    spatial_seconds += time.perf_counter() - t1
            else:
                emb = np.asarray(encoder.embed_datacube(cube), dtype=np.float32)
            if source == "feature_map":
                t1 = time.perf_counter()
                fmap = encoder.feature_map(cube, spatial_grid, SPATIAL_RCF_STRIDE)  # type: ignore[attr-defined]
                fmap = np.asarray(fmap, dtype=np.float32).transpose(0, 2, 3, 1)  # [B g g D]
                spatial.append(fmap.astype(np.float16))
                spatial_seconds += time.perf_counter() - t1
        except EmbeddingError:
            raise
        except Exception as exc:
            raise EmbeddingError(f"embedding failed for chips {batch.chip_ids}: {exc}") from exc
        if source is not None:
            spatial_valid.append(cell_clear_fraction(batch.dn, batch.scl, spatial_grid).astype(np.float16))
            if not np.isfinite(spatial[-1]).all():
                raise EmbeddingError(f"{encoder.name} produced non-finite spatial features for chips "
                                     f"{batch.chip_ids}")
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
    emb_meta: dict[str, Any] = {
        "model": encoder.name,
        "checkpoint_digest": encoder.checkpoint_digest,
        "dim": encoder.dim,
        "bands": list(SPECTRAL_BAND_NAMES),
        "gsd": 10.0,
        "chip_size": CHIP_SIZE,
        "column": "embedding",
        "spatial": None,
    }
    if source is not None:
        emb_meta["spatial"] = {
            "file": SPATIAL_FILE, "valid_file": SPATIAL_VALID_FILE, "grid": spatial_grid,
            "cell_px": CHIP_SIZE // spatial_grid, "dim": encoder.dim, "dtype": "float16",
            "source": ("patch tokens average-pooled" if source == "tokens"
                       else f"rcf feature_map, stride {SPATIAL_RCF_STRIDE}"),
            "layout": "[N g g D], rows in table order, cells row-major from the chip's north-west",
            "valid": "clear-pixel fraction per cell from SCL (not 0, 1, 3, 8, 9, 10; data in every band)",
        }
    with write_partition(lake_root, "embeddings", region, date) as staging:
        if patch_embeddings:
            emb_meta["patches"] = PATCHES_FILE
            stacked = np.concatenate(patches) if patches else np.zeros((0, 0, encoder.dim), np.float16)
            np.save(staging / PATCHES_FILE, stacked)
        if source is not None:
            g = spatial_grid
            np.save(staging / SPATIAL_FILE, np.concatenate(spatial) if spatial
                    else np.zeros((0, g, g, encoder.dim), np.float16))
            np.save(staging / SPATIAL_VALID_FILE, np.concatenate(spatial_valid) if spatial_valid
                    else np.zeros((0, g, g), np.float16))
        write_geoparquet(table, staging / EMBEDDINGS_TABLE, extra_metadata={"emb": emb_meta})
    return EmbedStats(
        count=len(rows), dim=encoder.dim, model=encoder.name,
        checkpoint_digest=encoder.checkpoint_digest, device=device,
        seconds=time.perf_counter() - started, model_seconds=model_seconds,
        spatial_grid=spatial_grid if source is not None else 0, spatial_seconds=spatial_seconds,
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
            patch_embeddings=bool(extras.get("patch_embeddings", False)),
            spatial_grid=int(extras.get("spatial_grid", DEFAULT_SPATIAL_GRID)), log=pipes.log.info,
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
                "spatial_grid": stats.spatial_grid,
                "spatial_seconds": round(stats.spatial_seconds, 3),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
