"""GDAL's block cache size as ``cog_env`` sets it."""

from __future__ import annotations

import pytest
from rasterio.env import get_gdal_config

from geofm_assets.geo.gdal_env import GDAL_CACHE_MB, cog_env, gdal_cache_bytes


def test_cache_sizes_read_as_gdal_reads_the_option() -> None:
    assert gdal_cache_bytes("256") == 256 * 2**20  # small numbers are megabytes
    assert gdal_cache_bytes("300000") == 300_000  # large ones bytes
    assert 0 < gdal_cache_bytes("5%") < gdal_cache_bytes("10%")
    for bad in ("lots", "0", "-5", "150%"):
        with pytest.raises(ValueError, match="GDAL_CACHEMAX"):
            gdal_cache_bytes(bad)


def test_cog_env_sets_the_block_cache_in_megabytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # rasterio hands an integer to GDALSetCacheMax64, which takes bytes: 256 was a 256-byte cache
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    with cog_env(["/data/B04.tif"]):
        assert get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_MB * 2**20
    monkeypatch.setenv("GDAL_CACHEMAX", "512")
    with cog_env(["https://example.com/B04.tif"]):
        assert get_gdal_config("GDAL_CACHEMAX") == 512 * 2**20
