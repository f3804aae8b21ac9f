"""Per-chip SCL fractions and band means against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from geofm_assets.bands import SCL_CLOUD_CLASSES, SCL_SHADOW_CLASSES
from geofm_assets.geo.chipping import band_means, chip_fractions


def chip(seed: int, nodata_share: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spectral = rng.integers(1, 9000, (10, 64, 64)).astype(np.uint16)
    scl = rng.integers(0, 12, (64, 64)).astype(np.uint16)
    holes = rng.random((10, 64, 64)) < nodata_share / 10
    spectral[holes] = 0
    return spectral, scl


@pytest.mark.parametrize("nodata_share", [0.0, 0.3])
def test_fractions_and_means_match_their_definitions(nodata_share: float) -> None:
    spectral, scl = chip(0, nodata_share)
    if nodata_share == 0.0:
        scl[scl == 0] = 4  # every pixel with data
    nodata = (scl == 0) | np.any(spectral == 0, axis=0)
    n_valid = (~nodata).sum()
    cloud = (np.isin(scl, SCL_CLOUD_CLASSES) & ~nodata).sum() / n_valid
    shadow = (np.isin(scl, SCL_SHADOW_CLASSES) & ~nodata).sum() / n_valid
    assert chip_fractions(scl, spectral) == pytest.approx((cloud, shadow, nodata.mean()), abs=0)

    spectral_valid = np.all(spectral > 0, axis=0)
    expected = [float(b[spectral_valid].mean()) for b in spectral]
    assert band_means(spectral, spectral_valid) == expected


def test_a_chip_without_data() -> None:
    spectral, scl = chip(1, 0.0)
    spectral[3] = 0
    assert chip_fractions(scl, spectral) == (0.0, 0.0, 1.0)
    assert band_means(spectral, np.all(spectral > 0, axis=0)) == [0.0] * 10
    # SCL values outside its classes (> 255 too) count as neither cloud nor shadow
    scl = np.full((64, 64), 300, np.uint16)
    assert chip_fractions(scl, chip(2, 0.0)[0]) == (0.0, 0.0, 0.0)
