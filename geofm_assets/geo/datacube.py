"""Chip datacubes: CF-style NetCDF-4 files of a chip's reflectance and SCL, with band names,
wavelengths, pixel-centre x/y coordinates, time, a grid mapping with the CRS and the chip's
GDAL ``GeoTransform``, and the chip's id.

``write_datacube`` writes one through the netCDF4 library. ``DatacubeWriter`` writes a
partition's chips about six times faster, the same bytes: all of a partition's chips share
every byte of their file but the pixels, the x/y coordinates and two attributes (``chip_id``
and ``GeoTransform``, written at a fixed width), so the first chip is written through netCDF4
as a template, and each chip is that template with its values copied over the template's.

- The four arrays are stored uncompressed and contiguous: plain bytes at fixed offsets, which
  HDF5 does not checksum.
- The two attributes lie in HDF5 object headers (version 2), which carry a checksum; the
  header holding each is located, and its checksum recomputed with HDF5's own function
  (``H5_checksum_metadata`` from the HDF5 library netCDF4 loaded) after the copy.
- Offsets are found by writing distinctive values into the template and finding them; an
  object header is accepted only where its stored checksum verifies. Then a second set of
  values is copied in and read back through netCDF4 before the template is used.

If anything about the layout is not as expected, the writer says why (``fallback_reason``) and
writes every chip through netCDF4.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import cast

import netCDF4
import numpy as np

from geofm_assets.bands import SPECTRAL_BAND_NAMES, SPECTRAL_BANDS
from geofm_assets.geo.regions import ChipGrid

# the arrays a chip's file varies in, with their on-disk dtypes (HDF5 stores them
# little-endian, as numpy holds them on every platform this runs on)
_DTYPES: dict[str, np.dtype] = {
    "reflectance": np.dtype("<u2"), "scl": np.dtype("u1"), "x": np.dtype("<f8"), "y": np.dtype("<f8"),
}
_ATTRIBUTES = ("chip_id", "GeoTransform")  # per-chip attributes (global; on spatial_ref)
# GeoTransform is written space-padded to this width (six float reprs of at most 24 characters
# and five spaces), so that every chip's is as long as the template's; GDAL and rioxarray split
# it on white space
GEOTRANSFORM_WIDTH = 6 * 24 + 5


class _LayoutError(Exception):
    """The template's bytes are not laid out as the writer expects."""


def chip_coordinates(grid: ChipGrid, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates (metres, the grid's CRS) of a chip."""
    t = grid.chip_transform(row, col)
    cs = np.arange(grid.chip_size) + 0.5
    return t.c + cs * t.a, t.f + cs * t.e


def geo_transform_text(grid: ChipGrid, row: int, col: int) -> str:
    """The chip's GDAL GeoTransform attribute, padded with spaces to ``GEOTRANSFORM_WIDTH``."""
    t = grid.chip_transform(row, col)
    return " ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e)).ljust(GEOTRANSFORM_WIDTH)


def _write_netcdf(
    path: Path,
    arrays: dict[str, np.ndarray],
    attributes: dict[str, str],
    *,
    grid: ChipGrid,
    date: dt.date,
    scene_ids: Sequence[str],
    crs_wkt: str,
    compress: bool,
) -> None:
    cs = grid.chip_size
    with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
        nc.createDimension("band", len(SPECTRAL_BANDS))
        nc.createDimension("y", cs)
        nc.createDimension("x", cs)
        nc.createDimension("time", 1)
        band = nc.createVariable("band", str, ("band",))
        band[:] = np.array(SPECTRAL_BAND_NAMES, dtype=object)
        wl = nc.createVariable("wavelength", "f4", ("band",))
        wl[:] = [b.wavelength for b in SPECTRAL_BANDS]
        wl.units = "micrometre"
        x = nc.createVariable("x", "f8", ("x",), contiguous=True)
        x[:] = arrays["x"]
        x.standard_name, x.units = "projection_x_coordinate", "m"
        y = nc.createVariable("y", "f8", ("y",), contiguous=True)
        y[:] = arrays["y"]
        y.standard_name, y.units = "projection_y_coordinate", "m"
        time = nc.createVariable("time", "i4", ("time",))
        time[:] = [(date - dt.date(1970, 1, 1)).days]
        time.units, time.calendar = "days since 1970-01-01", "standard"
        gm = nc.createVariable("spatial_ref", "i4")
        gm.crs_wkt = crs_wkt
        gm.spatial_ref = crs_wkt
        gm.epsg_code = f"EPSG:{grid.epsg}"
        gm.GeoTransform = attributes["GeoTransform"]
        # compressed variables are chunked; uncompressed ones are contiguous, which the
        # template writer relies on
        layout = {"zlib": True, "complevel": 1, "shuffle": True} if compress else {"contiguous": True}
        refl = nc.createVariable("reflectance", "u2", ("band", "y", "x"), fill_value=0, **layout)
        refl.scale_factor_reflectance = 0.0001
        refl.long_name = "surface reflectance x 10000, harmonized to processing baseline < 04.00"
        refl.grid_mapping = "spatial_ref"
        refl.set_auto_maskandscale(False)
        refl[:] = arrays["reflectance"]
        s = nc.createVariable("scl", "u1", ("y", "x"), **layout)
        s.long_name = "Sentinel-2 scene classification layer"
        s.grid_mapping = "spatial_ref"
        s[:] = arrays["scl"]
        nc.chip_id = attributes["chip_id"]
        nc.region = grid.region
        nc.date = date.isoformat()
        nc.epsg = grid.epsg
        nc.scene_ids = ",".join(scene_ids)
        nc.Conventions = "CF-1.8"


def _chip_values(
    grid: ChipGrid, row: int, col: int, spectral: np.ndarray, scl: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    cs = grid.chip_size
    if spectral.shape != (len(SPECTRAL_BANDS), cs, cs) or scl.shape != (cs, cs):
        raise ValueError(
            f"chip {grid.chip_id(row, col)}: expected reflectance [{len(SPECTRAL_BANDS)} {cs} {cs}] and "
            f"scl [{cs} {cs}], got {list(spectral.shape)} and {list(scl.shape)}"
        )
    x, y = chip_coordinates(grid, row, col)
    arrays = {"reflectance": spectral, "scl": scl, "x": x, "y": y}
    attributes = {"chip_id": grid.chip_id(row, col), "GeoTransform": geo_transform_text(grid, row, col)}
    return {k: np.ascontiguousarray(a, dtype=_DTYPES[k]) for k, a in arrays.items()}, attributes


def write_datacube(
    path: Path,
    spectral: np.ndarray,
    scl: np.ndarray,
    *,
    grid: ChipGrid,
    row: int,
    col: int,
    date: dt.date,
    scene_ids: Sequence[str],
    crs_wkt: str,
    compress: bool = False,
) -> None:
    """One chip's datacube through netCDF4, written under a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    arrays, attributes = _chip_values(grid, row, col, spectral, scl)
    try:
        _write_netcdf(tmp, arrays, attributes, grid=grid, date=date, scene_ids=scene_ids,
                      crs_wkt=crs_wkt, compress=compress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


Checksum = Callable[[bytes, int, int], int]


@cache
def _hdf5_checksum() -> Checksum | None:
    """HDF5's metadata checksum (Jenkins' lookup3, as the library writes it), from a libhdf5
    already loaded into this process (netCDF4's); None when none is found."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "/" in line}
        paths = sorted(p for p in mapped if Path(p).name.startswith("libhdf5") and "_hl" not in Path(p).name)
    except OSError:
        return None
    for path in paths:
        try:
            fn = ctypes.CDLL(path).H5_checksum_metadata
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32)
        return cast(Checksum, fn)
    return None


def _object_header(buf: bytes, at: int, n: int, checksum: Checksum) -> tuple[int, int]:
    """(start, checksum offset) of the object header chunk that holds bytes [at, at + n): the
    nearest chunk before ``at`` that spans them and whose stored checksum verifies. A chunk is
    a version-2 header's first ("OHDR", its length in its prefix) or a continuation ("OCHK",
    its length in the continuation message that points at it: file offset and length, 8 bytes
    each)."""
    candidates: list[tuple[int, int]] = []  # (start, checksum at)
    start = at
    while (start := buf.rfind(b"OHDR", 0, start)) >= 0:
        flags = buf[start + 5]
        pos = start + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)  # times, phase change
        width = 1 << (flags & 0x03)
        if buf[start + 4] == 2:
            candidates.append((start, pos + width + int.from_bytes(buf[pos : pos + width], "little")))
    start = at
    while (start := buf.rfind(b"OCHK", 0, start)) >= 0:
        pointer = start.to_bytes(8, "little")
        ref = -1
        while (ref := buf.find(pointer, ref + 1)) >= 0:
            length = int.from_bytes(buf[ref + 8 : ref + 16], "little")
            candidates.append((start, start + length - 4))
    for start, end in sorted(candidates, reverse=True):  # the nearest first
        if start < at and at + n <= end <= len(buf) - 4:
            stored = int.from_bytes(buf[end : end + 4], "little")
            if checksum(bytes(buf[start:end]), end - start, 0) == stored:
                return start, end
    raise _LayoutError("an attribute is not in an object header chunk whose checksum verifies")


class DatacubeWriter:
    """Writes the datacubes of one region x date: through a template once it has one (see the
    module's docstring), else through netCDF4 (``compress``, or a layout it does not expect).

    ``mode`` is ``"template"`` or ``"netcdf4"`` once the first chip is written, and
    ``fallback_reason`` says why a writer that was allowed a template does not use one.
    """

    def __init__(
        self, grid: ChipGrid, date: dt.date, scene_ids: Sequence[str], crs_wkt: str, *, compress: bool = False
    ) -> None:
        self.grid, self.date, self.scene_ids, self.crs_wkt = grid, date, tuple(scene_ids), crs_wkt
        self.compress = compress
        self._template: bytes | None = None
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (offset, bytes)
        self._headers: set[tuple[int, int]] = set()  # (start, checksum at) of the attributes' headers
        self._checksum: Checksum | None = None
        self.mode: str | None = "netcdf4" if compress else None
        self.fallback_reason: str | None = None

    def _netcdf(self, path: Path, arrays: dict[str, np.ndarray], attributes: dict[str, str]) -> None:
        _write_netcdf(path, arrays, attributes, grid=self.grid, date=self.date, scene_ids=self.scene_ids,
                      crs_wkt=self.crs_wkt, compress=self.compress)

    def _sentinels(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Values no real chip has (full-range noise, non-grid coordinates, random letters of
        the attributes' widths) for finding and checking the varying bytes."""
        rng = np.random.default_rng(seed)
        cs, n = self.grid.chip_size, len(SPECTRAL_BANDS)
        arrays: dict[str, np.ndarray] = {
            "reflectance": rng.integers(1, 65535, (n, cs, cs), dtype=np.uint16),
            "scl": rng.integers(0, 255, (cs, cs), dtype=np.uint8),
            "x": rng.random(cs) * 1e6,
            "y": rng.random(cs) * 1e7,
        }
        widths = {"chip_id": len(self.grid.chip_id(0, 0)), "GeoTransform": GEOTRANSFORM_WIDTH}
        letters = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
        attributes = {k: rng.choice(letters, w).tobytes().decode() for k, w in widths.items()}
        return arrays, attributes

    def _make_template(self, directory: Path) -> None:
        self.mode = "netcdf4"
        stem = f".datacube-template.{os.getpid()}.{id(self)}"
        first, second = directory / f"{stem}.nc", directory / f"{stem}.check.nc"
        try:
            checksum = _hdf5_checksum()
            if checksum is None:
                raise _LayoutError("HDF5's checksum function was not found in this process")
            arrays, attributes = self._sentinels(1)
            self._netcdf(first, arrays, attributes)
            template = first.read_bytes()
            slots: dict[str, tuple[int, int]] = {}
            marks = {k: a.tobytes() for k, a in arrays.items()}
            marks.update((k, v.encode()) for k, v in attributes.items())
            for name, raw in marks.items():
                at = template.find(raw)
                if at < 0 or template.find(raw, at + 1) >= 0:
                    raise _LayoutError(f"the {name} values are not stored once, in one piece")
                slots[name] = (at, len(raw))
            headers = {_object_header(template, *slots[name], checksum) for name in _ATTRIBUTES}
            self._template, self._slots, self._headers, self._checksum = template, slots, headers, checksum
            # a second set of values, copied in and read back through netCDF4
            arrays2, attributes2 = self._sentinels(2)
            second.write_bytes(self._patched(arrays2, attributes2))
            with netCDF4.Dataset(second) as nc:
                nc.set_auto_maskandscale(False)
                same = all(np.array_equal(np.asarray(nc[k][:]), a) for k, a in arrays2.items())
                same = same and nc.chip_id == attributes2["chip_id"]
                same = same and nc["spatial_ref"].GeoTransform == attributes2["GeoTransform"]
            if not same:
                raise _LayoutError("values copied into the template did not read back")
            self.mode = "template"
        except (_LayoutError, OSError, RuntimeError) as exc:  # netCDF4/HDF5 errors are RuntimeErrors
            self._template = None
            self.fallback_reason = str(exc)
        finally:
            first.unlink(missing_ok=True)
            second.unlink(missing_ok=True)

    def _patched(self, arrays: dict[str, np.ndarray], attributes: dict[str, str]) -> bytearray:
        assert self._template is not None and self._checksum is not None
        buf = bytearray(self._template)
        for name, a in arrays.items():
            at, n = self._slots[name]
            buf[at : at + n] = a.data.cast("B")
        for name, text in attributes.items():
            at, n = self._slots[name]
            buf[at : at + n] = text.encode()
        for start, end in self._headers:
            value = self._checksum(bytes(buf[start:end]), end - start, 0)
            buf[end : end + 4] = int(value).to_bytes(4, "little")
        return buf

    def write(self, path: Path, spectral: np.ndarray, scl: np.ndarray, row: int, col: int) -> None:
        """Write chip (row, col)'s datacube at ``path`` (a temporary name, then a rename)."""
        path = Path(path)
        arrays, attributes = _chip_values(self.grid, row, col, spectral, scl)
        if self.mode is None:
            self._make_template(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            if self._template is not None and all(
                len(v.encode()) == self._slots[k][1] for k, v in attributes.items()
            ):
                tmp.write_bytes(self._patched(arrays, attributes))
            else:  # no template, or an id of another length than the template's
                self._netcdf(tmp, arrays, attributes)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
