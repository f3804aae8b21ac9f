"""An uncompressed Cloud-Optimized GeoTIFF written in one pass, with its overviews.

GDAL makes a COG by copying a finished raster (``CreateCopy``): the region mosaic was written
to a scratch GeoTIFF, read back to build overviews, and read again to copy it in COG layout.
With uncompressed tiles every tile's size is known before any pixel is, so the whole file
layout (header, one IFD per resolution, tile offsets) is fixed up front and each tile goes
straight to its place as the mosaic's blocks arrive, and so do the overviews' pixels, decimated
from the same blocks (nearest: the first source pixel of each overview pixel's footprint, the
one GDAL's ``nearest`` overviews pick). Memory: the block being written.

The layout is the one GDAL's COG driver writes (``LAYOUT=IFDS_BEFORE_DATA``, row-major
tiles, smallest overview's data first, each tile with GDAL's 4-byte size leader and repeated
last 4 bytes as trailer), so GDAL reports ``LAYOUT=COG`` and readers that fetch the header
and then tiles by range work on it. ``cog_layout_problems`` checks those rules on any
GeoTIFF (GDAL's COGs included).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape

import numpy as np
from affine import Affine
from rasterio.crs import CRS

# TIFF field types
_SHORT, _LONG, _ASCII, _DOUBLE, _LONG8 = 3, 4, 2, 12, 16
_TYPE_CODES = {_SHORT: "H", _LONG: "I", _DOUBLE: "d", _LONG8: "Q"}
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}

# GDAL's COG "ghost" header: structural metadata that follows the TIFF header.
_GHOST_BODY = (
    "LAYOUT=IFDS_BEFORE_DATA\n"
    "BLOCK_ORDER=ROW_MAJOR\n"
    "BLOCK_LEADER=SIZE_AS_UINT4\n"
    "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\n"
    "KNOWN_INCOMPATIBLE_EDITION=NO\n "
)
_GHOST = f"GDAL_STRUCTURAL_METADATA_SIZE={len(_GHOST_BODY):06d} bytes\n{_GHOST_BODY}".encode()
_LEADER, _TRAILER = 4, 4

_SAMPLE_FORMATS = {"u": 1, "i": 2, "f": 3}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """``index`` as a slice when it is evenly spaced (a view instead of a copy)."""
    if len(index) == 1:
        return slice(int(index[0]), int(index[0]) + 1)
    step = int(index[1] - index[0])
    if step > 0 and (np.diff(index) == step).all():
        return slice(int(index[0]), int(index[-1]) + 1, step)
    return index


@dataclass(frozen=True)
class _Level:
    factor: int  # 1 for the full resolution
    width: int
    height: int
    tiles_across: int
    tiles_down: int
    data_offset: int = 0  # where this level's first tile (its leader) starts

    @property
    def n_tiles(self) -> int:
        return self.tiles_across * self.tiles_down


def _ifd_bytes(
    entries: list[tuple[int, int, Sequence[int | float] | bytes]], at: int, bigtiff: bool
) -> bytes:
    """One IFD (entries sorted by tag) followed by its out-of-line values, placed at ``at``;
    the next-IFD offset is left 0 and patched by the caller."""
    entries = sorted(entries, key=lambda e: e[0])
    n = len(entries)
    head = 8 + 20 * n + 8 if bigtiff else 2 + 12 * n + 4
    inline = 8 if bigtiff else 4
    values = bytearray()
    out = bytearray(struct.pack("<Q" if bigtiff else "<H", n))
    for tag, typ, value in entries:
        if typ == _ASCII:
            assert isinstance(value, bytes)
            raw, count = value, len(value)
        else:
            assert not isinstance(value, bytes)
            raw, count = struct.pack(f"<{len(value)}{_TYPE_CODES[typ]}", *value), len(value)
        out += struct.pack("<HHQ" if bigtiff else "<HHI", tag, typ, count)
        if len(raw) <= inline:
            out += raw.ljust(inline, b"\0")
        else:
            values += b"\0" * (-len(values) % 8)
            out += struct.pack("<Q" if bigtiff else "<I", at + head + len(values))
            values += raw
    out += b"\0" * (8 if bigtiff else 4)
    return bytes(out + values)


class CogWriter:
    """Writes a tiled, pixel-interleaved, uncompressed COG at ``path`` as blocks arrive.

    ``write(row_off, col_off, data)`` takes [H, W, count] blocks of one tile row of whole
    tiles, and writes their pixels, and their overview pixels, straight to their places in
    the file: memory is one block whatever the raster's size. Tiles never written stay 0.
    ``epsg``: a
    projected CRS. ``overviews``: decimation factors, increasing. ``bigtiff`` None: BigTIFF
    only when the file needs it. The caller writes to a temporary name and renames it.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        width: int,
        height: int,
        count: int,
        dtype: np.dtype | str,
        epsg: int,
        transform: Affine,
        tile: int = 256,
        nodata: float | None = None,
        descriptions: Sequence[str] = (),
        overviews: Sequence[int] = (),
        bigtiff: bool | None = None,
    ) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in _SAMPLE_FORMATS or self.dtype.itemsize not in (1, 2, 4, 8):
            raise ValueError(f"CogWriter writes integer or float samples, not {self.dtype}")
        if transform.b != 0 or transform.d != 0 or transform.a <= 0 or transform.e >= 0:
            raise ValueError(f"CogWriter needs a north-up transform, got {tuple(transform)[:6]}")
        if tile % 16 or tile <= 0:
            raise ValueError(f"tile size must be a positive multiple of 16, got {tile}")
        if list(overviews) != sorted(set(overviews)) or any(f < 2 for f in overviews):
            raise ValueError(f"overview factors must be increasing and >= 2, got {list(overviews)}")
        if not 0 < epsg < 2**16 or not CRS.from_epsg(epsg).is_projected:
            raise ValueError(
                f"CogWriter writes projected CRSs by EPSG code (a GeoTIFF short), not EPSG:{epsg}"
            )
        if descriptions and len(descriptions) != count:
            raise ValueError(f"{len(descriptions)} band descriptions for {count} bands")
        self.path = Path(path)
        self.width, self.height, self.count, self.tile = width, height, count, tile
        self.tile_bytes = tile * tile * count * self.dtype.itemsize
        self._dtype_le = self.dtype.newbyteorder("<")
        levels = []
        for f in (1, *overviews):
            w, h = _ceil_div(width, f), _ceil_div(height, f)
            levels.append(_Level(f, w, h, _ceil_div(w, tile), _ceil_div(h, tile)))
        data_bytes = sum(lv.n_tiles for lv in levels) * (self.tile_bytes + _LEADER + _TRAILER)
        if bigtiff is None:  # a generous bound on the classic IFDs' size decides
            classic = [self._entries(lv, i, epsg, transform, nodata, descriptions, False)
                       for i, lv in enumerate(levels)]
            ifd_bound = sum(len(_ifd_bytes(e, 0, False)) + 16 for e in classic)
            bigtiff = 8 + len(_GHOST) + ifd_bound + data_bytes >= 2**32
        self.bigtiff = bigtiff
        entries = [self._entries(lv, i, epsg, transform, nodata, descriptions, bigtiff)
                   for i, lv in enumerate(levels)]
        # IFDs after the header and ghost, each with its values; offsets filled in two passes
        # (the IFD sizes do not depend on the offsets' values).
        start = (16 if bigtiff else 8) + len(_GHOST)
        sizes = [len(_ifd_bytes(e, 0, bigtiff)) for e in entries]
        ifd_at = [start + sum(-(-s // 8) * 8 for s in sizes[:i]) for i in range(len(sizes))]
        data_start = ifd_at[-1] + -(-sizes[-1] // 8) * 8
        # data: smallest overview first, the full resolution last
        at = data_start
        placed = list(levels)
        for i in reversed(range(len(levels))):
            placed[i] = replace(levels[i], data_offset=at)
            at += levels[i].n_tiles * (self.tile_bytes + _LEADER + _TRAILER)
        self.levels = placed
        self.size = at
        step = self.tile_bytes + _LEADER + _TRAILER
        header = bytearray(
            struct.pack("<2sHHHQ", b"II", 43, 8, 0, ifd_at[0]) if bigtiff
            else struct.pack("<2sHI", b"II", 42, ifd_at[0])
        ) + _GHOST
        for i, lv in enumerate(placed):
            offsets = [lv.data_offset + k * step + _LEADER for k in range(lv.n_tiles)]
            with_offsets = [
                (tag, typ, offsets if tag == 324 else [self.tile_bytes] * lv.n_tiles if tag == 325 else value)
                for tag, typ, value in entries[i]
            ]
            ifd = bytearray(_ifd_bytes(with_offsets, ifd_at[i], bigtiff))
            if i + 1 < len(placed):  # next-IFD offset, after the entries
                n = len(with_offsets)
                pos = 8 + 20 * n if bigtiff else 2 + 12 * n
                ifd[pos : pos + (8 if bigtiff else 4)] = struct.pack("<Q" if bigtiff else "<I", ifd_at[i + 1])
            header += b"\0" * (ifd_at[i] - len(header)) + ifd
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.size)  # unwritten pixels (edge padding) read as 0
            os.pwrite(self._fd, bytes(header), 0)
            leader = struct.pack("<I", self.tile_bytes)
            for lv in placed:
                for k in range(lv.n_tiles):
                    os.pwrite(self._fd, leader, lv.data_offset + k * step)
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False
        # the source pixel of each overview pixel: the first of its footprint (GDAL's nearest)
        self._src_rows = [np.minimum(lv.factor * np.arange(lv.height), height - 1) for lv in placed]
        self._src_cols = [np.minimum(lv.factor * np.arange(lv.width), width - 1) for lv in placed]

    def _entries(
        self,
        lv: _Level,
        index: int,
        epsg: int,
        transform: Affine,
        nodata: float | None,
        descriptions: Sequence[str],
        bigtiff: bool,
    ) -> list[tuple[int, int, Sequence[int | float] | bytes]]:
        n = self.count
        offset_type = _LONG8 if bigtiff else _LONG
        e: list[tuple[int, int, Sequence[int | float] | bytes]] = [
            (256, _LONG, [lv.width]),
            (257, _LONG, [lv.height]),
            (258, _SHORT, [self.dtype.itemsize * 8] * n),  # BitsPerSample
            (259, _SHORT, [1]),  # Compression: none
            (262, _SHORT, [1]),  # Photometric: min-is-black
            (277, _SHORT, [n]),  # SamplesPerPixel
            (284, _SHORT, [1]),  # PlanarConfiguration: pixel-interleaved
            (322, _SHORT, [self.tile]),
            (323, _SHORT, [self.tile]),
            (324, offset_type, [0] * lv.n_tiles),  # TileOffsets, set once placed
            (325, offset_type, [0] * lv.n_tiles),  # TileByteCounts
            (339, _SHORT, [_SAMPLE_FORMATS[self.dtype.kind]] * n),
        ]
        if n > 1:
            e.append((338, _SHORT, [0] * (n - 1)))  # ExtraSamples: unspecified
        if index > 0:
            e.append((254, _LONG, [1]))  # NewSubfileType: reduced resolution
        else:
            e += [
                (33550, _DOUBLE, [transform.a, -transform.e, 0.0]),  # ModelPixelScale
                (33922, _DOUBLE, [0.0, 0.0, 0.0, transform.c, transform.f, 0.0]),  # ModelTiepoint
                # GeoKeyDirectory: projected model, pixel is area, projected CRS = epsg
                (34735, _SHORT, [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]),
            ]
            if descriptions:
                # escaped twice, as GDAL writes it (its reader unescapes the text once more)
                items = "".join(
                    f'  <Item name="DESCRIPTION" sample="{i}" role="description">{escape(escape(d))}</Item>\n'
                    for i, d in enumerate(descriptions)
                )
                e.append((42112, _ASCII, f"<GDALMetadata>\n{items}</GDALMetadata>\n\0".encode()))
        if nodata is not None:
            text = str(int(nodata)) if self.dtype.kind in "ui" else repr(float(nodata))
            e.append((42113, _ASCII, f"{text}\0".encode()))
        return e

    def _write_rows(self, level: int, tile_row: int, tile_col: int, row0: int, col0: int,
                    part: np.ndarray) -> None:
        """Write ``part`` [n, m, count] at rows ``row0``.. and columns ``col0``.. of a tile.
        A tile is [tile rows][tile columns][count] samples, so whole-width rows are one
        contiguous range; the last 4 bytes of the tile are repeated after it (the trailer)."""
        t = self.tile
        lv = self.levels[level]
        step = self.tile_bytes + _LEADER + _TRAILER
        tile_at = lv.data_offset + (tile_row * lv.tiles_across + tile_col) * step
        row_bytes = t * self.count * self.dtype.itemsize
        at = tile_at + _LEADER + row0 * row_bytes
        n, m, c = part.shape
        last_col = tile_col == lv.tiles_across - 1 and col0 + m == lv.width - tile_col * t
        if col0 == 0 and (m == t or last_col):  # whole rows (an edge tile's padding stays 0)
            if m == t:
                rows = np.ascontiguousarray(part, self._dtype_le)
            else:
                rows = np.zeros((n, t, c), self._dtype_le)
                rows[:, :m] = part
            raw = memoryview(rows.data).cast("B")
            buffers = [raw, raw[-_TRAILER:]] if row0 + n == t else [raw]
            written = os.pwritev(self._fd, buffers, at)
            expected = sum(len(b) for b in buffers)
        else:  # part of each row: one write a row
            rows = np.ascontiguousarray(part, self._dtype_le)
            item = c * self.dtype.itemsize
            written = expected = 0
            for r in range(n):
                raw = memoryview(rows[r].data).cast("B")
                written += os.pwrite(self._fd, raw, at + r * row_bytes + col0 * item)
                expected += len(raw)
            if row0 + n == t and col0 + m == t:
                written += os.pwrite(self._fd, raw[-_TRAILER:], tile_at + _LEADER + self.tile_bytes)
                expected += _TRAILER
        if written != expected:
            raise OSError(f"short write to {self.path}: {written} of {expected} bytes")

    def write(self, row_off: int, col_off: int, data: np.ndarray) -> None:
        """Write the pixel-interleaved block [H, W, count] whose upper-left pixel is
        (row_off, col_off), at full resolution and, decimated, into every overview. Blocks may
        come in any order."""
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        t = self.tile
        h, w, c = data.shape
        if c != self.count or row_off % t or col_off % t:
            raise ValueError(
                f"block of {c} bands at ({row_off}, {col_off}): expected {self.count} bands "
                f"at tile-aligned offsets (tile {t})"
            )
        if h != min(t, self.height - row_off) or w <= 0 or col_off + w > self.width or (
            w % t and col_off + w != self.width
        ):
            raise ValueError(
                f"block {h}x{w} at ({row_off}, {col_off}) is not one tile row of whole tiles of "
                f"the {self.height}x{self.width} raster"
            )
        for level, (src_rows, src_cols) in enumerate(zip(self._src_rows, self._src_cols, strict=True)):
            # the level's pixels whose source pixel lies in the block
            j0, j1 = (int(v) for v in np.searchsorted(src_rows, [row_off, row_off + h]))
            i0, i1 = (int(v) for v in np.searchsorted(src_cols, [col_off, col_off + w]))
            if j0 == j1 or i0 == i1:
                continue
            picked = data[_as_slice(src_rows[j0:j1] - row_off), _as_slice(src_cols[i0:i1] - col_off)]
            for tr in range(j0 // t, (j1 - 1) // t + 1):
                a, b = max(j0, tr * t), min(j1, (tr + 1) * t)
                for tc in range(i0 // t, (i1 - 1) // t + 1):
                    x, y = max(i0, tc * t), min(i1, (tc + 1) * t)
                    part = picked[a - j0 : b - j0, x - i0 : y - i0]
                    self._write_rows(level, tr, tc, a - tr * t, x - tc * t, part)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> CogWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _read_ifds(path: Path) -> tuple[bool, bytes, list[tuple[int, int, dict[int, tuple[int, ...] | bytes]]]]:
    """(bigtiff, ghost header, [(IFD offset, IFD end incl. values, {tag: values})])."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] != b"II" or struct.unpack_from("<H", head, 2)[0] not in (42, 43):
            raise ValueError(f"{path} is not a little-endian TIFF")
        big = struct.unpack_from("<H", head, 2)[0] == 43
        f.seek(16 if big else 8)
        ghost = f.read(len(_GHOST) + 64)
        offset = struct.unpack_from("<Q" if big else "<I", head, 8 if big else 4)[0]
        ifds: list[tuple[int, int, dict[int, tuple[int, ...] | bytes]]] = []
        while offset and len(ifds) < 64:
            f.seek(offset)
            n = struct.unpack("<Q" if big else "<H", f.read(8 if big else 2))[0]
            raw = f.read(n * (20 if big else 12) + (8 if big else 4))
            end = offset + (8 if big else 2) + len(raw)
            tags: dict[int, tuple[int, ...] | bytes] = {}
            for k in range(n):
                p = k * (20 if big else 12)
                tag, typ, count = struct.unpack_from("<HHQ" if big else "<HHI", raw, p)
                size = _TYPE_SIZES.get(typ, 1) * count
                vpos = p + (12 if big else 8)
                if size <= (8 if big else 4):
                    value = raw[vpos : vpos + size]
                else:
                    at = struct.unpack_from("<Q" if big else "<I", raw, vpos)[0]
                    here = f.tell()
                    f.seek(at)
                    value = f.read(size)
                    f.seek(here)
                    end = max(end, at + size)
                if typ in _TYPE_CODES and typ != _DOUBLE:
                    tags[tag] = struct.unpack(f"<{count}{_TYPE_CODES[typ]}", value)
                else:
                    tags[tag] = value
            ifds.append((offset, end, tags))
            offset = struct.unpack_from("<Q" if big else "<I", raw, len(raw) - (8 if big else 4))[0]
    return big, ghost, ifds


def cog_layout_problems(path: Path | str) -> list[str]:
    """Where ``path`` breaks the COG layout rules (empty: it is a COG): GDAL's layout header,
    tiled images, every IFD before any tile data, overviews after the full resolution and
    smaller each time, the smallest overview's data first, each image's tiles in row-major
    order."""
    path = Path(path)
    try:
        _, ghost, ifds = _read_ifds(path)
    except (ValueError, struct.error) as exc:
        return [f"cannot read the TIFF structure of {path.name}: {exc}"]
    problems = []
    if not ghost.startswith(b"GDAL_STRUCTURAL_METADATA_SIZE=") or b"LAYOUT=IFDS_BEFORE_DATA" not in ghost:
        problems.append("no GDAL COG layout header (LAYOUT=IFDS_BEFORE_DATA)")
    if not ifds:
        return [*problems, "no image"]
    images: list[dict[int, tuple[int, ...]]] = []
    for _, _, tags in ifds:
        ints = {k: v for k, v in tags.items() if isinstance(v, tuple)}
        if not ints.get(254, (0,))[0] & 4:  # transparency masks aside
            images.append(ints)
    if any(324 not in tags or 325 not in tags for tags in images):
        return [*problems, "not tiled"]
    written = [[o for o, n in zip(tags[324], tags[325], strict=True) if n] for tags in images]
    first_data = min((min(o) for o in written if o), default=None)
    if first_data is not None and max(end for _, end, _ in ifds) > first_data:
        problems.append("an IFD or its values come after tile data")
    widths = [tags[256][0] for tags in images]
    if widths != sorted(widths, reverse=True) or len(set(widths)) != len(widths):
        problems.append(f"image widths {widths} do not decrease from the full resolution")
    starts = []
    for i, offsets in enumerate(written):
        if offsets != sorted(offsets):
            problems.append(f"image {i}: tiles are not in row-major order")
        starts.append(min(offsets) if offsets else 0)
    if starts != sorted(starts, reverse=True):
        problems.append("overview data does not come before the full resolution, smallest first")
    return problems
