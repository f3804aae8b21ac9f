"""The encoder registry: every encoder is built by name from one dict (as torchgeo's
``models/api.py`` does).

    enc = build_encoder("rcf")                     # or "clay-v1", "clay-v1.5", "hf:<id or dir>"
    emb = enc.embed_datacube(make_datacube(...))   # [B enc.dim] float32

Model code is imported when its encoder is built, so ``rcf`` never loads transformers or Clay.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from geofm_assets.models.base import Encoder, EncoderError
from geofm_assets.models.datacube import make_datacube

# builder(argument after "hf:" or "", checkpoint, device, checkpoint_dir) -> Encoder
EncoderBuilder = Callable[[str, Path | None, str, Path | None, bool], Encoder]


def _clay(name: str) -> EncoderBuilder:
    def build(_: str, checkpoint: Path | None, device: str, checkpoint_dir: Path | None,
              compile: bool) -> Encoder:
        from geofm_assets.models.clay import build_clay_encoder

        return build_clay_encoder(name, checkpoint=checkpoint, device=device,
                                  checkpoint_dir=checkpoint_dir, compile=compile)

    return build


def _no_compile(name: str, compile: bool) -> None:
    if compile:
        raise EncoderError(f"compile applies to the clay-* encoders, not {name}: leave it off")


def _rcf(_: str, checkpoint: Path | None, device: str, checkpoint_dir: Path | None,
         compile: bool) -> Encoder:
    _no_compile("rcf", compile)
    if checkpoint is not None:
        raise EncoderError(f"rcf is weight-free and takes no checkpoint, got {checkpoint}")
    from geofm_assets.models.rcf import RCFEncoder

    return RCFEncoder()  # runs on the CPU whatever the device: cheap, and identical everywhere


def _hf(source: str, checkpoint: Path | None, device: str, checkpoint_dir: Path | None,
        compile: bool) -> Encoder:
    _no_compile(f"hf:{source}", compile)
    from geofm_assets.models.hf import build_hf_encoder

    return build_hf_encoder(source, checkpoint=checkpoint, device=device)


HF_PREFIX = "hf:"
ENCODERS: dict[str, EncoderBuilder] = {
    "clay-v1": _clay("clay-v1"),
    "clay-v1.5": _clay("clay-v1.5"),
    "rcf": _rcf,
    HF_PREFIX: _hf,  # "hf:<model id or local directory>"
}
ENCODER_NAMES: tuple[str, ...] = tuple(
    f"{key}<model id or local directory>" if key == HF_PREFIX else key for key in ENCODERS)


def build_encoder(
    name: str,
    checkpoint: Path | str | None = None,
    device: str = "cpu",
    *,
    checkpoint_dir: Path | str | None = None,
    compile: bool = False,
) -> Encoder:
    """The encoder registered as ``name``. ``checkpoint`` is a weights file (Clay) or a model
    directory (hf); ``checkpoint_dir`` is where Clay looks for its default checkpoint file;
    ``compile`` runs a Clay encoder through ``torch.compile`` (worth it on a GPU, for long runs:
    the first batch pays the compile)."""
    key, argument = (HF_PREFIX, name[len(HF_PREFIX):]) if name.startswith(HF_PREFIX) else (name, "")
    if key not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODER_NAMES)}")
    return ENCODERS[key](
        argument,
        None if checkpoint is None else Path(checkpoint),
        device,
        None if checkpoint_dir is None else Path(checkpoint_dir),
        compile,
    )


__all__ = [
    "ENCODERS",
    "ENCODER_NAMES",
    "Encoder",
    "EncoderError",
    "build_encoder",
    "make_datacube",
]
