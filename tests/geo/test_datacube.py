"""Chip datacubes: the template writer gives the very file netCDF4 writes, falls back where the
layout is not what it expects, and never leaves a partial file."""

import datetime as dt
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.crs import CRS

from geofm_assets.bands import SPECTRAL_BAND_NAMES
from geofm_assets.geo import datacube
from geofm_assets.geo.datacube import DatacubeWriter, chip_coordinates, write_datacube
from geofm_assets.geo.regions import ChipGrid, Region

DATE = dt.date(2021, 6, 1)
SCENES = ["S2B_20LMQ_20210601_0_L2A", "S2B_20LNQ_20210601_0_L2A"]


@pytest.fixture(scope="module")
def grid() -> ChipGrid:
    return ChipGrid.for_region(Region(name="rondonia", geometry=shapely.box(-63.0, -9.1, -62.95, -9.05)))


@pytest.fixture(scope="module")
def wkt(grid: ChipGrid) -> str:
    return CRS.from_epsg(grid.epsg).to_wkt()


def chip(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spectral = rng.integers(1, 9000, (10, size, size), dtype=np.uint16)
    return spectral, rng.integers(0, 12, (size, size), dtype=np.uint16)


def test_template_writes_the_file_netcdf4_writes(tmp_path: Path, grid: ChipGrid, wkt: str) -> None:
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    for i, (row, col) in enumerate(((0, 0), (0, 1), (1, 0))):
        spectral, scl = chip(i)
        writer.write(tmp_path / f"fast_{i}.nc", spectral, scl, row, col)
        write_datacube(tmp_path / f"lib_{i}.nc", spectral, scl, grid=grid, row=row, col=col, date=DATE,
                       scene_ids=SCENES, crs_wkt=wkt)
        assert writer.mode == "template", writer.fallback_reason
        assert (tmp_path / f"fast_{i}.nc").read_bytes() == (tmp_path / f"lib_{i}.nc").read_bytes()
    # nothing else is left beside the chips (the template and its check are removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{kind}_{i}.nc" for kind in ("fast", "lib") for i in range(3)
    )


def test_a_written_datacube_reads_back_with_its_coordinates_crs_and_time(
    tmp_path: Path, grid: ChipGrid, wkt: str
) -> None:
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    spectral, scl = chip(7)
    writer.write(tmp_path / "a.nc", chip(6)[0], chip(6)[1], 0, 0)  # the template is made here
    writer.write(tmp_path / "b.nc", spectral, scl, 1, 1)
    with netCDF4.Dataset(tmp_path / "b.nc") as nc:
        nc.set_auto_maskandscale(False)
        assert np.array_equal(nc["reflectance"][:], spectral)
        assert np.array_equal(nc["scl"][:], scl.astype(np.uint8))
        x, y = chip_coordinates(grid, 1, 1)
        assert np.array_equal(nc["x"][:], x) and np.array_equal(nc["y"][:], y)
        assert list(nc["band"][:]) == list(SPECTRAL_BAND_NAMES)
        assert int(nc["time"][0]) == (DATE - dt.date(1970, 1, 1)).days
        assert nc.date == DATE.isoformat() and nc.scene_ids == ",".join(SCENES)
        assert nc.region == grid.region
        # the per-chip attributes, in the checksummed object headers the writer re-signs
        assert nc.chip_id == "rondonia_r0001_c0001"
        t = grid.chip_transform(1, 1)
        assert [float(v) for v in nc["spatial_ref"].GeoTransform.split()] == [t.c, t.a, t.b, t.f, t.d, t.e]
    # GDAL reads the chip's georeferencing (the space-padded GeoTransform) and CRS
    with rasterio.open(f"netcdf:{tmp_path / 'b.nc'}:reflectance") as ds:
        assert ds.count == 10
        assert ds.crs.to_epsg() == grid.epsg
        assert ds.transform == grid.chip_transform(1, 1)


def test_headers_are_checksummed_so_an_attribute_copied_without_resigning_is_refused(
    tmp_path: Path, grid: ChipGrid, wkt: str
) -> None:
    """Why the writer recomputes the header checksums: HDF5 refuses a header whose bytes changed."""
    DatacubeWriter(grid, DATE, SCENES, wkt).write(tmp_path / "f.nc", *chip(10), 0, 1)
    raw = bytearray((tmp_path / "f.nc").read_bytes())
    at = raw.find(b"rondonia_r0000_c0001")
    raw[at : at + 20] = b"rondonia_r0000_c0002"
    (tmp_path / "g.nc").write_bytes(raw)
    with pytest.raises(OSError), netCDF4.Dataset(tmp_path / "g.nc") as nc:
        _ = nc.chip_id


def test_compressed_datacubes_go_through_netcdf4(tmp_path: Path, grid: ChipGrid, wkt: str) -> None:
    writer = DatacubeWriter(grid, DATE, SCENES, wkt, compress=True)
    spectral, scl = chip(3)
    writer.write(tmp_path / "c.nc", spectral, scl, 0, 1)
    assert writer.mode == "netcdf4"
    with netCDF4.Dataset(tmp_path / "c.nc") as nc:
        nc.set_auto_maskandscale(False)
        assert nc["reflectance"].filters()["zlib"]
        assert np.array_equal(nc["reflectance"][:], spectral)


def test_an_unexpected_layout_falls_back_to_netcdf4(
    tmp_path: Path, grid: ChipGrid, wkt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the template's values are not plain bytes (here: a netCDF library that chunks and
    compresses them), the writer says why and writes each chip through netCDF4."""
    real = datacube._write_netcdf

    def compressing(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, str], **kw: object) -> None:
        kw["compress"] = True
        real(path, arrays, attrs, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(datacube, "_write_netcdf", compressing)
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    spectral, scl = chip(4)
    writer.write(tmp_path / "d.nc", spectral, scl, 0, 0)
    assert writer.mode == "netcdf4"
    assert writer.fallback_reason is not None and "reflectance" in writer.fallback_reason
    with netCDF4.Dataset(tmp_path / "d.nc") as nc:
        nc.set_auto_maskandscale(False)
        assert np.array_equal(nc["reflectance"][:], spectral)
    assert [p.name for p in tmp_path.iterdir()] == ["d.nc"]


def test_without_hdf5s_checksum_function_the_writer_uses_netcdf4(
    tmp_path: Path, grid: ChipGrid, wkt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datacube, "_hdf5_checksum", lambda: None)
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    spectral, scl = chip(11)
    writer.write(tmp_path / "h.nc", spectral, scl, 1, 0)
    assert writer.mode == "netcdf4"
    assert writer.fallback_reason is not None and "checksum" in writer.fallback_reason
    write_datacube(tmp_path / "lib.nc", spectral, scl, grid=grid, row=1, col=0, date=DATE, scene_ids=SCENES,
                   crs_wkt=wkt)
    assert (tmp_path / "h.nc").read_bytes() == (tmp_path / "lib.nc").read_bytes()


def test_a_chip_of_the_wrong_shape_is_refused_and_nothing_is_written(
    tmp_path: Path, grid: ChipGrid, wkt: str
) -> None:
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    spectral, scl = chip(5, size=128)
    with pytest.raises(ValueError, match=r"rondonia_r0000_c0000.*\[10 256 256\]"):
        writer.write(tmp_path / "e.nc", spectral, scl, 0, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(
    tmp_path: Path, grid: ChipGrid, wkt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = DatacubeWriter(grid, DATE, SCENES, wkt)
    writer.write(tmp_path / "ok.nc", *chip(8), 0, 0)
    before = (tmp_path / "ok.nc").read_bytes()

    def no_room(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datacube.os, "replace", no_room)
    with pytest.raises(OSError, match="No space"):
        writer.write(tmp_path / "ok.nc", *chip(9), 0, 0)
    # the earlier file is whole, and no temporary is left
    assert (tmp_path / "ok.nc").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ok.nc"]
