"""The encoder interface every model in the registry implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from geofm_assets.models.datacube import Datacube


class EncoderError(ValueError):
    """A checkpoint that is missing or does not fit the architecture, or bad encoder input."""


class Encoder(ABC):
    name: str  # registry name, e.g. "clay-v1.5"
    dim: int  # embedding dimension
    checkpoint_digest: str  # sha256 of the checkpoint file, or a description of the weights

    @abstractmethod
    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        """[B D] float32, one vector per chip."""


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()
