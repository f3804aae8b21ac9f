"""Sentinel-2 L2A band metadata: the one place band names, resolutions, wavelengths and
normalization statistics live (as Clay's ``configs/metadata.yaml`` does).

Asset keys follow Earth Search v1's ``sentinel-2-l2a`` collection; file names and band ids
follow the ESA product. Mean/std are Clay's Sentinel-2 L2A statistics in DN (reflectance x
10000, harmonized to processing baselines before 04.00).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    name: str  # Earth Search asset key, e.g. "blue"
    band_id: str  # ESA band id and COG file stem, e.g. "B02"
    resolution: int  # native ground sample distance in metres
    wavelength: float  # central wavelength, micrometres
    fwhm: float  # full width at half maximum, micrometres
    mean: float  # Clay normalization mean (DN)
    std: float  # Clay normalization std (DN)


# Order is the order of bands in every datacube, COG and tensor this project writes.
SPECTRAL_BANDS: tuple[Band, ...] = (
    Band("blue", "B02", 10, 0.493, 0.098, 1105.0, 1809.0),
    Band("green", "B03", 10, 0.560, 0.045, 1355.0, 1757.0),
    Band("red", "B04", 10, 0.665, 0.038, 1552.0, 1888.0),
    Band("rededge1", "B05", 20, 0.704, 0.019, 1887.0, 1870.0),
    Band("rededge2", "B06", 20, 0.740, 0.018, 2422.0, 1732.0),
    Band("rededge3", "B07", 20, 0.783, 0.028, 2630.0, 1697.0),
    Band("nir", "B08", 10, 0.842, 0.145, 2743.0, 1742.0),
    Band("nir08", "B8A", 20, 0.865, 0.033, 2785.0, 1648.0),
    Band("swir16", "B11", 20, 1.610, 0.143, 2388.0, 1470.0),
    Band("swir22", "B12", 20, 2.190, 0.242, 1835.0, 1379.0),
)
SPECTRAL_BAND_NAMES: tuple[str, ...] = tuple(b.name for b in SPECTRAL_BANDS)
BANDS_BY_NAME: dict[str, Band] = {b.name: b for b in SPECTRAL_BANDS}

# Scene classification layer (SCL): 20 m, uint8 values stored in a uint16 COG by Earth Search.
SCL_ASSET = "scl"
SCL_FILE_STEM = "SCL"
SCL_RESOLUTION = 20
SCL_NO_DATA = 0
SCL_SATURATED_OR_DEFECTIVE = 1
SCL_DARK_AREA = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_UNCLASSIFIED = 7
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_THIN_CIRRUS = 10
SCL_SNOW = 11
SCL_CLOUD_CLASSES: tuple[int, ...] = (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_THIN_CIRRUS)
SCL_SHADOW_CLASSES: tuple[int, ...] = (SCL_CLOUD_SHADOW,)

# Every asset the pipeline reads from an item, spectral bands first, SCL last.
REQUIRED_ASSETS: tuple[str, ...] = (*SPECTRAL_BAND_NAMES, SCL_ASSET)
# Band order of the region COGs written by ``sentinel2_tiles``: spectral bands then SCL.
TILE_BAND_NAMES: tuple[str, ...] = REQUIRED_ASSETS

# Processing baseline 04.00 (from 2022-01-25) adds BOA_ADD_OFFSET: DN = reflectance*10000 + 1000.
BOA_OFFSET_BASELINE = "04.00"
BOA_ADD_OFFSET_DN = 1000
REFLECTANCE_SCALE = 0.0001
NODATA = 0
