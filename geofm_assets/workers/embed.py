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

import contextlib
import datetime as dt
import math
import os
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
import torch
from torch.utils.data import DataLoader, Dataset

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
from geofm_assets.models.datacube import Datacube, band_stats, encode_latlon, encode_time, make_datacube

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
    readers: int = 0  # datacube reader processes (0: one reader thread)
    first_batch_seconds: float = 0.0  # from the start until the first batch was read (start-up)
    write_seconds: float = 0.0  # the outputs' final writes (table, closing spatial.npy)

    @property
    def chips_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    chip_ids: list[str]
    dn: torch.Tensor  # [B C H W] int16: the uint16 DN reinterpreted (pinned when bound for CUDA)
    valid: np.ndarray | None  # [B g g] float32 clear fraction per cell, None without spatial
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


class _ChipReader(Dataset[tuple[torch.Tensor, "np.ndarray | None"]]):
    """Map-style dataset over a partition's chips: item i is
    chip i's DN ``[C H W]`` as int16 (uint16 bits, so that it travels as a tensor) and, with a
    spatial grid, its cells' clear fraction ``[g g]``. Run in reader processes by the worker."""

    def __init__(self, lake_root: Path, rows: list[dict[str, Any]], grid: int) -> None:
        self.paths = [lake_root / r["datacube_path"] for r in rows]
        self.chip_ids = [str(r["chip_id"]) for r in rows]
        self.grid = grid

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray | None]:
        try:
            dn, scl = read_datacube_and_scl(self.paths[i])
        except (OSError, KeyError, EmbeddingError) as exc:
            raise EmbeddingError(f"cannot read the datacube of chip {self.chip_ids[i]}: {exc}") from exc
        valid = cell_clear_fraction(dn[None], scl[None], self.grid)[0] if self.grid else None
        return torch.from_numpy(dn.view(np.int16)), valid


def _collate(items: list[tuple[torch.Tensor, np.ndarray | None]]) -> tuple[torch.Tensor, np.ndarray | None]:
    dn = torch.stack([item[0] for item in items])
    valid = None if items[0][1] is None else np.stack([item[1] for item in items])  # type: ignore[misc]
    return dn, valid


def _batches(
    lake_root: Path, rows: list[dict[str, Any]], batch_size: int, grid: int, readers: int, pin: bool
) -> Iterator[_Batch]:
    """The partition's chips in batches, in table order, read ahead of the consumer: by one
    reader thread (``readers`` 0), or by ``readers`` processes (a ``DataLoader``; netCDF/HDF5
    is not thread-safe, so parallel reads need processes) into pinned memory when ``pin``."""
    dataset = _ChipReader(lake_root, rows, grid)
    loaded: Iterator[tuple[torch.Tensor, np.ndarray | None]]
    if readers > 0:
        loaded = iter(DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=readers, collate_fn=_collate,
            pin_memory=pin, prefetch_factor=4,
        ))
    else:
        def chunks() -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
            for start in range(0, len(rows), batch_size):
                dn, valid = _collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))])
                yield (dn.pin_memory() if pin else dn), valid

        loaded = _prefetched(chunks())
    for start, (dn, valid) in zip(range(0, len(rows), batch_size), loaded, strict=True):
        part = rows[start : start + batch_size]
        yield _Batch([r["chip_id"] for r in part], dn, valid, [r["datetime"] for r in part],
                     [r["centroid_lat"] for r in part], [r["centroid_lon"] for r in part])


def _prefetched(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a reader thread, ``depth`` items ahead of the consumer."""
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
            yield item
    finally:
        stop.set()


class _GpuInputs:
    """Uploads a batch's int16 DN on a side CUDA stream and z-scores it there, so that batch
    i + 1 crosses the bus while batch i computes; ``ready`` makes the compute stream wait."""

    def __init__(self, device: torch.device) -> None:
        mean, std, _ = band_stats()
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.mean = torch.as_tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, device=device).view(1, -1, 1, 1)

    def start(self, dn: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with torch.cuda.stream(self.stream):
            raw = dn.to(self.device, non_blocking=True)
            pixels = ((raw.to(torch.int32) & 0xFFFF).to(torch.float32) - self.mean) / self.std
            event = torch.cuda.Event()
            event.record(self.stream)
        return pixels, event

    def ready(self, pixels: torch.Tensor, event: Any) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        pixels.record_stream(current)
        return pixels


class _NpyRows:
    """An ``.npy`` file of a known shape written block by block, in row order, by a writer
    thread (sequential ``write`` calls, so the main loop neither copies into nor faults on a
    memory map). ``close`` checks that every row came; errors surface in ``add`` or ``close``."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: type) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0
        self.error: BaseException | None = None
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._drain, name=f"write-{path.name}", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while (block := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.file.write(np.ascontiguousarray(block, dtype=self.dtype).data)
                except BaseException as exc:  # reported to the main thread by add/close
                    self.error = exc

    def add(self, block: np.ndarray) -> None:
        if self.error is not None:
            raise EmbeddingError(f"cannot write {self.path}: {self.error}") from self.error
        if tuple(block.shape[1:]) != self.shape[1:]:
            raise EmbeddingError(f"{self.path.name}: a block of shape {block.shape} in {self.shape}")
        self.rows += len(block)
        self.queue.put(block)

    def abort(self) -> None:
        """Stop the writer thread and close the file (a no-op once closed)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.file.close()

    def close(self) -> None:
        self.abort()
        if self.error is not None:
            raise EmbeddingError(f"cannot write {self.path}: {self.error}") from self.error
        if self.rows != self.shape[0]:
            raise EmbeddingError(f"{self.path.name} got {self.rows} rows of {self.shape[0]}")


@dataclass
class _InFlight:
    """A batch whose forward pass was launched; its outputs land in (pinned) host tensors."""

    batch: _Batch
    emb: torch.Tensor  # [B' D] float32 on the host (B' >= B when padded)
    cells: torch.Tensor | None  # [B' g g D] float16 on the host, None without spatial features
    finite: torch.Tensor  # 0-d bool on the host: every output value finite
    event: Any  # CUDA event recorded after the copies, None on the CPU


def _launch(forward_pooled: Callable[..., Any], batch: _Batch, cube: Datacube, grid: int,
            d2h: Any) -> _InFlight:
    """Launch ``forward_pooled`` without waiting for the device. On CUDA the outputs are copied
    into pinned host memory on the ``d2h`` stream, after the compute, and an event marks their
    arrival; the compute stream goes on with the next batch meanwhile."""
    emb, cells, finite = forward_pooled(cube, grid)
    if d2h is None:
        return _InFlight(batch, emb.cpu(), None if cells is None else cells.cpu(), finite.cpu(), None)
    d2h.wait_stream(torch.cuda.current_stream(emb.device))
    with torch.cuda.stream(d2h):
        outs: list[torch.Tensor | None] = []
        for t in (emb, cells, finite):
            if t is None:
                outs.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(d2h)
            outs.append(host)
        event = torch.cuda.Event()
        event.record(d2h)
    host_emb, host_cells, host_finite = outs
    assert host_emb is not None and host_finite is not None
    return _InFlight(batch, host_emb, host_cells, host_finite, event)


def default_readers(device: torch.device) -> int:
    """Reader processes when not configured: on CUDA enough to keep a GPU fed (up to 8, one
    core left for the main process); on the CPU none (one reader thread), the model is slower
    than reading there."""
    return max(1, min(8, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def _padded(cube: Datacube, size: int) -> Datacube:
    """``cube`` with its batch padded to ``size`` by repeating the last chip (for a compiled
    encoder, whose shapes are static); callers keep the first B rows of the output."""
    b = len(cube["time"])
    if b == size:
        return cube
    out = dict(cube)
    for key in ("pixels", "time", "latlon"):
        value = cube[key]
        tail = value[-1:]
        reps = size - b
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([value, tail.expand(reps, *value.shape[1:])])
        else:
            out[key] = np.concatenate([value, np.repeat(tail, reps, axis=0)])
    return out


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
    readers: int = -1,
    log: Callable[[str], None] = print,
) -> EmbedStats:
    """Embed every kept chip of a region x date partition and write
    ``embeddings/region=R/date=D/embeddings.parquet`` (GeoParquet, ``emb`` metadata).

    ``patch_embeddings``: also write ``patches.npy`` ([N L D] float16, rows in table order,
    L patch tokens row-major) for encoders with patch tokens (Clay), from the same forward pass.
    ``spatial_grid`` g > 0: also write ``spatial.npy`` ([N g g D] float16) and
    ``spatial_valid.npy`` ([N g g] float16 clear fraction) where the encoder has spatial features
    (module doc); 0: none. ``readers``: datacube reader processes (0: one reader thread; -1:
    ``default_readers``). On CUDA, an encoder that ``accepts_device_pixels`` gets its chips
    uploaded and normalized on a side stream, one batch ahead of the compute.
    """
    lake_root = Path(lake_root)
    torch_device = resolve_device(device)
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
    n, g = len(rows), spatial_grid
    readers = default_readers(torch_device) if readers < 0 else readers
    on_gpu = torch_device.type == "cuda" and encoder.accepts_device_pixels
    gpu = _GpuInputs(torch_device) if on_gpu else None
    forward_pooled = getattr(encoder, "forward_pooled", None)
    # Clay without patches.npy: outputs stay on the device until copied back asynchronously
    pipelined = forward_pooled is not None and not patch_embeddings and source in ("tokens", None)
    d2h = torch.cuda.Stream(torch_device) if pipelined and torch_device.type == "cuda" else None
    compiled = bool(getattr(encoder, "compiled", False))
    started = time.perf_counter()
    model_seconds = 0.0
    spatial_seconds = 0.0
    vectors: list[np.ndarray] = []
    patches: list[np.ndarray] = []

    def prepare(batch: _Batch) -> tuple[_Batch, Datacube, Any]:
        """The batch's datacube; on the GPU path its pixels are still on their way."""
        if gpu is not None:
            pixels, event = gpu.start(batch.dn)
            _, _, waves = band_stats()
            cube = {"pixels": pixels, "time": encode_time(batch.moments),
                    "latlon": encode_latlon(batch.lats, batch.lons), "gsd": 10.0, "waves": waves}
            return batch, cube, event
        dn = batch.dn.numpy().view(np.uint16)
        return batch, make_datacube(dn, batch.moments, batch.lats, batch.lons), None

    with write_partition(lake_root, "embeddings", region, date) as staging, contextlib.ExitStack() as files:
        spatial_out = spatial_valid_out = None
        if source is not None:
            spatial_out = _NpyRows(staging / SPATIAL_FILE, (n, g, g, encoder.dim), np.float16)
            files.callback(spatial_out.abort)
            spatial_valid_out = _NpyRows(staging / SPATIAL_VALID_FILE, (n, g, g), np.float16)
            files.callback(spatial_valid_out.abort)
        batches = _batches(lake_root, rows, batch_size, g if source is not None else 0, readers,
                           pin=torch_device.type == "cuda")
        done = 0
        first = next(batches, None)
        first_batch_s = time.perf_counter() - started
        pending = prepare(first) if first is not None else None
        in_flight: _InFlight | None = None

        def record(batch: _Batch, emb: np.ndarray, cells: np.ndarray | None, cells_checked: bool) -> None:
            """Check one batch's outputs and hand them to the writers (``cells_checked``: the
            encoder already checked the cells for non-finite values)."""
            nonlocal done
            b = len(batch.chip_ids)
            emb = np.asarray(emb, dtype=np.float32)
            if emb.shape != (b, encoder.dim):
                raise EmbeddingError(
                    f"{encoder.name} returned shape {emb.shape} for chips {batch.chip_ids}, "
                    f"expected ({b}, {encoder.dim})"
                )
            bad = [cid for cid, v in zip(batch.chip_ids, emb, strict=True) if not np.isfinite(v).all()]
            if bad:
                raise EmbeddingError(f"{encoder.name} produced non-finite vectors for chips {bad}")
            if spatial_out is not None and spatial_valid_out is not None:
                if cells is None or not (cells_checked or np.isfinite(cells).all()):
                    raise EmbeddingError(f"{encoder.name} produced non-finite spatial features for chips "
                                         f"{batch.chip_ids}")
                spatial_out.add(cells)
                spatial_valid_out.add(np.asarray(batch.valid))
            vectors.append(emb)
            done += b
            log(f"embedded {done}/{n} chips")

        def finish(flight: _InFlight) -> None:
            """Wait for a launched batch's outputs to reach the host, then record them."""
            if flight.event is not None:
                flight.event.synchronize()
            if not bool(flight.finite):
                raise EmbeddingError(f"{encoder.name} produced non-finite outputs for chips "
                                     f"{flight.batch.chip_ids}")
            b = len(flight.batch.chip_ids)
            cells = None if flight.cells is None else flight.cells.numpy()[:b]
            record(flight.batch, flight.emb.numpy()[:b], cells, True)

        while pending is not None:
            batch, cube, event = pending
            following = next(batches, None)
            pending = prepare(following) if following is not None else None  # its upload overlaps
            b = len(batch.chip_ids)
            t0 = time.perf_counter()
            cells = None
            try:
                if gpu is not None:
                    cube["pixels"] = gpu.ready(cube["pixels"], event)
                run_cube = _padded(cube, batch_size) if compiled else cube
                if pipelined and forward_pooled is not None:
                    # launch this batch, then collect the previous one: the device always has
                    # a forward queued while the host checks and writes
                    launched = _launch(forward_pooled, batch, run_cube, g if source else 0, d2h)
                    if in_flight is not None:
                        finish(in_flight)
                    in_flight = launched
                    model_seconds += time.perf_counter() - t0
                    continue
                if patch_embeddings and tokens_of is not None:
                    tokens = np.asarray(tokens_of(run_cube), dtype=np.float32)[:b]  # [B 1+L D]
                    emb = tokens[:, 0]
                    patches.append(tokens[:, 1:].astype(np.float16))
                    if source == "tokens":
                        cells = pooled_patch_tokens(tokens[:, 1:], g).astype(np.float16)
                else:
                    emb = np.asarray(encoder.embed_datacube(run_cube), dtype=np.float32)[:b]
                if source == "feature_map":
                    t1 = time.perf_counter()
                    fmap = encoder.feature_map(cube, g, SPATIAL_RCF_STRIDE)  # type: ignore[attr-defined]
                    cells = np.asarray(fmap, dtype=np.float32).transpose(0, 2, 3, 1).astype(np.float16)
                    spatial_seconds += time.perf_counter() - t1
            except EmbeddingError:
                raise
            except Exception as exc:
                raise EmbeddingError(f"embedding failed for chips {batch.chip_ids}: {exc}") from exc
            model_seconds += time.perf_counter() - t0
            record(batch, emb, cells, False)
        if in_flight is not None:
            t0 = time.perf_counter()
            finish(in_flight)
            model_seconds += time.perf_counter() - t0
        t_write = time.perf_counter()
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
                "file": SPATIAL_FILE, "valid_file": SPATIAL_VALID_FILE, "grid": g,
                "cell_px": CHIP_SIZE // g, "dim": encoder.dim, "dtype": "float16",
                "source": ("patch tokens average-pooled" if source == "tokens"
                           else f"rcf feature_map, stride {SPATIAL_RCF_STRIDE}"),
                "layout": "[N g g D], rows in table order, cells row-major from the chip's north-west",
                "valid": "clear-pixel fraction per cell from SCL (not 0, 1, 3, 8, 9, 10; data in every band)",
            }
            if spatial_out is not None and spatial_valid_out is not None:
                spatial_out.close()
                spatial_valid_out.close()
        if patch_embeddings:
            emb_meta["patches"] = PATCHES_FILE
            stacked = np.concatenate(patches) if patches else np.zeros((0, 0, encoder.dim), np.float16)
            np.save(staging / PATCHES_FILE, stacked)
        write_geoparquet(table, staging / EMBEDDINGS_TABLE, extra_metadata={"emb": emb_meta})
        write_s = time.perf_counter() - t_write
    return EmbedStats(
        count=n, dim=encoder.dim, model=encoder.name,
        checkpoint_digest=encoder.checkpoint_digest, device=str(torch_device),
        seconds=time.perf_counter() - started, model_seconds=model_seconds,
        spatial_grid=g if source is not None else 0, spatial_seconds=spatial_seconds, readers=readers,
        first_batch_seconds=first_batch_s, write_seconds=write_s,
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
    """Embed the partitions in the Pipes extras one after the other with one encoder (loaded
    once), each written atomically on its own; report each one (a ``partition`` custom message:
    its metadata, or its error) and go on past a failed one. The asset records the partitions
    and fails the run for the failed ones."""
    from dagster_pipes import open_dagster_pipes

    from geofm_assets.models import build_encoder

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        device = str(resolve_device(str(extras.get("device", "auto"))))
        checkpoint = extras.get("checkpoint")
        encoder = build_encoder(
            str(extras["model"]), checkpoint=Path(checkpoint) if checkpoint else None, device=device,
            compile=bool(extras.get("compile", False)),
        )
        partitions = list(extras["partitions"])
        pipes.log.info(f"embedding {len(partitions)} partition(s) with {encoder.name} on {device}")
        for part in partitions:
            region, date = str(part["region"]), str(part["date"])
            try:
                stats = embed_lake_partition(
                    str(extras["lake_root"]), region, date, encoder,
                    batch_size=int(extras.get("batch_size", 16)), device=device,
                    readers=int(extras.get("readers", -1)),
                    patch_embeddings=bool(extras.get("patch_embeddings", False)),
                    spatial_grid=int(extras.get("spatial_grid", DEFAULT_SPATIAL_GRID)),
                    log=pipes.log.info,
                )
            except Exception as exc:  # reported for this partition; the others go on
                pipes.log.error(f"{date}|{region} failed: {exc}")
                pipes.report_custom_message(
                    {"kind": "partition", "region": region, "date": date, "ok": False,
                     "error": f"{type(exc).__name__}: {exc}"})
                continue
            pipes.log.info(f"{date}|{region}: {stats.count} chips at {stats.chips_per_s:.1f} chips/s")
            pipes.report_custom_message({
                "kind": "partition", "region": region, "date": date, "ok": True,
                "metadata": {
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
                    "readers": stats.readers,
                    "first_batch_seconds": round(stats.first_batch_seconds, 3),
                    "write_seconds": round(stats.write_seconds, 3),
                    "worker_partitions": len(partitions),  # embedded by this worker, model loaded once
                },
            })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
