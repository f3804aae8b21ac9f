"""rcf: deterministic, per chip, any band count, and its vectors carry spatial structure that
per-band statistics cannot see, without losing the spectra they do see."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from geofm_assets.bands import SPECTRAL_BAND_NAMES
from geofm_assets.models import EncoderError, build_encoder, make_datacube
from geofm_assets.models.datacube import Datacube
from geofm_assets.models.rcf import RCFEncoder, grid_stride

# A pasture-like L2A spectrum (DN) in SPECTRAL_BAND_NAMES order: every texture class below
# draws its chip spectra from the same distribution around it.
PASTURE_DN = np.array([330, 640, 480, 1050, 2200, 2700, 2900, 3000, 2300, 1250], np.float64)
TEXTURES = ("striped fields", "blobs", "speckle")


def datacube(dn: np.ndarray, band_names: Sequence[str] = SPECTRAL_BAND_NAMES) -> Datacube:
    n = dn.shape[0]
    return make_datacube(dn, [dt.date(2021, 7, 1)] * n, [-9.1] * n, [-63.0] * n,
                         band_names=band_names)


def matched_textures(n_per_class: int = 30, size: int = 32, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """DN chips [N 10 size size] uint16 and labels: striped fields (rows of a crop, any
    orientation, 5-10 px period), blobs (tree clumps, 1.5-3 px) and speckle (white noise).
    Every chip's pattern is mapped onto one reference histogram, and every class draws its
    per-band means (brightness x band jitter around PASTURE_DN) and contrasts (4-15 %) from the
    same distributions: per-band mean and std cannot tell the classes apart."""
    rng = np.random.default_rng(seed)
    reference = np.sort(rng.standard_normal(size * size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    chips, labels = [], []
    for label in range(len(TEXTURES)):
        for _ in range(n_per_class):
            if label == 0:
                angle, period, phase = rng.uniform(0, np.pi), rng.uniform(5, 10), rng.uniform(0, 2 * np.pi)
                pattern = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
                pattern += 0.3 * rng.standard_normal((size, size))
            elif label == 1:
                pattern = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1.5, 3), mode="wrap")
            else:
                pattern = rng.standard_normal((size, size))
            ranks = np.argsort(np.argsort(pattern.ravel()))
            pattern = reference[ranks].reshape(size, size)  # the same histogram for every chip
            mean = PASTURE_DN * rng.uniform(0.7, 1.4) * rng.uniform(0.85, 1.15, PASTURE_DN.size)
            std = mean * rng.uniform(0.04, 0.15)
            dn = mean[:, None, None] + std[:, None, None] * pattern[None]
            dn += rng.normal(0, 8, dn.shape)  # sensor noise
            chips.append(np.clip(np.rint(dn), 1, 65535).astype(np.uint16))
            labels.append(label)
    return np.stack(chips), np.array(labels)


def band_statistics(cube: Datacube) -> np.ndarray:
    """[B 2C]: the baseline, per-band mean and std of the z-scored pixels."""
    pixels = cube["pixels"]
    return np.concatenate([pixels.mean(axis=(2, 3)), pixels.std(axis=(2, 3))], axis=1)


def knn_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(5), features, labels, cv=folds).mean())


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    return matched_textures(n_per_class=2, size=40, seed=1)[0]  # [6 10 40 40]


def test_registry_builds_rcf_with_defaults() -> None:
    enc = build_encoder("rcf")
    assert isinstance(enc, RCFEncoder)
    assert (enc.name, enc.dim) == ("rcf", 512)
    assert enc.checkpoint_digest.startswith("rcf:seed=0,k=256,size=3,")
    assert enc.checkpoint_digest == RCFEncoder().checkpoint_digest
    assert RCFEncoder(seed=1).checkpoint_digest != enc.checkpoint_digest


def test_two_builds_give_identical_vectors(chips: np.ndarray) -> None:
    cube = datacube(chips)
    first, second = RCFEncoder().embed_datacube(cube), RCFEncoder().embed_datacube(cube)
    assert first.dtype == np.float32
    assert np.array_equal(first, second)
    assert not np.array_equal(first, RCFEncoder(seed=1).embed_datacube(cube))


def test_a_chip_alone_equals_the_chip_in_a_batch(chips: np.ndarray) -> None:
    enc = RCFEncoder()
    batch = enc.embed_datacube(datacube(chips))
    for i in range(len(chips)):
        assert np.array_equal(enc.embed_datacube(datacube(chips[i : i + 1]))[0], batch[i])
    # and neighbours do not matter: the same chip among others
    shuffled = enc.embed_datacube(datacube(chips[::-1]))
    assert np.array_equal(shuffled[::-1], batch)


@pytest.mark.parametrize(
    "band_names", [("nir",), ("blue", "green", "red", "nir"), SPECTRAL_BAND_NAMES],
    ids=["1 band", "4 bands", "10 bands"])
def test_any_number_of_bands(chips: np.ndarray, band_names: tuple[str, ...]) -> None:
    index = [SPECTRAL_BAND_NAMES.index(n) for n in band_names]
    vectors = RCFEncoder().embed_datacube(datacube(chips[:, index], band_names))
    assert vectors.shape == (len(chips), 512)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert len({v.tobytes() for v in vectors}) == len(chips)  # distinct chips, distinct vectors


def test_dim_and_odd_shapes() -> None:
    rng = np.random.default_rng(0)
    dn = rng.integers(300, 3000, (2, 10, 17, 23)).astype(np.uint16)  # not square, not a power of 2
    vectors = RCFEncoder(dim=128).embed_datacube(datacube(dn))
    assert vectors.shape == (2, 128) and np.isfinite(vectors).all()
    flat = RCFEncoder().embed_datacube(datacube(np.full((1, 10, 8, 8), 1200, np.uint16)))
    assert np.isfinite(flat).all()  # a featureless chip: no texture, no NaN


def test_bad_input_is_an_encoder_error() -> None:
    enc = RCFEncoder()
    with pytest.raises(EncoderError, match="at least 3 px"):
        enc.embed_datacube({"pixels": np.zeros((1, 10, 2, 2), np.float32)})
    pixels = np.zeros((1, 10, 16, 16), np.float32)
    pixels[0, 3, 4, 4] = np.nan
    with pytest.raises(EncoderError, match="NaN"):
        enc.embed_datacube({"pixels": pixels})
    with pytest.raises(EncoderError, match="even"):
        RCFEncoder(dim=7)


def test_patches_are_sampled_on_a_bounded_grid() -> None:
    assert grid_stride(32, 32, 3, 4096) == 1
    for max_patches in (4096, 8192):
        stride = grid_stride(256, 256, 3, max_patches)
        assert ((253 // stride) + 1) ** 2 <= max_patches < ((253 // (stride - 1)) + 1) ** 2


def test_rcf_sees_structure_that_band_statistics_cannot() -> None:
    dn, labels = matched_textures(n_per_class=30, size=32, seed=0)
    cube = datacube(dn)
    baseline = knn_accuracy(band_statistics(cube), labels)
    rcf = knn_accuracy(RCFEncoder().embed_datacube(cube), labels)
    assert baseline <= 0.6, baseline  # chance is 1/3
    assert rcf >= 0.85, rcf


def test_rcf_keeps_the_spectra_on_the_sample_world() -> None:
    """Forest, pasture and crops chips of the seeded sample world (clear sky): classes that
    differ mostly in spectrum, which per-chip whitening alone would throw away."""
    from geofm_assets.bands import SPECTRAL_BANDS
    from geofm_assets.geo import sample_data as sd

    world = sd.world_for(0, sd.preset_for("tiny").tile_pixels)
    acquisition = dataclasses.replace(sd.acquisition_on(dt.date(2022, 1, 1), "tiny", 0),
                                      cloud_fraction=0.0, swath_edge=False)
    arrays, _ = sd.render_scene(world, sd.atmosphere_on(world, acquisition, 0), acquisition,
                                sd.TILES[0], 0)
    offset = sd.boa_offset_dn(acquisition.processing_baseline)
    stack = np.stack([  # [10 T T] harmonized DN at 10 m
        np.kron(arrays[b.name], np.ones((2, 2), np.uint16)) if b.resolution == 20 else arrays[b.name]
        for b in SPECTRAL_BANDS]).astype(np.int32) - offset
    landcover = world.landcover[:, : world.tile_pixels]
    size, per_class = 32, 25
    rng = np.random.default_rng(0)
    chips, labels = [], []
    for cls in (sd.FOREST, sd.PASTURE, sd.CROPS):
        share = np.lib.stride_tricks.sliding_window_view(landcover == cls, (size, size))[::size, ::size]
        rows, cols = np.nonzero(share.mean(axis=(2, 3)) >= 0.8)
        pick = rng.permutation(rows.size)[:per_class]
        assert pick.size >= 15, f"too few {sd.LANDCOVER_CLASSES[cls]} chips"
        for r, c in zip(rows[pick] * size, cols[pick] * size, strict=True):
            chips.append(stack[:, r : r + size, c : c + size])
            labels.append(cls)
    cube = datacube(np.clip(np.stack(chips), 1, None).astype(np.uint16))
    y = np.array(labels)
    baseline = knn_accuracy(band_statistics(cube), y)
    rcf = knn_accuracy(RCFEncoder().embed_datacube(cube), y)
    assert rcf >= 0.9, (rcf, baseline)
    assert rcf >= baseline - 0.05, (rcf, baseline)
