"""``hf:<model id or local directory>``: a transformers vision backbone (ViT, DINOv2, CLIP or
SigLIP vision...) fed the chip's true-colour bands.

Nothing is downloaded: a directory is loaded as it is, a model id only from the local Hugging
Face cache (``local_files_only``). The chip's red, green and blue bands are taken back to DN,
stretched to [0, 1] with a fixed reflectance range (``REFLECTANCE_WHITE``: reflectance 0.3 is
white, as true-colour Sentinel-2 previews do), resized to the model's input size and normalized
with its image processor's mean and std. The vector is ``pooler_output`` where the model has a
trained one, else the CLS token (index 0) of ``last_hidden_state``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geofm_assets.bands import BANDS_BY_NAME, SPECTRAL_BAND_NAMES
from geofm_assets.models.base import Encoder, EncoderError, file_digest, resolve_device
from geofm_assets.models.datacube import Datacube, denormalize_pixels

RGB_BANDS: tuple[str, str, str] = ("red", "green", "blue")
REFLECTANCE_WHITE_DN = 3000.0  # DN (reflectance x 10000) shown as 1.0; darker is linear, brighter clips
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WAVELENGTH_TOLERANCE = 0.005  # micrometres, to find a band in the datacube's "waves"


class HFEncoder(Encoder):
    """A transformers vision backbone loaded from a local directory (see ``resolve_model_dir``)."""

    def __init__(self, source: str, *, directory: Path | None = None, device: str = "cpu",
                 batch_size: int = 16) -> None:
        self.name = f"hf:{source}"
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.directory = resolve_model_dir(source) if directory is None else Path(directory)
        if not self.directory.is_dir():
            raise EncoderError(f"hf checkpoint directory {self.directory} does not exist. "
                               + fetch_instructions(source))
        self.checkpoint_digest = weights_digest(self.directory)
        self.model, self.use_pooler = load_backbone(self.directory)
        self.model.to(self.device).eval()
        config = self.model.config
        self.dim = hidden_size(config)
        preprocessing = read_preprocessor_config(self.directory)
        self.image_size = image_size(preprocessing, config)
        normalize = preprocessing.get("do_normalize", True)
        mean = preprocessing.get("image_mean", IMAGENET_MEAN) if normalize else (0.0, 0.0, 0.0)
        std = preprocessing.get("image_std", IMAGENET_STD) if normalize else (1.0, 1.0, 1.0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        images = self.rgb_images(datacube)  # [B 3 h w], normalized for the model
        out = np.empty((images.shape[0], self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device)
                vectors = self.forward(batch)
                if vectors.shape[1] != self.dim:
                    raise EncoderError(
                        f"{self.name} returned {vectors.shape[1]}-d vectors, config says {self.dim}")
                out[start : start + len(batch)] = vectors.float().cpu().numpy()
        return out

    def rgb_images(self, datacube: Datacube) -> torch.Tensor:
        """[B 3 h w] float32: true colour at the model's size, normalized with its mean/std."""
        pixels = np.asarray(datacube["pixels"])
        if pixels.ndim != 4:
            raise EncoderError(f"{self.name} expects pixels [B C H W], got shape {pixels.shape}")
        index = rgb_band_indices(pixels.shape[1], datacube.get("waves"))
        dn = denormalize_pixels(pixels[:, index].astype(np.float32), RGB_BANDS)  # [B 3 H W]
        rgb = torch.from_numpy(np.clip(dn / REFLECTANCE_WHITE_DN, 0.0, 1.0).astype(np.float32))
        if tuple(rgb.shape[-2:]) != self.image_size:
            rgb = F.interpolate(rgb, size=self.image_size, mode="bilinear", align_corners=False,
                                antialias=True)
        return (rgb - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B 3 h w] -> [B D]: the pooled output, else the CLS token."""
        output = self.model(pixel_values=images)
        pooled = getattr(output, "pooler_output", None)
        if self.use_pooler and pooled is not None:
            return pooled.flatten(1)
        hidden = output.last_hidden_state
        if hidden.ndim == 3:  # [B N D] tokens: CLS is index 0
            return hidden[:, 0]
        return hidden.mean(dim=(2, 3))  # [B D h w] feature maps (convolutional backbones)


def fetch_instructions(source: str) -> str:
    return (
        "Nothing is downloaded at run time. Fetch the model once, e.g. "
        f"`huggingface-cli download {source}` (into the local Hugging Face cache, then use "
        f"hf:{source}), or `AutoModel.from_pretrained('{source}').save_pretrained('/path/to/dir')` "
        "with its image processor, then use hf:/path/to/dir."
    )


def resolve_model_dir(source: str) -> Path:
    """A local directory as it is; otherwise a model id looked up in the local HF cache only."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise EncoderError(f"hf:{source} is a file: pass the directory that holds config.json and "
                           "the weights")
    if source.startswith(("/", "./", "../", "~")):
        raise EncoderError(f"hf model directory {source} does not exist. " + fetch_instructions(source))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        raise EncoderError(
            f"hf model {source!r} is neither a directory nor in the local Hugging Face cache "
            f"({type(error).__name__}). " + fetch_instructions(source)
        ) from error


def weights_digest(directory: Path) -> str:
    """sha256 of the weights file; for a sharded checkpoint, of its shards' digests in order."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return file_digest(directory / name)
    for index_name in SHARD_INDEXES:
        if (directory / index_name).is_file():
            index = json.loads((directory / index_name).read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            h = hashlib.sha256()
            for shard in shards:
                h.update(f"{shard} {file_digest(directory / shard)}\n".encode())
            return "sha256:" + h.hexdigest()
    raise EncoderError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES + SHARD_INDEXES)}")


def load_backbone(directory: Path) -> tuple[torch.nn.Module, bool]:
    """The vision model in ``directory`` and whether its pooler is trained (has weights)."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(
            directory, local_files_only=True, output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise EncoderError(f"cannot load a transformers model from {directory}: {error}") from error
    missing = {k for k in info.get("missing_keys", ()) if "pooler" not in k.split(".")}
    if missing or info.get("mismatched_keys"):
        raise EncoderError(
            f"the weights in {directory} do not fit {type(model).__name__}: missing "
            f"{sorted(missing)[:5]}, mismatched {sorted(info.get('mismatched_keys', ()))[:5]}")
    use_pooler = not any("pooler" in k.split(".") for k in info.get("missing_keys", ()))
    vision = getattr(model, "vision_model", None)  # CLIP / SigLIP: the image tower alone
    if isinstance(vision, torch.nn.Module):
        vision.config = getattr(model.config, "vision_config", model.config)
        return vision, use_pooler
    return model, use_pooler


def hidden_size(config: Any) -> int:
    config = getattr(config, "vision_config", None) or config
    if isinstance(getattr(config, "hidden_size", None), int):
        return int(config.hidden_size)
    sizes = getattr(config, "hidden_sizes", None)  # convolutional backbones
    if sizes:
        return int(sizes[-1])
    raise EncoderError(f"cannot tell the embedding size of {type(config).__name__}")


def read_preprocessor_config(directory: Path) -> dict[str, Any]:
    """The image processor's settings saved beside the model ({} when there are none)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return {}
    settings: dict[str, Any] = json.loads(path.read_text())
    return settings


def image_size(preprocessing: dict[str, Any], config: Any) -> tuple[int, int]:
    """(height, width) the model is fed: the processor's crop or resize target, else the
    config's image size. Chips are square, so a shortest-edge size is the side."""
    sizes: list[Any] = []
    if preprocessing.get("do_center_crop"):
        sizes.append(preprocessing.get("crop_size"))
    sizes.append(preprocessing.get("size"))
    for size in sizes:
        if isinstance(size, int):
            return size, size
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                return int(size["height"]), int(size["width"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
    vision = getattr(config, "vision_config", None) or config
    side = getattr(vision, "image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(side, (list, tuple)):
        return int(side[0]), int(side[1])
    return int(side), int(side)


def rgb_band_indices(n_bands: int, waves: Any = None) -> list[int]:
    """Indices of red, green, blue among the datacube's bands: by wavelength when the datacube
    carries them, else by position in ``SPECTRAL_BAND_NAMES``."""
    if waves is not None:
        waves = np.asarray(waves, np.float64)
        if waves.shape != (n_bands,):
            raise EncoderError(f"datacube has {n_bands} bands but {waves.size} wavelengths")
        index = []
        for name in RGB_BANDS:
            hits = np.flatnonzero(np.abs(waves - BANDS_BY_NAME[name].wavelength) < WAVELENGTH_TOLERANCE)
            if hits.size == 0:
                raise EncoderError(f"hf encoders need the {name} band "
                                   f"({BANDS_BY_NAME[name].wavelength} µm); datacube has {waves.tolist()}")
            index.append(int(hits[0]))
        return index
    if n_bands != len(SPECTRAL_BAND_NAMES):
        raise EncoderError(f"datacube has {n_bands} bands and no wavelengths: cannot find red, "
                           f"green, blue (expected {len(SPECTRAL_BAND_NAMES)} bands in "
                           f"bands.SPECTRAL_BAND_NAMES order)")
    return [SPECTRAL_BAND_NAMES.index(name) for name in RGB_BANDS]


def build_hf_encoder(source: str, checkpoint: Path | None = None, device: str = "cpu") -> HFEncoder:
    """``source`` is the part after ``hf:``; ``checkpoint``, when given, is the directory that
    holds that model's files."""
    if not source:
        raise EncoderError("hf encoders are named hf:<model id or local directory>, got 'hf:'")
    return HFEncoder(source, directory=checkpoint, device=device)
