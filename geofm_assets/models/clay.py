"""Clay's encoder (``clay-v1``: ViT-B, 768-d; ``clay-v1.5``: ViT-L, 1024-d), written here from the
published code so that Clay's own checkpoints load into it and give the same CLS embedding.

What was matched
----------------
The behaviour of the encoder in Clay-foundation/model:

* v1.5 (weights released 2024-11-19; the model card ``docs/release-notes/specification.md``
  points at ``clay_mae_large`` in ``src/model.py`` at commit
  80012459793cf71f4482b6d0de5254da83f642c6): ``src/model.py`` (``Encoder``), ``src/factory.py``
  (``DynamicEmbedding``, ``WavesTransformer``, ``FCBlock``), ``src/backbone.py`` (``Transformer``,
  ``Attention``, ``FeedForward``), ``src/utils.py`` (``posemb_sincos_2d_with_gsd``,
  ``posemb_sincos_1d``), as shipped in PyPI's ``claymodel==1.5.0`` wheel. With the same weights
  that wheel's ``Encoder`` (mask ratio 0, shuffle off) and this module give bit-identical CPU
  float32 tokens (``tests/models/test_clay.py``, run with ``GEOFM_CLAY_REFERENCE``).
* v1 (``src/model.py`` at commit 34e8b36be9724965043c9c2a3bfd4a3755bce961, ``clay_mae_base``):
  the same encoder except that its ViT blocks came from ``vit_pytorch.simple_vit.Transformer``
  (vit-pytorch 1.6.4, pinned by ``v1-environment.yml``), which has the same parameters (final
  LayerNorm included) and computes softmax(q k^T / sqrt(dim_head)) v explicitly instead of with
  ``scaled_dot_product_attention``; and its ``WavesTransformer`` layer was ``batch_first=False``,
  which does not matter for the unbatched token sequence it is given. (Checked the same way with
  vit-pytorch 1.6.4's blocks in place of ``src/backbone.py``'s.)
* The current ``claymodel/`` package (``model.py``, ``embedding.py``, ``layers.py``, ``utils.py``)
  computes the same encoder forward.

The forward pass, for pixels [B C H W] (z-scored), waves [C] (micrometres, used as they are: no
x1000 as in DOFA), gsd (metres), time [B 4] and latlon [B 4]:

1. waves -> 1-D sin-cos encoding of width 128, frequencies 10000^-(k/63), k = 0..63,
   [sin | cos] -> a residual two-layer GELU MLP (``fclayer``).
2. Weight generator: 128 learned latent tokens, the C wave tokens and one bias token go through one
   post-norm ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 2048, GELU, no dropout);
   ``fc_weight(out + in)`` on the wave tokens gives [C, D*8*8], ``fc_bias`` on the bias token
   gives [D]. The kernel is that weight viewed as [C D 8 8], transposed to [D C 8 8] and scaled by
   0.02; patches are ``F.conv2d(pixels, kernel, bias, stride=8)``, flattened row-major to [B L D].
3. Added to every patch: a 2-D sin-cos position encoding of width D-8 scaled by gsd (frequencies
   gsd * 10000^-(2 k / ((D'/4 - 1) D')), D' = D-8, k = 0..D'/4-1, channel order
   [sin x | cos x | sin y | cos y]), concatenated with [time, latlon] (the last 8 channels, added
   as they are, not projected).
4. No masking (the official encoder at mask_ratio 0 and shuffle off keeps every patch in order);
   the CLS token goes first; pre-norm ViT blocks (x += to_out(attn(LN x)) with a bias-free qkv and
   output projection; x += MLP(LN x) with GELU) and a final LayerNorm.
5. The embedding is the CLS token (index 0); ``patch_embeddings`` are tokens 1..L.

One generalisation: the official code takes the patch grid as sqrt(L) x sqrt(L) and so only
works on square chips; here the grid is (H/8) x (W/8), which is the same for square chips.

Checkpoints
-----------
Keys are those under ``model.encoder.`` in Clay's Lightning checkpoints (``v1/clay-v1-base.ckpt``
and ``v1.5/clay-v1.5.ckpt`` in the Hugging Face repository ``made-with-clay/Clay``). For a tiny
config (dim 32, depth 2, heads 2, dim_head 16, mlp ratio 4, patch 8, wave dim 128, 128 latent
tokens) the module has exactly these (shape in brackets)::

    cls_token [1, 1, 32]
    patch_embedding.weight_generator.weight_tokens [128, 128]
    patch_embedding.weight_generator.bias_token [1, 128]
    patch_embedding.weight_generator.encoder.layers.0.self_attn.in_proj_weight [384, 128]
    patch_embedding.weight_generator.encoder.layers.0.self_attn.in_proj_bias [384]
    patch_embedding.weight_generator.encoder.layers.0.self_attn.out_proj.weight [128, 128]
    patch_embedding.weight_generator.encoder.layers.0.self_attn.out_proj.bias [128]
    patch_embedding.weight_generator.encoder.layers.0.linear1.weight [2048, 128]
    patch_embedding.weight_generator.encoder.layers.0.linear1.bias [2048]
    patch_embedding.weight_generator.encoder.layers.0.linear2.weight [128, 2048]
    patch_embedding.weight_generator.encoder.layers.0.linear2.bias [128]
    patch_embedding.weight_generator.encoder.layers.0.norm1.weight [128]
    patch_embedding.weight_generator.encoder.layers.0.norm1.bias [128]
    patch_embedding.weight_generator.encoder.layers.0.norm2.weight [128]
    patch_embedding.weight_generator.encoder.layers.0.norm2.bias [128]
    patch_embedding.weight_generator.fc_weight.weight [2048, 128]
    patch_embedding.weight_generator.fc_weight.bias [2048]
    patch_embedding.weight_generator.fc_bias.weight [32, 128]
    patch_embedding.weight_generator.fc_bias.bias [32]
    patch_embedding.fclayer.l1.weight [128, 128]
    patch_embedding.fclayer.l1.bias [128]
    patch_embedding.fclayer.l2.weight [128, 128]
    patch_embedding.fclayer.l2.bias [128]
    transformer.norm.weight [32]
    transformer.norm.bias [32]
    transformer.layers.{0,1}.0.norm.weight [32]
    transformer.layers.{0,1}.0.norm.bias [32]
    transformer.layers.{0,1}.0.to_qkv.weight [96, 32]
    transformer.layers.{0,1}.0.to_out.weight [32, 32]
    transformer.layers.{0,1}.1.net.0.weight [32]      (LayerNorm)
    transformer.layers.{0,1}.1.net.0.bias [32]
    transformer.layers.{0,1}.1.net.1.weight [128, 32]
    transformer.layers.{0,1}.1.net.1.bias [128]
    transformer.layers.{0,1}.1.net.3.weight [32, 128]
    transformer.layers.{0,1}.1.net.3.bias [32]

(45 tensors.) The full-size encoders have 92,102,144 (clay-v1) and 311,442,944 (clay-v1.5)
parameters; the v1.5 model card gives "Encoder size: 311M".
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geofm_assets.models.base import Encoder, EncoderError, file_digest, resolve_device
from geofm_assets.models.datacube import Datacube

log = logging.getLogger(__name__)

HF_REPO = "made-with-clay/Clay"
CHECKPOINT_DIR_ENV = "GEOFM_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = Path("~/.cache/geofm/checkpoints")
LIGHTNING_ENCODER_PREFIX = "model.encoder."
METADATA_CHANNELS = 8  # time (4) + latlon (4), the last channels of the position encoding
SINCOS_TEMPERATURE = 10000
KERNEL_SCALE = 0.02  # Clay scales the generated patch kernel by this

# Top-level packages of the hyper-parameter objects a Lightning checkpoint may pickle beside its
# tensors; only these justify loading with weights_only=False (see ``read_encoder_state_dict``).
LIGHTNING_HPARAM_PACKAGES = frozenset(
    {"lightning", "pytorch_lightning", "lightning_fabric", "box", "argparse", "pathlib", "omegaconf",
     "jsonargparse"}
)


@dataclass(frozen=True)
class ClayConfig:
    """The shape of a Clay encoder. The published two are in ``CLAY_CONFIGS``; tests build tiny
    ones with the same code (``dataclasses.replace(CLAY_CONFIGS["clay-v1"], dim=32, ...)``)."""

    name: str
    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_ratio: float = 4.0
    patch_size: int = 8
    wave_dim: int = 128  # width of the wavelength tokens
    num_latent_tokens: int = 128  # learned tokens of the weight generator
    wave_heads: int = 4  # heads of the weight generator's transformer layer
    wave_ff_dim: int = 2048  # its feed-forward width (nn.TransformerEncoderLayer's default)
    checkpoint_file: str = ""  # the file name looked for in the checkpoint directory
    hub_filename: str = ""  # its path in the Hugging Face repository made-with-clay/Clay

    def __post_init__(self) -> None:
        pos_dim = self.dim - METADATA_CHANNELS
        if pos_dim < 8 or pos_dim % 4:
            raise ValueError(
                f"dim - {METADATA_CHANNELS} must be a multiple of 4 and >= 8, got dim={self.dim}"
            )
        if self.wave_dim < 4 or self.wave_dim % 2 or self.wave_dim % self.wave_heads:
            raise ValueError(f"wave_dim must be even, >= 4 and divisible by wave_heads, got {self.wave_dim}")
        if min(self.depth, self.heads, self.dim_head, self.patch_size, self.num_latent_tokens) < 1:
            raise ValueError(f"depth, heads, dim_head, patch_size and num_latent_tokens must be >= 1: {self}")

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head


CLAY_CONFIGS: dict[str, ClayConfig] = {
    "clay-v1": ClayConfig(
        name="clay-v1", dim=768, depth=12, heads=12, dim_head=64, mlp_ratio=4.0,
        checkpoint_file="clay-v1-base.ckpt", hub_filename="v1/clay-v1-base.ckpt",
    ),
    "clay-v1.5": ClayConfig(
        name="clay-v1.5", dim=1024, depth=24, heads=16, dim_head=64, mlp_ratio=4.0,
        checkpoint_file="clay-v1.5.ckpt", hub_filename="v1.5/clay-v1.5.ckpt",
    ),
}


# --- encodings -------------------------------------------------------------------------------


def wavelength_encoding(waves: torch.Tensor, dim: int) -> torch.Tensor:
    """[C] wavelengths (micrometres) -> [C dim]: [sin | cos] of waves * 10000^-(k / (dim/2 - 1))."""
    half = dim // 2
    exponent = torch.arange(half, device=waves.device) / (half - 1)  # [dim/2]
    freqs = 1.0 / (SINCOS_TEMPERATURE**exponent)  # [dim/2]
    angles = waves.float()[:, None] * freqs[None, :]  # [C dim/2]
    return torch.cat((angles.sin(), angles.cos()), dim=1)  # [C dim]


def gsd_position_encoding(h: int, w: int, dim: int, gsd: torch.Tensor | float) -> torch.Tensor:
    """[(h w) dim] for an h x w patch grid, row-major: [sin x | cos x | sin y | cos y], each of
    dim/4 channels at frequencies gsd * 10000^-(2 k / ((dim/4 - 1) dim)). That exponent is
    Clay's (it spans only 10000^0 .. 10000^(-2/dim)); it is reproduced as published."""
    quarter = dim // 4
    gsd = torch.as_tensor(gsd, dtype=torch.float32)  # computed on gsd's device
    exponent = torch.arange(quarter, device=gsd.device) / (quarter - 1)  # [dim/4]
    freqs = 1.0 / (SINCOS_TEMPERATURE ** (2 * exponent / dim)) * gsd  # [dim/4]
    rows, cols = torch.arange(h, device=gsd.device), torch.arange(w, device=gsd.device)
    y, x = torch.meshgrid(rows, cols, indexing="ij")  # [h w] each
    x_angles = x.flatten()[:, None] * freqs[None, :]  # [L dim/4]
    y_angles = y.flatten()[:, None] * freqs[None, :]  # [L dim/4]
    return torch.cat((x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()), dim=1)  # [L dim]


# --- the network (parameter names follow Clay's checkpoint) -----------------------------------


class WaveTokenMLP(nn.Module):
    """Residual two-layer GELU MLP on the wave encodings (Clay's ``fclayer``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [C W] -> [C W]
        return x + F.gelu(self.l2(F.gelu(self.l1(x))))


class KernelGenerator(nn.Module):
    """Generates the patch kernel and bias from the wave tokens (Clay's ``weight_generator``)."""

    def __init__(self, config: ClayConfig) -> None:
        super().__init__()
        width = config.wave_dim
        self.num_latent_tokens = config.num_latent_tokens
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=config.wave_heads,
            dim_feedforward=config.wave_ff_dim,
            dropout=0.0,
            activation="gelu",
            norm_first=False,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(width, config.patch_size**2 * config.dim)
        self.fc_bias = nn.Linear(width, config.dim)
        self.weight_tokens = nn.Parameter(torch.randn(config.num_latent_tokens, width) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, width) * 0.02)

    def forward(self, wave_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[C W] -> (weights [C (D P P)], bias [D])."""
        tokens = torch.cat((self.weight_tokens, wave_tokens, self.bias_token), dim=0)  # [T+C+1 W]
        mixed = self.encoder(tokens)  # [T+C+1 W], one unbatched sequence
        waves_out = mixed[self.num_latent_tokens : -1] + tokens[self.num_latent_tokens : -1]  # [C W]
        return self.fc_weight(waves_out), self.fc_bias(mixed[-1])  # [C (D P P)], [D]


class WavelengthPatchEmbedding(nn.Module):
    """Patchifies [B C H W] with a kernel generated from the band wavelengths (Clay's
    ``DynamicEmbedding``, after DOFA)."""

    def __init__(self, config: ClayConfig) -> None:
        super().__init__()
        self.dim = config.dim
        self.patch_size = config.patch_size
        self.wave_dim = config.wave_dim
        self.weight_generator = KernelGenerator(config)
        self.fclayer = WaveTokenMLP(config.wave_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def kernel(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[C] wavelengths -> (kernel [D C P P], already scaled by 0.02; bias [D])."""
        p = self.patch_size
        wave_tokens = self.fclayer(wavelength_encoding(waves, self.wave_dim))  # [C W]
        weights, bias = self.weight_generator(wave_tokens)  # [C (D P P)], [D]
        kernel = weights.reshape(waves.shape[0], self.dim, p, p).transpose(0, 1)  # [D C P P]
        return kernel * KERNEL_SCALE, bias

    def forward(self, pixels: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
        kernel, bias = self.kernel(waves)  # [D C P P], [D]
        patches = F.conv2d(pixels, kernel, bias, stride=self.patch_size)  # [B D h w]
        return patches.flatten(2).transpose(1, 2)  # [B (h w) D]


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with bias-free projections (vit-pytorch's)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B N D]
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)  # 3 x [B N (h d)]
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B h N d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B h N d], scale 1/sqrt(d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # [B N D]


class FeedForward(nn.Module):
    """Pre-norm GELU MLP; ``net`` indices 0 (LayerNorm), 1 and 3 (Linear) carry the weights."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B N D] -> [B N D]
        return self.net(x)


class TransformerStack(nn.Module):
    """``depth`` pre-norm blocks (attention, then MLP, each residual) and a final LayerNorm."""

    def __init__(self, config: ClayConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    SelfAttention(config.dim, config.heads, config.dim_head),
                    FeedForward(config.dim, config.mlp_dim),
                ]
            )
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B N D] -> [B N D]
        for block in self.layers:
            attention, feed_forward = cast(nn.ModuleList, block)
            x = attention(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


class ClayEncoderModel(nn.Module):
    """Clay's encoder network; its ``state_dict`` is the checkpoint's ``model.encoder.*``."""

    def __init__(self, config: ClayConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.patch_embedding = WavelengthPatchEmbedding(config)
        self.transformer = TransformerStack(config)

    def position_and_metadata(
        self, h: int, w: int, gsd: torch.Tensor, time: torch.Tensor, latlon: torch.Tensor
    ) -> torch.Tensor:
        """[B (h w) D]: the gsd-scaled grid encoding (D-8 channels), then time and latlon (8)."""
        b, length = time.shape[0], h * w
        grid = gsd_position_encoding(h, w, self.config.dim - METADATA_CHANNELS, gsd)  # [L D-8]
        grid = grid.to(time.device)[None].expand(b, length, -1)  # [B L D-8]
        metadata = torch.cat((time, latlon), dim=1)[:, None, :].expand(b, length, -1)  # [B L 8]
        return torch.cat((grid, metadata), dim=-1)  # [B L D]

    def forward(
        self,
        pixels: torch.Tensor,
        time: torch.Tensor,
        latlon: torch.Tensor,
        gsd: torch.Tensor,
        waves: torch.Tensor,
    ) -> torch.Tensor:
        """pixels [B C H W], time [B 4], latlon [B 4], gsd [], waves [C] -> tokens [B 1+L D],
        the CLS token first."""
        b, _, height, width = pixels.shape
        p = self.config.patch_size
        patches = self.patch_embedding(pixels, waves)  # [B L D]
        patches = patches + self.position_and_metadata(height // p, width // p, gsd, time, latlon)
        cls = self.cls_token.expand(b, -1, -1)  # [B 1 D]
        return self.transformer(torch.cat((cls, patches), dim=1))  # [B 1+L D]


# --- checkpoints -------------------------------------------------------------------------------


def clay_config(name: str) -> ClayConfig:
    try:
        return CLAY_CONFIGS[name]
    except KeyError:
        raise EncoderError(f"unknown Clay model {name!r}; known: {', '.join(sorted(CLAY_CONFIGS))}") from None


def default_checkpoint_dir() -> Path:
    """``$GEOFM_CHECKPOINT_DIR``, else ``~/.cache/geofm/checkpoints``."""
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR).expanduser()


def missing_checkpoint_message(config: ClayConfig, path: Path) -> str:
    url = f"https://huggingface.co/{HF_REPO}/resolve/main/{config.hub_filename}"
    return (
        f"no checkpoint for {config.name}: {path} does not exist. Nothing is downloaded "
        f"automatically: get {config.hub_filename!r} from the Hugging Face repository {HF_REPO} "
        f"({url}) and save it as {path.parent / config.checkpoint_file} (the checkpoint directory "
        f"is {path.parent}; set {CHECKPOINT_DIR_ENV} to use another, or pass a checkpoint path)."
    )


def _load_torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:
            raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({refused}; {exc})") from exc
        packages = {name.split(".")[0] for name in unsafe}
        if not unsafe or not packages <= LIGHTNING_HPARAM_PACKAGES:
            raise EncoderError(
                f"{path}: refused to unpickle (weights_only=True failed and the file names objects "
                f"that are not Lightning hyper-parameters: {', '.join(sorted(unsafe)) or refused}). "
                "Save the encoder's state dict with torch.save and load that instead."
            ) from refused
        # A Lightning checkpoint pickles its hyper-parameters (argparse Namespace, Box, ...) beside
        # the tensors and the restricted unpickler refuses them. Full unpickling can run code from
        # the file, so it is done only when every object the file names comes from those
        # hyper-parameter packages; the tensors read are the same either way.
        log.warning("%s: loading with weights_only=False for its Lightning hyper-parameters %s", path, unsafe)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    except Exception as exc:
        raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


def read_encoder_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a Lightning checkpoint (``state_dict`` keys under
    ``model.encoder.``; decoder, teacher and other keys are ignored) or from a plain encoder
    state dict (keys without the prefix)."""
    obj = _load_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise EncoderError(
            f"{path}: expected a Lightning checkpoint or a state dict, got {type(obj).__name__}"
        )
    if any(str(k).startswith(LIGHTNING_ENCODER_PREFIX) for k in obj):
        obj = {k[len(LIGHTNING_ENCODER_PREFIX) :]: v for k, v in obj.items()
               if str(k).startswith(LIGHTNING_ENCODER_PREFIX)}
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise EncoderError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:20])}")
    return {str(k): v for k, v in obj.items()}


def _listing(lines: list[str], limit: int = 25) -> str:
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return "".join(f"\n    {line}" for line in shown)


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, config: ClayConfig) -> None:
    """Raise ``EncoderError`` listing every missing, unexpected and wrongly shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [f"{k} {list(expected[k])}" for k in expected if k not in found]
    unexpected = [f"{k} {list(found[k])}" for k in found if k not in expected]
    wrong = [
        f"{k}: expected {list(expected[k])}, checkpoint has {list(found[k])}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [
        f"{path}: checkpoint does not fit the {config.name} encoder (dim {config.dim}, depth "
        f"{config.depth}, heads {config.heads}, dim_head {config.dim_head})"
    ]
    if missing:
        parts.append(f"  missing keys ({len(missing)}):{_listing(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}):{_listing(unexpected)}")
    if wrong:
        parts.append(f"  wrong shapes ({len(wrong)}):{_listing(wrong)}")
    cls_shape = found.get("cls_token")
    if cls_shape and cls_shape[-1] != config.dim:
        fits = [c.name for c in CLAY_CONFIGS.values() if c.dim == cls_shape[-1]]
        hint = f": is it {' or '.join(fits)}?" if fits else ""
        parts.append(f"  its cls_token is {cls_shape[-1]}-d{hint}")
    raise EncoderError("\n".join(parts))


# --- the Encoder -------------------------------------------------------------------------------


class ClayEncoder(Encoder):
    """A Clay encoder with its weights, embedding datacubes (``models/datacube.py``).

    Inference runs under ``torch.inference_mode`` in eval mode; on CUDA under bf16 autocast, on
    CPU in float32 unless ``cpu_bf16``. Outputs are float32 numpy arrays."""

    def __init__(
        self,
        model: ClayEncoderModel,
        *,
        checkpoint_digest: str,
        name: str | None = None,
        device: str | torch.device = "cpu",
        cpu_bf16: bool = False,
        compile: bool = False,
    ) -> None:
        self.config = model.config
        self.name = name or model.config.name
        self.dim = model.config.dim
        self.checkpoint_digest = checkpoint_digest
        self.device = resolve_device(device)
        self.cpu_bf16 = cpu_bf16
        self.model = model.to(self.device).eval()
        # torch.compile fuses the layer norms, casts, GELU and residual adds between the GEMMs;
        # shapes are static (one compile per batch shape: the worker pads its last batch).
        self.compiled = compile
        self._net: Any = torch.compile(self.model, dynamic=False) if compile else self.model

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | str,
        config: ClayConfig,
        device: str | torch.device = "cpu",
        *,
        name: str | None = None,
        cpu_bf16: bool = False,
        compile: bool = False,
    ) -> ClayEncoder:
        """Load ``path`` strictly into a ``config`` encoder (see ``read_encoder_state_dict``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise EncoderError(missing_checkpoint_message(config, path))
        state = read_encoder_state_dict(path)
        with torch.device("meta"):  # no memory or init time for weights about to be replaced
            model = ClayEncoderModel(config)
        check_fits(model, state, path, config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return cls(model, checkpoint_digest=file_digest(path), name=name, device=device, cpu_bf16=cpu_bf16,
                   compile=compile)

    # ``datacube["pixels"]`` may be a float32 tensor already on ``self.device`` (the worker
    # uploads and normalizes on the GPU); it is used in place then.
    accepts_device_pixels = True

    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        """[B D] float32: the CLS token (only it leaves the device)."""
        return self._forward(datacube)[:, 0].float().cpu().numpy()

    def patch_embeddings(self, datacube: Datacube) -> np.ndarray:
        """[B N D] float32: the patch tokens after the CLS token, N = (H/8)(W/8), row-major."""
        return self.tokens(datacube)[:, 1:].numpy()

    def forward_pooled(
        self, datacube: Datacube, grid: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One forward pass, left on the device and not waited for: ``[B D]`` float32 CLS
        embeddings; ``[B g g D]`` float16 patch tokens average-pooled from the h x w token grid
        to ``grid`` x ``grid`` cells, row-major from the chip's north-west corner (None when
        ``grid`` is 0); and a 0-d bool, True when every value of both is finite."""
        tokens = self._forward(datacube)
        emb = tokens[:, 0].float()
        if not grid:
            return emb, None, torch.isfinite(emb).all()
        b, n_tokens, d = tokens.shape
        p = self.config.patch_size
        h, w = (int(s) // p for s in datacube["pixels"].shape[-2:])
        if h * w != n_tokens - 1 or h % grid or w % grid:
            raise EncoderError(
                f"the {h} x {w} patch-token grid does not divide into {grid} x {grid} cells: choose a "
                "spatial_grid that divides it (e.g. 16 or 8 for 256 px chips)"
            )
        # one reduction over each cell's tokens, accumulated in float32 (no upcast copy)
        cells6 = tokens[:, 1:].reshape(b, grid, h // grid, grid, w // grid, d)
        cells = cells6.mean(dim=(2, 4), dtype=torch.float32).to(torch.float16)  # [B g g D]
        return emb, cells, torch.isfinite(emb).all() & torch.isfinite(cells).all()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _inputs(self, datacube: Datacube) -> tuple[torch.Tensor, ...]:
        missing = [k for k in ("pixels", "time", "latlon", "gsd", "waves") if k not in datacube]
        if missing:
            raise EncoderError(f"datacube lacks {', '.join(missing)}")

        def tensor(key: str) -> torch.Tensor:
            return torch.as_tensor(datacube[key], dtype=torch.float32, device=self.device)

        pixels, time, latlon, waves = tensor("pixels"), tensor("time"), tensor("latlon"), tensor("waves")
        p = self.config.patch_size
        if pixels.ndim != 4:
            raise EncoderError(f"pixels must be [B C H W], got shape {tuple(pixels.shape)}")
        b, c, h, w = pixels.shape
        if h % p or w % p or h == 0 or w == 0:
            raise EncoderError(f"pixel height and width must be positive multiples of {p}, got {h} x {w}")
        if waves.shape != (c,):
            raise EncoderError(
                f"waves must be [C] with one wavelength per band ({c}), got {tuple(waves.shape)}"
            )
        for key, value in (("time", time), ("latlon", latlon)):
            if value.shape != (b, 4):
                raise EncoderError(f"{key} must be [B 4] = ({b}, 4), got {tuple(value.shape)}")
        gsd = tensor("gsd")
        if gsd.numel() != 1:
            raise EncoderError(f"gsd must be one number (metres), got shape {tuple(gsd.shape)}")
        return pixels, time, latlon, gsd.reshape(()), waves

    def tokens(self, datacube: Datacube) -> torch.Tensor:
        """[B 1+L D] float32 on the CPU: the encoder output, CLS token first."""
        return self._forward(datacube).float().cpu()

    def _forward(self, datacube: Datacube) -> torch.Tensor:
        """[B 1+L D] on ``self.device`` (bf16 under autocast): the encoder output."""
        pixels, time, latlon, gsd, waves = self._inputs(datacube)
        with torch.inference_mode(), self._autocast():
            return self._net(pixels, time, latlon, gsd, waves)  # [B 1+L D]


def build_clay_encoder(
    name: str,
    checkpoint: Path | str | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: Path | str | None = None,
    *,
    cpu_bf16: bool = False,
    compile: bool = False,
) -> ClayEncoder:
    """The ``name`` encoder ("clay-v1" or "clay-v1.5") with weights from ``checkpoint``, else
    from the published file name in ``checkpoint_dir`` (default ``$GEOFM_CHECKPOINT_DIR``, else
    ``~/.cache/geofm/checkpoints``). Nothing is downloaded."""
    config = clay_config(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
    else:
        directory = default_checkpoint_dir() if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
        path = directory / config.checkpoint_file
    return ClayEncoder.from_checkpoint(path, config, device, name=name, cpu_bf16=cpu_bf16, compile=compile)


def parameter_count(config: ClayConfig) -> int:
    """Number of encoder parameters for ``config``, counted on the meta device (no allocation)."""
    with torch.device("meta"):
        model = ClayEncoderModel(config)
    return sum(math.prod(p.shape) for p in model.parameters())
