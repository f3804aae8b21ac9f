"""The encoder interface every model in the registry implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from geofm_assets.models.datacube import Datacube


class EncoderError(ValueError):
    """A checkpoint that is missing or does not fit the architecture, or bad encoder input."""


class Encoder(ABC):
    name: str  # registry name, e.g. "clay-v1.5"
    dim: int  # embedding dimension
    checkpoint_digest: str  # sha256 of the checkpoint file, or a description of the weights
    # True where ``embed_datacube`` takes ``pixels`` as a float32 tensor already on the encoder's
    # device (the worker then uploads and normalizes the chips on the GPU); else numpy only.
    accepts_device_pixels: bool = False

    @abstractmethod
    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        """[B D] float32, one vector per chip."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when there is a GPU, else the CPU; ``cpu``/``cuda[:N]`` as given, after
    checking that CUDA is there when asked for."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} asked for but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise EncoderError(f"device must be cpu, cuda or auto, got {device!r}")
    return resolved


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()
