"""Encoder inputs: the datacube dict every encoder's ``embed_datacube`` takes.

    {"pixels": [B C H W] float32, z-scored with the band statistics in ``bands.py``,
     "time":   [B 4] float32, (sin, cos) of week-of-year * 2pi/52, (sin, cos) of hour * 2pi/24,
     "latlon": [B 4] float32, (sin, cos) of latitude, (sin, cos) of longitude, in radians,
     "gsd":    float, metres,
     "waves":  [C] float32, central wavelengths in micrometres}
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from geofm_assets.bands import BANDS_BY_NAME, SPECTRAL_BAND_NAMES

Datacube = dict[str, Any]


def band_stats(band_names: Sequence[str] = SPECTRAL_BAND_NAMES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, wavelength) arrays for ``band_names``, from the one band table."""
    bands = [BANDS_BY_NAME[n] for n in band_names]
    return (
        np.array([b.mean for b in bands], np.float32),
        np.array([b.std for b in bands], np.float32),
        np.array([b.wavelength for b in bands], np.float32),
    )


def normalize_pixels(dn: np.ndarray, band_names: Sequence[str] = SPECTRAL_BAND_NAMES) -> np.ndarray:
    """[B C H W] harmonized DN (reflectance x 10000) -> z-scores, float32."""
    mean, std, _ = band_stats(band_names)
    return (dn.astype(np.float32) - mean[None, :, None, None]) / std[None, :, None, None]


def denormalize_pixels(pixels: np.ndarray, band_names: Sequence[str] = SPECTRAL_BAND_NAMES) -> np.ndarray:
    """The inverse of ``normalize_pixels``: z-scores -> DN, float32."""
    mean, std, _ = band_stats(band_names)
    return pixels * std[None, :, None, None] + mean[None, :, None, None]


def encode_time(moments: Sequence[dt.datetime | dt.date]) -> np.ndarray:
    """[B 4]: sin/cos of week of year (2pi/52) and of hour of day (2pi/24)."""
    out = np.empty((len(moments), 4), np.float32)
    for i, m in enumerate(moments):
        week = m.isocalendar()[1]
        hour = m.hour if isinstance(m, dt.datetime) else 0
        w, h = week * 2 * math.pi / 52, hour * 2 * math.pi / 24
        out[i] = (math.sin(w), math.cos(w), math.sin(h), math.cos(h))
    return out


def encode_latlon(lats: Sequence[float], lons: Sequence[float]) -> np.ndarray:
    """[B 4]: sin/cos of latitude, sin/cos of longitude (degrees in, radians inside).
    Latitude first: the reference pipeline passed (lon, lat) here, which this fixes."""
    lat = np.radians(np.asarray(lats, np.float64))
    lon = np.radians(np.asarray(lons, np.float64))
    return np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)], axis=1).astype(np.float32)


def make_datacube(
    dn: np.ndarray,
    moments: Sequence[dt.datetime | dt.date],
    lats: Sequence[float],
    lons: Sequence[float],
    *,
    gsd: float = 10.0,
    band_names: Sequence[str] = SPECTRAL_BAND_NAMES,
) -> Datacube:
    """Build the encoder input from harmonized DN chips [B C H W] on their native UTM grid
    (so ``gsd`` is the real pixel size: 10 m for our chips)."""
    if dn.ndim != 4 or dn.shape[1] != len(band_names):
        raise ValueError(f"expected [B {len(band_names)} H W] pixels, got shape {dn.shape}")
    if not (len(moments) == len(lats) == len(lons) == dn.shape[0]):
        raise ValueError("one time, latitude and longitude per chip")
    _, _, waves = band_stats(band_names)
    return {
        "pixels": normalize_pixels(dn, band_names),
        "time": encode_time(moments),
        "latlon": encode_latlon(lats, lons),
        "gsd": float(gsd),
        "waves": waves,
    }
