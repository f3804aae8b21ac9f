"""The encoder registry: one dict of names, clear errors, and the clay-* names routed to clay.py
(replaced here by a stand-in module, so these tests do not depend on Clay's code)."""

from __future__ import annotations

import datetime as dt
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from geofm_assets.models import (
    ENCODER_NAMES,
    ENCODERS,
    Encoder,
    EncoderError,
    build_encoder,
    make_datacube,
)
from geofm_assets.models.datacube import Datacube


class StandInEncoder(Encoder):
    def __init__(self, name: str, dim: int) -> None:
        self.name, self.dim, self.checkpoint_digest = name, dim, "stand-in"

    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        return np.zeros((len(datacube["pixels"]), self.dim), np.float32)


@pytest.fixture
def clay_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stand in for geofm_assets.models.clay; returns the calls build_clay_encoder received."""
    calls: list[dict[str, Any]] = []

    def build_clay_encoder(name: str, checkpoint: Path | None = None, device: str = "cpu",
                           checkpoint_dir: Path | None = None, compile: bool = False) -> Encoder:
        calls.append({"name": name, "checkpoint": checkpoint, "device": device,
                      "checkpoint_dir": checkpoint_dir, "compile": compile})
        return StandInEncoder(name, 768 if name == "clay-v1" else 1024)

    module = types.ModuleType("geofm_assets.models.clay")
    module.build_clay_encoder = build_clay_encoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "geofm_assets.models.clay", module)
    return calls


def test_the_names() -> None:
    assert ENCODER_NAMES == ("clay-v1", "clay-v1.5", "rcf", "hf:<model id or local directory>")
    assert set(ENCODERS) == {"clay-v1", "clay-v1.5", "rcf", "hf:"}


@pytest.mark.parametrize("name", ["clay", "clay-v2", "RCF", "hf", "dinov2", ""])
def test_an_unknown_name_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(EncoderError) as error:
        build_encoder(name)
    message = str(error.value)
    assert f"unknown encoder {name!r}" in message
    for valid in ENCODER_NAMES:
        assert valid in message


def test_rcf_takes_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="rcf is weight-free and takes no checkpoint"):
        build_encoder("rcf", checkpoint=tmp_path / "weights.ckpt")


def test_rcf_embeds_a_datacube() -> None:
    dn = np.full((2, 10, 16, 16), 1500, np.uint16)
    dn[1, :, ::2] = 2500
    cube = make_datacube(dn, [dt.date(2021, 7, 1)] * 2, [-9.1] * 2, [-63.0] * 2)
    enc = build_encoder("rcf")
    vectors = enc.embed_datacube(cube)
    assert vectors.shape == (2, enc.dim) and vectors.dtype == np.float32


@pytest.mark.parametrize(("name", "dim"), [("clay-v1", 768), ("clay-v1.5", 1024)])
def test_clay_names_route_to_clay(clay_calls: list[dict[str, Any]], name: str, dim: int,
                                  tmp_path: Path) -> None:
    enc = build_encoder(name, checkpoint=str(tmp_path / "clay.ckpt"), device="cuda:0",
                        checkpoint_dir=tmp_path)
    assert (enc.name, enc.dim) == (name, dim)
    assert clay_calls == [{"name": name, "checkpoint": tmp_path / "clay.ckpt", "device": "cuda:0",
                           "checkpoint_dir": tmp_path, "compile": False}]
    build_encoder(name, compile=True)
    assert clay_calls[1] == {"name": name, "checkpoint": None, "device": "cpu",
                             "checkpoint_dir": None, "compile": True}


def test_rcf_does_not_build_clay(clay_calls: list[dict[str, Any]]) -> None:
    build_encoder("rcf")
    assert clay_calls == []


@pytest.mark.parametrize("name", ["rcf", "hf:/nowhere"])
def test_compile_is_refused_for_encoders_other_than_clay(name: str) -> None:
    with pytest.raises(EncoderError, match="compile applies to the clay-"):
        build_encoder(name, compile=True)


def test_a_missing_clay_checkpoint_is_an_encoder_error(tmp_path: Path) -> None:
    pytest.importorskip("geofm_assets.models.clay")
    with pytest.raises(EncoderError):
        build_encoder("clay-v1", checkpoint=tmp_path / "missing.ckpt")
