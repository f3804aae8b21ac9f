"""hf:<dir>: a tiny random ViT saved into tmp_path loads through the real loading code; ids
that are not in the local cache fail with the fetch instructions; nothing is downloaded."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from geofm_assets.bands import SPECTRAL_BAND_NAMES
from geofm_assets.models import EncoderError, build_encoder, make_datacube
from geofm_assets.models.base import file_digest
from geofm_assets.models.datacube import Datacube
from geofm_assets.models.hf import HFEncoder, image_size, rgb_band_indices


def tiny_vit(directory: Path, *, processor: bool = True, pooler: bool = True) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=pooler).save_pretrained(directory)
    if processor:  # mean and std 0.5
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def chips_datacube(n: int = 3, size: int = 48, seed: int = 0) -> Datacube:
    rng = np.random.default_rng(seed)
    dn = rng.integers(200, 4000, (n, len(SPECTRAL_BAND_NAMES), size, size)).astype(np.uint16)
    return make_datacube(dn, [dt.date(2021, 7, 1)] * n, [-9.1] * n, [-63.0] * n)


def hf_encoder(name: str, checkpoint: Path | None = None) -> HFEncoder:
    """Through the registry, as the pipeline builds it."""
    enc = build_encoder(name, checkpoint=checkpoint)
    assert isinstance(enc, HFEncoder)
    return enc


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


def test_a_saved_vit_loads_and_embeds(vit_dir: Path) -> None:
    enc = hf_encoder(f"hf:{vit_dir}")
    assert enc.name == f"hf:{vit_dir}"
    assert enc.dim == 32
    assert enc.image_size == (32, 32)
    cube = chips_datacube()
    vectors = enc.embed_datacube(cube)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])
    again = build_encoder(f"hf:{vit_dir}").embed_datacube(cube)
    assert np.array_equal(vectors, again)


def test_the_vector_is_the_pooled_output_else_the_cls_token(vit_dir: Path, tmp_path: Path) -> None:
    enc = hf_encoder(f"hf:{vit_dir}")
    images = enc.rgb_images(chips_datacube(2))
    with torch.inference_mode():
        output = enc.model(pixel_values=images)
    assert np.allclose(enc.embed_datacube(chips_datacube(2)), output.pooler_output.numpy(), atol=1e-6)

    no_pooler = hf_encoder(f"hf:{tiny_vit(tmp_path / 'no-pooler', pooler=False)}")
    assert not no_pooler.use_pooler
    with torch.inference_mode():
        tokens = no_pooler.model(pixel_values=no_pooler.rgb_images(chips_datacube(2))).last_hidden_state
    assert np.allclose(no_pooler.embed_datacube(chips_datacube(2)), tokens[:, 0].numpy(), atol=1e-6)


TINY: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def tiny_dinov2() -> PreTrainedModel:
    return Dinov2Model(Dinov2Config(**TINY))


def tiny_clip() -> PreTrainedModel:  # image and text towers: the image tower is used
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "bos_token_id": 0, "eos_token_id": 2}
    return CLIPModel(CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16))


@pytest.mark.parametrize("make", [tiny_dinov2, tiny_clip], ids=["dinov2", "clip"])
def test_other_vision_backbones(make: Callable[[], PreTrainedModel], tmp_path: Path) -> None:
    torch.manual_seed(0)
    make().save_pretrained(tmp_path)
    enc = hf_encoder(f"hf:{tmp_path}")
    assert enc.dim == 32 and enc.use_pooler
    vectors = enc.embed_datacube(chips_datacube(2, size=64))
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


def test_preprocessing_is_true_colour_stretched_and_normalized(vit_dir: Path) -> None:
    enc = hf_encoder(f"hf:{vit_dir}")
    size = 32  # already the model's size: no resampling
    dn = np.zeros((1, len(SPECTRAL_BAND_NAMES), size, size), np.uint16)
    red, green, blue = (SPECTRAL_BAND_NAMES.index(b) for b in ("red", "green", "blue"))
    dn[0, red], dn[0, green], dn[0, blue] = 1500, 3000, 6000  # 0.5, 1.0 and clipped to 1.0
    images = enc.rgb_images(make_datacube(dn, [dt.date(2021, 7, 1)], [0.0], [0.0]))
    expected = (np.array([0.5, 1.0, 1.0]) - 0.5) / 0.5  # the processor's mean and std
    assert images.shape == (1, 3, size, size)
    assert np.allclose(images[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-3)


def test_without_a_processor_the_config_size_and_imagenet_statistics_are_used(tmp_path: Path) -> None:
    enc = hf_encoder(f"hf:{tiny_vit(tmp_path / 'bare', processor=False)}")
    assert enc.image_size == (32, 32)
    assert torch.allclose(enc.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert np.isfinite(enc.embed_datacube(chips_datacube(2, size=256))).all()


def test_the_digest_is_the_weights_file_sha256(vit_dir: Path) -> None:
    enc = hf_encoder(f"hf:{vit_dir}")
    assert enc.checkpoint_digest == file_digest(vit_dir / "model.safetensors")
    assert enc.checkpoint_digest == build_encoder(f"hf:{vit_dir}").checkpoint_digest
    assert enc.checkpoint_digest.startswith("sha256:")


def test_checkpoint_argument_is_the_model_directory(vit_dir: Path) -> None:
    enc = build_encoder("hf:my-org/tiny-vit", checkpoint=vit_dir)
    assert enc.name == "hf:my-org/tiny-vit"
    assert enc.checkpoint_digest == file_digest(vit_dir / "model.safetensors")


def test_a_missing_directory_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=r"does not exist.*huggingface-cli download"):
        build_encoder(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EncoderError, match="is a file"):
        build_encoder(f"hf:{tmp_path / 'model.safetensors'}")


def test_a_model_id_loads_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"  # the layout `huggingface-cli download` leaves behind
    repo = cache / "models--geofm-test--tiny-vit"
    revision = "0123456789abcdef0123456789abcdef01234567"
    tiny_vit(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    enc = hf_encoder("hf:geofm-test/tiny-vit")
    assert enc.directory == repo / "snapshots" / revision
    assert enc.embed_datacube(chips_datacube(1)).shape == (1, 32)


def test_an_uncached_model_id_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(EncoderError) as error:
        build_encoder("hf:geofm-test/not-a-cached-model")
    message = str(error.value)
    assert "huggingface-cli download geofm-test/not-a-cached-model" in message
    assert "save_pretrained" in message and "hf:/path/to/dir" in message


def test_a_directory_without_weights_is_an_encoder_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no weights"):
        build_encoder(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(EncoderError, match="hf:<model id or local directory>"):
        build_encoder("hf:")


def test_rgb_bands_are_found_by_wavelength() -> None:
    assert rgb_band_indices(10) == [2, 1, 0]
    assert rgb_band_indices(4, [0.842, 0.665, 0.560, 0.493]) == [1, 2, 3]
    with pytest.raises(EncoderError, match="red"):
        rgb_band_indices(2, [0.842, 1.61])
    with pytest.raises(EncoderError, match="no wavelengths"):
        rgb_band_indices(4)


def test_image_size_from_processor_settings() -> None:
    assert image_size({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                       "do_center_crop": True}, ViTConfig()) == (224, 224)
    assert image_size({"size": {"shortest_edge": 384}}, ViTConfig()) == (384, 384)
    assert image_size({}, ViTConfig(image_size=64)) == (64, 64)
