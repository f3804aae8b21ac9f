"""Clay's encoder: strict checkpoint loading, the full-size shapes, the encodings by hand and,
when Clay's own code is at hand (``GEOFM_CLAY_REFERENCE``), equality with its encoder."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import math
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from geofm_assets.geo.sample_data import FOREST, PASTURE, WATER, ground_spectra, smooth_field
from geofm_assets.models.base import EncoderError, file_digest
from geofm_assets.models.clay import (
    CHECKPOINT_DIR_ENV,
    CLAY_CONFIGS,
    HF_REPO,
    ClayConfig,
    ClayEncoder,
    ClayEncoderModel,
    build_clay_encoder,
    gsd_position_encoding,
    parameter_count,
    wavelength_encoding,
)
from geofm_assets.models.datacube import Datacube, make_datacube

TINY = dataclasses.replace(CLAY_CONFIGS["clay-v1"], name="clay-tiny", dim=32, depth=2, heads=2, dim_head=16)
REFERENCE_ENV = "GEOFM_CLAY_REFERENCE"


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def chip_datacube(batch: int = 2, height: int = 32, width: int = 32, seed: int = 3) -> Datacube:
    """Chips of forest, pasture and a river on the sample's ground spectra, DN on a 10 m grid."""
    rng = np.random.default_rng(seed)
    moments = [dt.datetime(2021, 6, 1, 13, 40), dt.datetime(2021, 11, 20, 13, 40)][:batch]
    dn = np.empty((batch, 10, height, width), np.float32)
    for i, moment in enumerate(moments):
        table, _ = ground_spectra(moment.date())  # [classes 10] reflectance
        ground = np.where(smooth_field(rng, (height, width), scales=(12.0, 4.0)) > 0, FOREST, PASTURE)
        ground[:, width // 2 - 2 : width // 2 + 1] = WATER
        dn[i] = np.moveaxis(table[ground], -1, 0)  # the sample spectra are DN already
    return make_datacube(dn, moments, lats=[-9.1, -9.2][:batch], lons=[-63.0, -62.9][:batch])


def random_model(config: ClayConfig = TINY, seed: int = 0) -> ClayEncoderModel:
    """Clay-architecture weights with every tensor perturbed (no zero bias, no unit LayerNorm),
    so that a mix-up of any two tensors shows."""
    torch.manual_seed(seed)
    model = ClayEncoderModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def lightning_checkpoint(model: ClayEncoderModel, path: Path, **extra: object) -> Path:
    state = {f"model.encoder.{k}": v for k, v in model.state_dict().items()}
    state |= {
        "model.decoder.mask_patch": torch.zeros(16),
        "model.decoder.transformer.norm.weight": torch.ones(16),
        "model.proj.weight": torch.zeros(8, model.config.dim),
        "teacher.blocks.0.attn.qkv.weight": torch.zeros(6, 2),
    }
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, **extra}, path)
    return path


def plain_checkpoint(model: ClayEncoderModel, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


# --- loading -----------------------------------------------------------------------------------


def test_lightning_and_plain_checkpoints_load_to_the_same_encoder(tmp_path):
    model = random_model()
    lightning = lightning_checkpoint(model, tmp_path / "tiny.ckpt")
    plain = plain_checkpoint(model, tmp_path / "tiny_encoder.pt")
    cube = chip_datacube()

    from_lightning = ClayEncoder.from_checkpoint(lightning, TINY, "cpu")
    from_plain = ClayEncoder.from_checkpoint(plain, TINY, "cpu")
    in_memory = ClayEncoder(random_model(), checkpoint_digest="random weights, seed 0")

    emb = from_lightning.embed_datacube(cube)
    assert emb.shape == (2, 32) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb, from_lightning.embed_datacube(cube))  # deterministic
    np.testing.assert_array_equal(emb, from_plain.embed_datacube(cube))
    np.testing.assert_array_equal(emb, in_memory.embed_datacube(cube))
    assert not np.allclose(emb[0], emb[1])  # the two chips differ

    assert from_lightning.checkpoint_digest == file_digest(lightning)
    assert from_lightning.checkpoint_digest.startswith("sha256:")
    assert from_lightning.name == "clay-tiny" and from_lightning.dim == 32
    assert not from_lightning.model.training


def test_patch_embeddings_follow_the_cls_token(tmp_path):
    encoder = ClayEncoder(random_model(), checkpoint_digest="random")
    square = chip_datacube(height=32, width=32)
    patches = encoder.patch_embeddings(square)
    assert patches.shape == (2, 16, 32) and patches.dtype == np.float32
    tokens = encoder.tokens(square).numpy()
    np.testing.assert_array_equal(tokens[:, 0], encoder.embed_datacube(square))
    np.testing.assert_array_equal(tokens[:, 1:], patches)
    # non-square chips give an (H/8) x (W/8) grid
    assert encoder.patch_embeddings(chip_datacube(height=16, width=40)).shape == (2, 10, 32)


def test_cpu_bf16_autocast_stays_close_to_float32():
    model = random_model()
    f32 = ClayEncoder(model, checkpoint_digest="random").embed_datacube(chip_datacube())
    bf16 = ClayEncoder(model, checkpoint_digest="random", cpu_bf16=True).embed_datacube(chip_datacube())
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, atol=0.1)


def test_build_clay_encoder_finds_the_published_file_name(tmp_path, monkeypatch):
    tiny_v1 = dataclasses.replace(TINY, name="clay-v1")
    monkeypatch.setitem(CLAY_CONFIGS, "clay-v1", tiny_v1)
    lightning_checkpoint(random_model(tiny_v1), tmp_path / "clay-v1-base.ckpt")

    encoder = build_clay_encoder("clay-v1", checkpoint_dir=tmp_path)
    assert (encoder.name, encoder.dim) == ("clay-v1", 32)
    assert encoder.checkpoint_digest == file_digest(tmp_path / "clay-v1-base.ckpt")

    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path))
    from_env = build_clay_encoder("clay-v1")
    cube = chip_datacube()
    np.testing.assert_array_equal(from_env.embed_datacube(cube), encoder.embed_datacube(cube))


def test_missing_checkpoint_says_what_to_get_and_where(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    with pytest.raises(EncoderError) as err:
        build_clay_encoder("clay-v1.5", checkpoint_dir=directory)
    message = str(err.value)
    for needle in (HF_REPO, "v1.5/clay-v1.5.ckpt", str(directory / "clay-v1.5.ckpt"), CHECKPOINT_DIR_ENV):
        assert needle in message

    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "from_env"))
    with pytest.raises(EncoderError, match="made-with-clay/Clay") as err:
        build_clay_encoder("clay-v1")
    assert str(tmp_path / "from_env" / "clay-v1-base.ckpt") in str(err.value)
    assert "v1/clay-v1-base.ckpt" in str(err.value)

    with pytest.raises(EncoderError, match="made-with-clay/Clay"):
        build_clay_encoder("clay-v1", checkpoint=tmp_path / "nowhere.ckpt")


def test_a_resized_tensor_is_named_with_both_shapes(tmp_path):
    model = random_model()
    state = model.state_dict()
    state["transformer.layers.1.0.to_qkv.weight"] = torch.zeros(90, 32)
    path = tmp_path / "resized.pt"
    torch.save(state, path)
    with pytest.raises(EncoderError) as err:
        ClayEncoder.from_checkpoint(path, TINY)
    message = str(err.value)
    assert str(path) in message
    assert "transformer.layers.1.0.to_qkv.weight: expected [96, 32], checkpoint has [90, 32]" in message
    assert "missing" not in message and "unexpected" not in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = {f"model.encoder.{k}": v for k, v in random_model().state_dict().items()}
    del state["model.encoder.transformer.norm.weight"]
    del state["model.encoder.patch_embedding.weight_generator.bias_token"]
    state["model.encoder.transformer.extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(EncoderError) as err:
        ClayEncoder.from_checkpoint(path, TINY)
    message = str(err.value)
    assert "missing keys (2)" in message and "unexpected keys (1)" in message
    assert "transformer.norm.weight [32]" in message
    assert "patch_embedding.weight_generator.bias_token [1, 128]" in message
    assert "transformer.extra.weight [3]" in message


def test_a_checkpoint_of_the_other_size_is_recognised(tmp_path):
    path = plain_checkpoint(random_model(), tmp_path / "tiny.pt")
    wider = dataclasses.replace(TINY, dim=40)
    with pytest.raises(EncoderError, match="its cls_token is 32-d"):
        ClayEncoder.from_checkpoint(path, wider)


class PickledStranger:
    """Not a tensor nor a Lightning hyper-parameter: must not be unpickled."""


def test_lightning_hyper_parameters_load_but_other_objects_are_refused(tmp_path):
    model = random_model()
    with_hparams = lightning_checkpoint(
        model, tmp_path / "hparams.ckpt", hyper_parameters=argparse.Namespace(model_size="tiny")
    )
    encoder = ClayEncoder.from_checkpoint(with_hparams, TINY)
    assert encoder.embed_datacube(chip_datacube()).shape == (2, 32)

    stranger = lightning_checkpoint(model, tmp_path / "stranger.ckpt", extra_object=PickledStranger())
    with pytest.raises(EncoderError, match=r"refused to unpickle.*PickledStranger"):
        ClayEncoder.from_checkpoint(stranger, TINY)

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="not a readable PyTorch checkpoint"):
        ClayEncoder.from_checkpoint(tmp_path / "junk.ckpt", TINY)


def test_unknown_model_name():
    with pytest.raises(EncoderError, match=re.escape("clay-v1, clay-v1.5")):
        build_clay_encoder("clay-v2")


def test_bad_inputs_are_explained():
    encoder = ClayEncoder(random_model(), checkpoint_digest="random")
    cube = chip_datacube()
    cases = {
        "multiples of 8": {**cube, "pixels": cube["pixels"][:, :, :30, :]},
        r"\[B C H W\]": {**cube, "pixels": cube["pixels"][0]},
        "one wavelength per band": {**cube, "waves": cube["waves"][:9]},
        r"time must be \[B 4\]": {**cube, "time": cube["time"][:1]},
        "datacube lacks gsd": {k: v for k, v in cube.items() if k != "gsd"},
    }
    for expected, bad in cases.items():
        with pytest.raises(EncoderError, match=expected):
            encoder.embed_datacube(bad)


# --- the published sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "qkv", "mlp_in", "kernel_out"),
    [
        ("clay-v1", 92_102_144, (2304, 768), (3072, 768), 49152),
        ("clay-v1.5", 311_442_944, (3072, 1024), (4096, 1024), 65536),
    ],
)
def test_full_size_encoders_have_the_published_shapes(name, params, qkv, mlp_in, kernel_out):
    config = CLAY_CONFIGS[name]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ClayEncoderModel(config).state_dict().items()}
    dim, depth = config.dim, config.depth
    assert parameter_count(config) == params
    assert len(shapes) == 25 + 10 * depth
    assert shapes["cls_token"] == (1, 1, dim)
    assert shapes["patch_embedding.weight_generator.fc_weight.weight"] == (kernel_out, 128)  # 8*8*dim
    assert shapes["patch_embedding.weight_generator.fc_bias.weight"] == (dim, 128)
    assert shapes["patch_embedding.weight_generator.weight_tokens"] == (128, 128)
    assert shapes["patch_embedding.weight_generator.encoder.layers.0.self_attn.in_proj_weight"] == (384, 128)
    assert shapes["patch_embedding.weight_generator.encoder.layers.0.linear1.weight"] == (2048, 128)
    assert shapes["transformer.layers.0.0.to_qkv.weight"] == qkv
    assert shapes["transformer.layers.0.0.to_out.weight"] == (dim, dim)
    assert shapes["transformer.layers.0.1.net.1.weight"] == mlp_in
    assert f"transformer.layers.{depth - 1}.1.net.3.bias" in shapes
    assert f"transformer.layers.{depth}.0.norm.weight" not in shapes
    assert shapes["transformer.norm.weight"] == (dim,)


# --- the pieces, by hand ---------------------------------------------------------------------


def test_position_encoding_by_hand():
    # dim 8: two frequencies, gsd * 10000^-(2k/8) for k = 0, 1 (k / (dim/4 - 1) = k): 10 and 1
    pe = gsd_position_encoding(2, 3, 8, 10.0).double().numpy()
    assert pe.shape == (6, 8)
    x, y = 2, 1  # row-major index 5
    expected = [math.sin(10 * x), math.sin(1 * x), math.cos(10 * x), math.cos(1 * x),
                math.sin(10 * y), math.sin(1 * y), math.cos(10 * y), math.cos(1 * y)]
    np.testing.assert_allclose(pe[5], expected, atol=1e-5)
    np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # dim 16, gsd 1: four frequencies 10000^-(2k/(3*16)), k = 0..3
    freqs = 10000.0 ** (-2 * np.arange(4) / 3 / 16)
    np.testing.assert_allclose(gsd_position_encoding(1, 2, 16, 1.0)[1, :4].numpy(), np.sin(freqs), atol=1e-6)


def test_wavelength_encoding_by_hand():
    # dim 4: frequencies 10000^-(k/1), k = 0, 1; micrometres used as they are
    enc = wavelength_encoding(torch.tensor([0.5, 2.19]), 4).double().numpy()
    by_hand = [math.sin(0.5), math.sin(0.5e-4), math.cos(0.5), math.cos(0.5e-4)]
    np.testing.assert_allclose(enc[0], by_hand, atol=1e-7)
    freqs = 10000.0 ** (-np.arange(64) / 63)
    np.testing.assert_allclose(
        wavelength_encoding(torch.tensor([0.842]), 128)[0].numpy(),
        np.concatenate([np.sin(0.842 * freqs), np.cos(0.842 * freqs)]),
        atol=1e-6,
    )


def test_patch_kernel_layout_and_one_patch_by_hand():
    model = random_model()
    cube = chip_datacube()
    pixels = torch.from_numpy(cube["pixels"])  # [B C H W]
    waves = torch.from_numpy(cube["waves"])  # [C]
    embedding = model.patch_embedding
    with torch.no_grad():
        kernel, bias = embedding.kernel(waves)  # [D C 8 8], [D]
        tokens = model.patch_embedding.fclayer(wavelength_encoding(waves, 128))
        raw, _ = embedding.weight_generator(tokens)  # [C (D 8 8)]
        patches = embedding(pixels, waves).double().numpy()  # [B L D]
    assert kernel.shape == (32, 10, 8, 8) and bias.shape == (32,)
    d, c, i, j = 5, 7, 3, 6  # kernel[d, c, i, j] is generator output [c, d*64 + i*8 + j] * 0.02
    assert torch.isclose(kernel[d, c, i, j], raw[c, d * 64 + i * 8 + j] * 0.02)
    # token of the patch in row 1, column 2 of chip 1, channel d: a dot product plus the bias
    window = cube["pixels"][1, :, 8:16, 16:24].astype(np.float64)
    by_hand = float((window * kernel[d].double().numpy()).sum() + bias[d].item())
    assert patches[1, 1 * 4 + 2, d] == pytest.approx(by_hand, abs=1e-5)


def test_time_and_latlon_are_the_last_eight_channels():
    model = random_model()
    cube = chip_datacube()
    time, latlon = torch.from_numpy(cube["time"]), torch.from_numpy(cube["latlon"])
    added = model.position_and_metadata(4, 4, torch.tensor(10.0), time, latlon)  # [B 16 32]
    assert added.shape == (2, 16, 32)
    np.testing.assert_array_equal(added[:, 7, 24:].numpy(), torch.cat((time, latlon), 1).numpy())
    np.testing.assert_array_equal(added[1, :, :24].numpy(), gsd_position_encoding(4, 4, 24, 10.0).numpy())


# --- Clay's own code ---------------------------------------------------------------------------


@pytest.fixture
def official_clay(monkeypatch) -> Iterator[types.ModuleType]:
    """Clay's v1.5 ``src.model`` module, imported from ``$GEOFM_CLAY_REFERENCE``: the
    claymodel 1.5.0 wheel (``pip download claymodel==1.5.0 --no-deps -d DIR``; it holds Clay's
    ``src/`` files at its top level, importing one another as ``src.*``) or a directory with
    ``model.py``, ``factory.py``, ``backbone.py`` and ``utils.py`` from Clay's ``src/``."""
    location = os.environ.get(REFERENCE_ENV)
    if not location or not Path(location).exists():
        pytest.skip(
            f"{REFERENCE_ENV} does not name Clay's v1.5 source (the claymodel 1.5.0 wheel from "
            "`pip download claymodel==1.5.0 --no-deps`, or a directory of its src/ files)"
        )
    pytest.importorskip("einops", reason="Clay's code imports einops")
    package = types.ModuleType("src")
    package.__path__ = [location]  # a wheel is a zip: zipimport reads the modules from it
    monkeypatch.setitem(sys.modules, "src", package)
    # src/model.py imports timm and torchvision.transforms.v2 for the MAE's teacher only; the
    # Encoder never uses them, so empty stand-ins let the module import without them.
    v2 = types.ModuleType("torchvision.transforms.v2")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.v2 = v2  # type: ignore[attr-defined]
    for name, module in {
        "timm": types.ModuleType("timm"),
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.transforms": transforms,
        "torchvision.transforms.v2": v2,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("TORCH_CUDNN_V8_API_DISABLED", "1")  # model.py sets it; restored afterwards
    before = set(sys.modules)
    precision = torch.get_float32_matmul_precision()
    try:
        official = importlib.import_module("src.model")
    finally:
        torch.set_float32_matmul_precision(precision)  # model.py sets "medium" at import
    yield official
    for name in set(sys.modules) - before:
        if name.startswith("src."):
            del sys.modules[name]


def official_encoder(official: types.ModuleType, config: ClayConfig) -> torch.nn.Module:
    """Clay's Encoder as used for embeddings: no masking, patches kept in order."""
    return official.Encoder(
        mask_ratio=0.0, patch_size=config.patch_size, shuffle=False, dim=config.dim, depth=config.depth,
        heads=config.heads, dim_head=config.dim_head, mlp_ratio=config.mlp_ratio,
    )


@pytest.mark.parametrize("blocks", ["v1.5: src/backbone.py", "v1: vit-pytorch 1.6.4 simple_vit"])
def test_embeddings_equal_the_official_encoder(official_clay, blocks, tmp_path):
    model = random_model()
    ours = ClayEncoder.from_checkpoint(lightning_checkpoint(model, tmp_path / "tiny.ckpt"), TINY)
    reference = official_encoder(official_clay, TINY)
    if blocks.startswith("v1:"):
        simple_vit = pytest.importorskip("vit_pytorch.simple_vit", reason="Clay v1's ViT blocks")
        reference.transformer = simple_vit.Transformer(
            dim=TINY.dim, depth=TINY.depth, heads=TINY.heads, dim_head=TINY.dim_head, mlp_dim=TINY.mlp_dim
        )
    reference.load_state_dict(model.state_dict(), strict=True)  # same names and shapes
    reference.eval()

    cube = chip_datacube(height=32, width=32)
    with torch.no_grad():
        encoded, unmasked, masked, _ = reference(
            {
                "pixels": torch.from_numpy(cube["pixels"]),
                "time": torch.from_numpy(cube["time"]),
                "latlon": torch.from_numpy(cube["latlon"]),
                "gsd": torch.tensor(cube["gsd"]),
                "waves": torch.from_numpy(cube["waves"]),
            }
        )
    assert masked.shape[1] == 0 and unmasked.shape[1] == 16
    np.testing.assert_allclose(ours.embed_datacube(cube), encoded[:, 0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.patch_embeddings(cube), encoded[:, 1:].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CLAY_CONFIGS))
def test_full_size_keys_equal_the_official_encoder(official_clay, name):
    config = CLAY_CONFIGS[name]
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in official_encoder(official_clay, config).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in ClayEncoderModel(config).state_dict().items()}
    assert ours == theirs
