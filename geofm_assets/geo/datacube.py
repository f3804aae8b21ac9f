"""Chip datacubes: CF-style NetCDF-4 files of a chip's reflectance and SCL, with band names,
wavelengths, pixel-centre x/y coordinates, time and a grid mapping with the CRS.

``write_datacube`` writes one through the netCDF4 library. ``DatacubeWriter`` writes a
partition's chips far faster: all of them share every byte but the pixels and the x/y
coordinates (band names, wavelengths, time, CRS and attributes are the partition's), so the
first chip's file is written through netCDF4 as a template and each chip is that template with
its four arrays copied over the template's. Those four variables are stored uncompressed and
contiguous, so their values are plain bytes at fixed offsets that HDF5 does not checksum (its
object headers, which hold the attributes, are checksummed and never touched). The offsets are
found by writing distinctive values into the template and finding them, and a second set of
values is copied in and read back through netCDF4 before the template is used; if anything
about the layout is not as expected, the writer stays on the netCDF4 path. A per-chip
attribute would be in a checksummed header, so the files carry none: a chip's identity is its
file name, and its georeferencing the x/y coordinates (GDAL and rioxarray derive the
transform from them).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

import netCDF4
import numpy as np

from geofm_assets.bands import SPECTRAL_BAND_NAMES, SPECTRAL_BANDS
from geofm_assets.geo.regions import ChipGrid

# the arrays a chip's file varies in, with their on-disk dtypes (HDF5 stores them
# little-endian, as numpy holds them on every platform this runs on)
_VARYING = ("reflectance", "scl", "x", "y")
_DTYPES: dict[str, np.dtype] = {
    "reflectance": np.dtype("<u2"), "scl": np.dtype("u1"), "x": np.dtype("<f8"), "y": np.dtype("<f8"),
}


def chip_coordinates(grid: ChipGrid, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates (metres, the grid's CRS) of a chip."""
    t = grid.chip_transform(row, col)
    cs = np.arange(grid.chip_size) + 0.5
    return t.c + cs * t.a, t.f + cs * t.e


def _write_netcdf(
    path: Path,
    arrays: dict[str, np.ndarray],
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
        nc.region = grid.region
        nc.date = date.isoformat()
        nc.epsg = grid.epsg
        nc.scene_ids = ",".join(scene_ids)
        nc.Conventions = "CF-1.8"


def _chip_arrays(
    grid: ChipGrid, row: int, col: int, spectral: np.ndarray, scl: np.ndarray
) -> dict[str, np.ndarray]:
    cs = grid.chip_size
    if spectral.shape != (len(SPECTRAL_BANDS), cs, cs) or scl.shape != (cs, cs):
        raise ValueError(
            f"chip {grid.chip_id(row, col)}: expected reflectance [{len(SPECTRAL_BANDS)} {cs} {cs}] and "
            f"scl [{cs} {cs}], got {list(spectral.shape)} and {list(scl.shape)}"
        )
    x, y = chip_coordinates(grid, row, col)
    arrays = {"reflectance": spectral, "scl": scl, "x": x, "y": y}
    return {k: np.ascontiguousarray(a, dtype=_DTYPES[k]) for k, a in arrays.items()}


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
    try:
        _write_netcdf(tmp, _chip_arrays(grid, row, col, spectral, scl), grid=grid, date=date,
                      scene_ids=scene_ids, crs_wkt=crs_wkt, compress=compress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        self._slots: dict[str, tuple[int, int]] = {}
        self.mode: str | None = "netcdf4" if compress else None
        self.fallback_reason: str | None = None

    def _netcdf(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        _write_netcdf(path, arrays, grid=self.grid, date=self.date, scene_ids=self.scene_ids,
                      crs_wkt=self.crs_wkt, compress=self.compress)

    def _sentinels(self, seed: int) -> dict[str, np.ndarray]:
        """Values no real chip has (full-range noise, non-grid coordinates) for finding and
        checking the varying arrays' bytes."""
        rng = np.random.default_rng(seed)
        cs, n = self.grid.chip_size, len(SPECTRAL_BANDS)
        return {
            "reflectance": rng.integers(1, 65535, (n, cs, cs), dtype=np.uint16),
            "scl": rng.integers(0, 255, (cs, cs), dtype=np.uint8),
            "x": rng.random(cs) * 1e6,
            "y": rng.random(cs) * 1e7,
        }

    def _make_template(self, directory: Path) -> None:
        self.mode = "netcdf4"
        stem = f".datacube-template.{os.getpid()}.{id(self)}"
        first, second = directory / f"{stem}.nc", directory / f"{stem}.check.nc"
        try:
            marks = self._sentinels(1)
            self._netcdf(first, marks)
            template = first.read_bytes()
            slots: dict[str, tuple[int, int]] = {}
            for name in _VARYING:
                raw = marks[name].astype(_DTYPES[name]).tobytes()
                at = template.find(raw)
                if at < 0 or template.find(raw, at + 1) >= 0:
                    self.fallback_reason = f"the {name} values are not stored once, in one piece"
                    return
                slots[name] = (at, len(raw))
            # a second set of values, copied in and read back through netCDF4
            check = self._sentinels(2)
            second.write_bytes(self._patched(template, slots, check))
            with netCDF4.Dataset(second) as nc:
                nc.set_auto_maskandscale(False)
                for name in _VARYING:
                    if not np.array_equal(np.asarray(nc[name][:]), check[name]):
                        self.fallback_reason = f"{name} copied into the template did not read back"
                        return
            self._template, self._slots, self.mode = template, slots, "template"
        finally:
            first.unlink(missing_ok=True)
            second.unlink(missing_ok=True)

    @staticmethod
    def _patched(
        template: bytes, slots: dict[str, tuple[int, int]], arrays: dict[str, np.ndarray]
    ) -> bytearray:
        buf = bytearray(template)
        for name, (at, n) in slots.items():
            buf[at : at + n] = np.ascontiguousarray(arrays[name], dtype=_DTYPES[name]).data.cast("B")
        return buf

    def write(self, path: Path, spectral: np.ndarray, scl: np.ndarray, row: int, col: int) -> None:
        """Write chip (row, col)'s datacube at ``path`` (a temporary name, then a rename)."""
        path = Path(path)
        arrays = _chip_arrays(self.grid, row, col, spectral, scl)
        if self.mode is None:
            self._make_template(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            if self._template is not None:
                tmp.write_bytes(self._patched(self._template, self._slots, arrays))
            else:
                self._netcdf(tmp, arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
