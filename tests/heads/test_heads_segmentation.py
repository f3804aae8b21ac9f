"""The segmentation decoder: shapes, metrics by hand, rcf's feature map, Clay patch tokens, and
training on the tiny lake that beats the majority class on held-out chips."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import torch

from geofm_assets.geo.sample_data import FOREST, WATER, ground_spectra
from geofm_assets.heads.labels import IGNORE, HeadEncoderMismatch, LandcoverTruth
from geofm_assets.heads.segmentation import (
    SegmentationDecoder,
    SegmentationError,
    load_segmentation_head,
    pixel_metrics,
    pixel_training_set,
    spatial_features,
    train_segmentation,
)
from geofm_assets.models.base import Encoder
from geofm_assets.models.clay import CLAY_CONFIGS, ClayEncoder, ClayEncoderModel
from geofm_assets.models.datacube import make_datacube
from geofm_assets.models.rcf import RCFEncoder

TINY_CLAY = dataclasses.replace(CLAY_CONFIGS["clay-v1"], name="clay-tiny", dim=32, depth=2, heads=2,
                                dim_head=16)
TRAIN_DATES = ["2020-07-16", "2022-07-31"]  # two clear dates of the tiny sample: 32 chip observations


def tiny_clay(seed: int = 0) -> ClayEncoder:
    torch.manual_seed(seed)
    return ClayEncoder(ClayEncoderModel(TINY_CLAY).eval(), checkpoint_digest="random weights, seed 0")


def half_water_cube(size: int = 64):
    """Two chips: water on the left half, forest on the right (the sample's spectra, DN)."""
    table, _ = ground_spectra(dt.date(2021, 7, 1))  # [classes 10]
    ground = np.full((size, size), FOREST)
    ground[:, : size // 2] = WATER
    rng = np.random.default_rng(0)
    dn = np.stack([np.moveaxis(table[ground], -1, 0) * rng.uniform(0.97, 1.03, (10, size, size))
                   for _ in range(2)])
    return make_datacube(dn.astype(np.float32), [dt.date(2021, 7, 1)] * 2, [-9.1] * 2, [-63.0] * 2)


@pytest.mark.parametrize(("grid", "upscale"), [(32, 8), (8, 16), (16, 1), (4, 2)])
def test_decoder_upsamples_the_feature_grid(grid, upscale):
    decoder = SegmentationDecoder(24, 5, upscale=upscale, hidden=16)
    out = decoder(torch.randn(2, 24, grid, grid))
    assert out.shape == (2, 5, grid * upscale, grid * upscale)
    assert any(isinstance(m, torch.nn.PixelShuffle) for m in decoder.modules()) == (upscale > 1)
    with pytest.raises(SegmentationError, match="power of two"):
        SegmentationDecoder(24, 5, upscale=6)


def test_pixel_metrics_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 2, IGNORE, 1]])
    predicted = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    m = pixel_metrics(predicted, target, ["a", "b", "c"])
    # a: tp 2 fp 1 fn 1 -> IoU 2/4, F1 4/6; b: tp 2 fp 1 fn 1 -> same; c: tp 1 -> 1
    assert m["per_class"]["a"] == {"iou": 0.5, "f1": round(4 / 6, 4), "support": 3}
    assert m["per_class"]["c"]["iou"] == 1.0 and m["pixels"] == 7
    assert m["mean_iou"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)


def test_rcf_feature_map_is_the_embedding_before_its_spatial_mean():
    cube = half_water_cube()
    enc = RCFEncoder()
    fmap = enc.feature_map(cube, grid=8)
    assert fmap.shape == (2, 512, 8, 8) and fmap.dtype == np.float32 and np.isfinite(fmap).all()
    emb = enc.embed_datacube(cube)
    for i in range(2):
        assert np.corrcoef(fmap[i].mean(axis=(1, 2)), emb[i])[0, 1] > 0.99
    left, right = fmap[0, :, :, 1], fmap[0, :, :, 6]  # [D 8] columns inside each half
    within = np.linalg.norm(left[:, 1:] - left[:, :-1], axis=0).mean()
    across = np.linalg.norm(left - right, axis=0).mean()
    assert across > 5 * within  # the map knows where the water is
    np.testing.assert_array_equal(fmap, enc.feature_map(cube, grid=8))  # deterministic
    with pytest.raises(Exception, match="multiple of grid"):
        enc.feature_map(cube, grid=7)


def test_clay_patch_tokens_are_laid_out_on_the_grid():
    enc = tiny_clay()
    cube = half_water_cube(size=32)
    grid = spatial_features(enc, cube)
    assert grid.shape == (2, 32, 4, 4)
    tokens = enc.patch_embeddings(cube)  # [B 16 D], row-major
    np.testing.assert_allclose(grid[:, :, 1, 2], tokens[:, 1 * 4 + 2], rtol=1e-6)


def test_an_encoder_without_spatial_features_is_refused():
    class Pooled(Encoder):
        name, dim, checkpoint_digest = "hf:some-vit", 4, "x"

        def embed_datacube(self, datacube):
            return np.zeros((1, 4), np.float32)

    with pytest.raises(SegmentationError, match=r"hf:some-vit.*supports rcf .* clay"):
        spatial_features(Pooled(), half_water_cube())


@pytest.mark.slow
@pytest.mark.parametrize("encoder_name", ["rcf", "tiny-clay"])
def test_decoder_trained_on_the_tiny_lake_beats_the_majority_class(tiny_lake, tmp_path, encoder_name):
    encoder = RCFEncoder() if encoder_name == "rcf" else tiny_clay()
    identity = (encoder.name, encoder.checkpoint_digest)
    with LandcoverTruth.beside_catalog(tiny_lake.sample.catalog_path) as truth:
        data = pixel_training_set(tiny_lake.root, encoder, truth, dates=TRAIN_DATES)
    assert data.features.shape[1:] == (encoder.dim, 32, 32) and data.targets.shape[1:] == (256, 256)
    assert data.classes == ("forest", "pasture", "crops", "water", "bare_soil", "urban")
    head, report = train_segmentation(data, encoder=identity, hidden=16, epochs=12, holdout=0.3, seed=0)
    assert report.test_chips >= 2 and report.train_chips + report.test_chips == len(set(data.chip_ids))
    assert report.model["mean_iou"] > report.baseline["mean_iou"] + 0.1
    assert report.model["mean_f1"] > report.baseline["mean_f1"]
    assert set(head.meta["test_chip_ids"]).isdisjoint(
        set(data.chip_ids[~np.isin(data.chip_ids, head.meta["test_chip_ids"])]))

    head.save(tmp_path / "head")
    loaded = load_segmentation_head(tmp_path / "head")
    codes, conf = head.predict(data.features[:2], encoder=identity)
    codes2, _conf2 = loaded.predict(data.features[:2], encoder=identity)
    np.testing.assert_array_equal(codes, codes2)
    assert set(np.unique(codes)) <= set(data.codes) and ((conf > 0) & (conf <= 1)).all()
    with pytest.raises(HeadEncoderMismatch, match="segmentation decoder was trained on"):
        loaded.predict(data.features[:1], encoder=("clay-v1", "sha256:0"))
