"""``rcf``: random convolutional features (MOSAIKS, Rolf et al. 2021), weight-free and seeded.

MOSAIKS convolves images with ZCA-whitened patches drawn from the data set and keeps the
spatial means of ``relu(conv - b)`` and ``relu(-conv - b)``. Whitening is what makes random
filters see texture: unwhitened, a random filter mostly sums its patch, so it measures the
chip's colour and little else. This encoder may not look at the data set it serves (a chip is
embedded alone, the same whatever else is in the batch), so it whitens each chip with that
chip's own statistics and draws its filters from a seed. Two blocks:

* texture (``dim/2 - dim/8`` filters by default): the chip's patches [C p p], sampled on a
  stride, give its patch covariance; a regularized ZCA transform of that covariance maps each
  patch into a whitened space where fixed random unit-norm filters are applied (the transform is
  folded into the filters: one matrix product per chip). The regularizer is ``zca_eps`` times
  the chip's mean eigenvalue plus an absolute floor near the sensor noise, so strong directions
  are equalized, weak ones are not blown up into noise, and a featureless chip stays
  featureless instead of being stretched to unit contrast. Centred on the chip's mean and
  scaled by its own contrast, this block does not see the chip's colour: it carries spatial
  (and spatio-spectral) structure. Per-chip whitening alone would lose the spectra, which is
  most of what tells forest from pasture from water, hence
* spectral (``dim/8`` filters): 1x1 random filters on the z-scored pixels themselves (averaged
  over 2x2 pixels: 20 m, the native size of six of the ten bands), i.e. the chip's spectral
  composition: how much water, vegetation, soil. Weighted by ``spectral_weight``.

Features: ``[relu(t - b), relu(-t - b)]`` texture means over at most ``max_positions`` patches
(a regular grid), then ``spectral_weight * [relu(s - c), relu(-s - c)]``: ``dim`` in all.
The thresholds b ~ U(0, 0.3) and c ~ U(-1, 1) are drawn from the seed with the filters.

``feature_map`` keeps the same features before their spatial mean, pooled to a 32 x 32 grid
(as Clay's patch tokens are laid out), for the segmentation decoder in ``geofm_assets.heads``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from geofm_assets.models.base import Encoder, EncoderError
from geofm_assets.models.datacube import Datacube

MAX_COVARIANCE_PATCHES = 4096  # patches sampled (on a fixed stride) for a chip's covariance
FILTER_CHUNK = 32  # texture filters convolved at a time


class RCFEncoder(Encoder):
    """Random convolutional features over per-chip ZCA-whitened patches, plus 1x1 spectral
    features. Any number of bands; chips at least ``patch_size`` pixels on a side."""

    name = "rcf"

    def __init__(
        self,
        dim: int = 512,
        *,
        seed: int = 0,
        patch_size: int = 3,
        spectral_filters: int | None = None,  # default dim // 8
        zca_eps: float = 3.0,  # ZCA regularizer, in units of the chip's mean eigenvalue
        noise_floor: float = 3e-5,  # absolute ZCA regularizer, z-score² (~10 DN at std 1800)
        texture_bias: float = 0.3,  # texture thresholds ~ U(0, texture_bias)
        spectral_bias: float = 1.0,  # spectral thresholds ~ U(-spectral_bias, spectral_bias)
        spectral_weight: float = 0.2,
        max_positions: int = 8192,  # texture responses averaged over at most this many patches
        spectral_pool: int = 2,  # spectra averaged over pool x pool pixels (20 m, as six bands are)
    ) -> None:
        if dim < 4 or dim % 2:
            raise EncoderError(f"rcf dim must be even and at least 4, got {dim}")
        n_spectral = dim // 8 if spectral_filters is None else spectral_filters
        n_texture = dim // 2 - n_spectral
        if n_spectral < 1 or n_texture < 1:
            raise EncoderError(
                f"rcf dim {dim} with {n_spectral} spectral filters leaves no texture filters")
        if patch_size < 1 or max_positions < 1 or spectral_pool < 1:
            raise EncoderError("rcf patch_size, max_positions and spectral_pool must be positive")
        self.dim = dim
        self.seed = seed
        self.patch_size = patch_size
        self.n_texture = n_texture
        self.n_spectral = n_spectral
        self.zca_eps = zca_eps
        self.noise_floor = noise_floor
        self.texture_bias = texture_bias
        self.spectral_bias = spectral_bias
        self.spectral_weight = spectral_weight
        self.max_positions = max_positions
        self.spectral_pool = spectral_pool
        self.checkpoint_digest = (
            f"rcf:seed={seed},k={dim // 2},size={patch_size},texture={n_texture},"
            f"spectral={n_spectral},zca_eps={zca_eps:g},noise_floor={noise_floor:g},"
            f"texture_bias={texture_bias:g},spectral_bias={spectral_bias:g},"
            f"spectral_weight={spectral_weight:g},max_positions={max_positions},"
            f"spectral_pool={spectral_pool},version=1"
        )
        self._filters: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def filters(self, n_bands: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(texture filters [Kt C*p*p] float64, texture biases [Kt], spectral filters [Ks C],
        spectral biases [Ks]) for ``n_bands`` bands, drawn from the seed: one stream per band
        count, the same on every machine."""
        if n_bands not in self._filters:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n_bands)
            d = n_bands * self.patch_size**2
            texture = torch.randn(self.n_texture, d, generator=g, dtype=torch.float64)
            texture /= texture.norm(dim=1, keepdim=True)
            texture_bias = torch.rand(self.n_texture, generator=g, dtype=torch.float64)
            spectral = torch.randn(self.n_spectral, n_bands, generator=g, dtype=torch.float64)
            spectral /= spectral.norm(dim=1, keepdim=True)
            spectral_bias = torch.rand(self.n_spectral, generator=g, dtype=torch.float64)
            self._filters[n_bands] = (
                texture,
                texture_bias * self.texture_bias,
                spectral.float(),
                ((2 * spectral_bias - 1) * self.spectral_bias).float(),
            )
        return self._filters[n_bands]

    def _checked_pixels(self, datacube: Datacube) -> np.ndarray:
        """The datacube's pixels [B C H W], after checking that rcf can take them."""
        pixels = np.asarray(datacube["pixels"])
        if pixels.ndim != 4:
            raise EncoderError(f"rcf expects pixels [B C H W], got shape {pixels.shape}")
        _, c, h, w = pixels.shape
        if c < 1 or min(h, w) < self.patch_size:
            raise EncoderError(
                f"rcf needs at least one band and chips of at least {self.patch_size} px, "
                f"got shape {pixels.shape}")
        if not np.isfinite(pixels).all():
            raise EncoderError("rcf input pixels contain NaN or infinite values")
        return pixels

    def embed_datacube(self, datacube: Datacube) -> np.ndarray:
        pixels = self._checked_pixels(datacube)
        b = pixels.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        out = np.empty((b, self.dim), np.float32)
        with torch.inference_mode():
            for i in range(b):  # one chip at a time: no batch statistics, identical alone or not
                out[i] = self.embed_chip(x[i]).numpy()
        return out

    def embed_chip(self, chip: torch.Tensor) -> torch.Tensor:
        """[C H W] z-scored float32 -> [dim] float32."""
        c, h, w = chip.shape
        p = self.patch_size
        _, texture_bias, spectral, spectral_bias = self.filters(c)
        centred64, weights, _, offsets = self.whitened_filters(chip)

        # Texture: responses w_k . (x - mean) on a regular grid, patches as columns.
        stride = grid_stride(h, w, p, self.max_positions)
        columns = F.unfold(centred64.float()[None], p, stride=stride)[0]  # [C*p*p N']
        texture_features = threshold_means(
            weights.float(), columns, (offsets + texture_bias).float(), (offsets - texture_bias).float())
        # Spectral: 1x1 responses s_k . x over all (pooled) pixels.
        pool = self.spectral_pool if min(h, w) >= self.spectral_pool else 1
        pooled = F.avg_pool2d(chip[None], pool)[0] if pool > 1 else chip  # [C H/pool W/pool]
        spectral_features = threshold_means(
            spectral, pooled.flatten(1), spectral_bias, -spectral_bias)
        return torch.cat([texture_features.flatten(), self.spectral_weight * spectral_features.flatten()])

    def whitened_filters(
        self, chip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chip's texture filters folded with its ZCA transform: (band-centred chip [C H W]
        float64, filters [Kt C*p*p] float64, mean patch [C*p*p], offsets [Kt] = filters @ mean)."""
        c, h, w = chip.shape
        p = self.patch_size
        texture = self.filters(c)[0]

        # The chip's patch covariance (float64), from at most MAX_COVARIANCE_PATCHES patches on
        # a regular grid; band means removed first so that responses stay O(1) in float32.
        chip64 = chip.double()
        centred64 = chip64 - chip64.mean(dim=(1, 2), keepdim=True)  # [C H W]
        cov_stride = grid_stride(h, w, p, MAX_COVARIANCE_PATCHES)
        patches = F.unfold(centred64[None], p, stride=cov_stride)[0]  # [C*p*p N]
        mean = patches.mean(dim=1)  # [C*p*p], ~0 (edges aside)
        centred = patches - mean[:, None]
        cov = centred @ centred.T / patches.shape[1]  # [C*p*p C*p*p]

        # Regularized ZCA: W = U diag(1 / sqrt(lam + eps * mean(lam) + floor)) U^T.
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp(min=0)
        gain = torch.rsqrt(lam + self.zca_eps * lam.mean() + self.noise_floor)
        zca = (u * gain) @ u.T  # [C*p*p C*p*p], symmetric
        weights = texture @ zca  # [Kt C*p*p]: filter k applied to a whitened patch
        offsets = weights @ mean  # [Kt]: centring on the chip's mean patch
        return centred64, weights, mean, offsets

    def feature_map(self, datacube: Datacube, grid: int = 32, stride: int = 2) -> np.ndarray:
        """[B dim grid grid] float32: the embedding's features before their spatial mean, pooled
        to a ``grid`` x ``grid`` map (8 x 8 pixels a cell for a 256 px chip, the layout of Clay's
        patch tokens), for decoders that need to know where things are. Channels are in the
        embedding's order, and a cell's values are the same thresholded responses the embedding
        averages over the chip (texture responses taken every ``stride`` pixels, spectra over
        ``spectral_pool`` pixels), so the map's mean over cells approximates the embedding."""
        pixels = self._checked_pixels(datacube)
        b, _, h, w = pixels.shape
        if grid < 1 or h % grid or w % grid:
            raise EncoderError(f"rcf feature map: chip size {h} x {w} is not a multiple of grid {grid}")
        if stride < 1:
            raise EncoderError(f"rcf feature map stride must be positive, got {stride}")
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        out = np.empty((b, self.dim, grid, grid), np.float32)
        with torch.inference_mode():
            for i in range(b):  # per chip, as embed_datacube: each chip whitened alone
                out[i] = self.chip_feature_map(x[i], grid, stride).numpy()
        return out

    def chip_feature_map(self, chip: torch.Tensor, grid: int, stride: int) -> torch.Tensor:
        """[C H W] z-scored float32 -> [dim grid grid] float32 (see ``feature_map``)."""
        c, h, w = chip.shape
        p = self.patch_size
        _, texture_bias, spectral, spectral_bias = self.filters(c)
        centred64, weights, _, offsets = self.whitened_filters(chip)
        kernels = weights.float().reshape(-1, c, p, p)  # [Kt C p p], unfold's (C, p, p) order
        responses = F.conv2d(centred64.float()[None], kernels, stride=stride, padding=p // 2)[0]  # [Kt h' w']
        upper = (offsets + texture_bias).float()[:, None, None]
        lower = (offsets - texture_bias).float()[:, None, None]
        texture_maps = torch.cat([torch.relu(responses - upper), torch.relu(lower - responses)])  # [2Kt h w]
        texture_grid = F.adaptive_avg_pool2d(texture_maps[None], grid)[0]  # [2Kt grid grid]
        pool = self.spectral_pool if min(h, w) >= self.spectral_pool else 1
        pooled = F.avg_pool2d(chip[None], pool)[0] if pool > 1 else chip  # [C H/pool W/pool]
        s = torch.einsum("kc,chw->khw", spectral, pooled)  # [Ks H/pool W/pool]
        bias = spectral_bias[:, None, None]
        spectral_maps = torch.cat([torch.relu(s - bias), torch.relu(-bias - s)])  # [2Ks H/pool W/pool]
        spectral_grid = F.adaptive_avg_pool2d(spectral_maps[None], grid)[0]  # [2Ks grid grid]
        return torch.cat([texture_grid, self.spectral_weight * spectral_grid])


def threshold_means(
    filters: torch.Tensor, columns: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor
) -> torch.Tensor:
    """[2 K]: means over columns of relu(r - upper) and relu(lower - r), r = filters @ columns
    ([K D] @ [D N]); filters in chunks so that each block of responses stays in cache."""
    out = torch.empty(2, filters.shape[0])
    for k in range(0, filters.shape[0], FILTER_CHUNK):
        kk = slice(k, k + FILTER_CHUNK)
        responses = filters[kk] @ columns  # [k N]
        hi, lo = upper[kk, None], lower[kk, None]
        # mean(relu(r - hi)) = mean(max(r, hi)) - hi, and likewise below: one pass, no copies
        out[1, kk] = lo[:, 0] - torch.clamp(responses, max=lo).mean(dim=1)
        out[0, kk] = responses.clamp_(min=hi).mean(dim=1) - hi[:, 0]
    return out


def grid_stride(h: int, w: int, patch_size: int, max_patches: int) -> int:
    """The smallest stride at which at most ``max_patches`` patches are taken from a chip."""
    ny, nx = h - patch_size + 1, w - patch_size + 1
    stride = max(1, math.isqrt(ny * nx // max_patches))
    while ((ny - 1) // stride + 1) * ((nx - 1) // stride + 1) > max_patches:
        stride += 1
    return stride

