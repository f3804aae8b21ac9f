"""Per-pixel land cover from a frozen encoder's spatial features: a small convolutional decoder
with pixel-shuffle upsampling, trained with torch on label windows of a land-cover raster.

Spatial features ([B D g g], a g x g grid over each chip):
* Clay (``clay-v1``, ``clay-v1.5``): the patch tokens, 32 x 32 for a 256 px chip (patch 8);
* ``rcf``: ``RCFEncoder.feature_map``, the embedding's thresholded responses pooled to 32 x 32.
``hf:*`` backbones are not supported (the registry's wrapper exposes pooled vectors only).
Features are computed in-process from the chips' datacubes, with the encoder frozen (no
gradients; the encoder is never trained).

    data = pixel_training_set(lake_root, encoder, truth)            # features + label windows
    head, report = train_segmentation(data, encoder=encoder_id)      # held-out chips' IoU / F1
    codes, confidence = head.predict(spatial_features(encoder, cube), encoder=encoder_id)
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from geofm_assets.heads.labels import (
    IGNORE,
    LabelError,
    LandcoverTruth,
    check_same_encoder,
    read_head_meta,
    write_head_meta,
)
from geofm_assets.lake import CHIPS_TABLE, checked_segment
from geofm_assets.models.base import Encoder
from geofm_assets.models.datacube import Datacube, make_datacube
from geofm_assets.workers.embed import read_datacube

WEIGHTS_FILE = "decoder.pt"
META_FILE = "decoder.json"
FORMAT_VERSION = 1
SUPPORTED_ENCODERS = "rcf (its feature_map) and clay-v1 / clay-v1.5 (patch tokens)"


class SegmentationError(ValueError):
    """An encoder without spatial features, bad training data, or a saved head that cannot load."""


# --- features ------------------------------------------------------------------------------------
def spatial_features(encoder: Encoder, datacube: Datacube) -> np.ndarray:
    """[B D g g] float32 spatial features of the datacube's chips, the encoder frozen."""
    feature_map = getattr(encoder, "feature_map", None)
    if callable(feature_map):
        return np.asarray(feature_map(datacube), np.float32)
    tokens_of = getattr(encoder, "tokens", None)
    patch = getattr(getattr(encoder, "config", None), "patch_size", None)
    if not callable(tokens_of) or not isinstance(patch, int):
        raise SegmentationError(
            f"encoder {encoder.name!r} has no spatial features (patch tokens or a feature map): the "
            f"segmentation decoder supports {SUPPORTED_ENCODERS}")
    with torch.no_grad():
        tokens = torch.as_tensor(tokens_of(datacube)).float()  # [B 1+L D]
    b, _, h, w = np.asarray(datacube["pixels"]).shape
    gh, gw = h // patch, w // patch
    if tokens.shape[1] != 1 + gh * gw:
        raise SegmentationError(f"{encoder.name} returned {tokens.shape[1]} tokens for a {h} x {w} chip, "
                                f"expected 1 + {gh} x {gw}")
    grid = tokens[:, 1:].reshape(b, gh, gw, -1).permute(0, 3, 1, 2)  # [B D gh gw], row-major patches
    return grid.contiguous().numpy()


def partition_chip_rows(lake_root: Path, region: str, date: str) -> list[dict[str, Any]]:
    """The kept chips of one partition (rows of its chips table); [] when it has none."""
    folder = Path(lake_root) / "chips" / f"region={checked_segment('region', region)}"
    path = folder / f"date={date}" / CHIPS_TABLE
    if not path.exists():
        raise SegmentationError(f"chips table {path} is missing: materialize chips for {date}|{region}")
    return pq.read_table(path).to_pylist()


def lake_chip_rows(lake_root: Path, regions: Sequence[str] | None = None,
                   dates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The kept chips of every materialized chips partition of ``regions`` (default: all) on
    ``dates`` (default: all)."""
    base = Path(lake_root) / "chips"
    names = list(regions) if regions else (sorted(
        p.name.removeprefix("region=") for p in base.glob("region=*")) if base.exists() else [])
    wanted = None if not dates else {str(d) for d in dates}
    rows: list[dict[str, Any]] = []
    for region in names:
        for part in sorted((base / f"region={checked_segment('region', region)}").glob("date=*")):
            day = part.name.removeprefix("date=")
            if (part / CHIPS_TABLE).exists() and (wanted is None or day in wanted):
                rows += partition_chip_rows(lake_root, region, day)
    return rows


def feature_batches(lake_root: Path, rows: Sequence[dict[str, Any]], encoder: Encoder, batch_size: int = 8
                    ) -> Iterator[tuple[list[dict[str, Any]], np.ndarray]]:
    """(chip rows, spatial features [B D g g]) for ``rows``, read from their datacubes."""
    for start in range(0, len(rows), batch_size):
        part = list(rows[start : start + batch_size])
        dn = np.stack([read_datacube(Path(lake_root) / r["datacube_path"]) for r in part])  # [B C H W]
        cube = make_datacube(dn, [r["datetime"] or r["date"] for r in part],
                             [r["centroid_lat"] for r in part], [r["centroid_lon"] for r in part])
        yield part, spatial_features(encoder, cube)


@dataclass(frozen=True, eq=False)
class PixelTrainingSet:
    features: np.ndarray  # [N D g g] float32
    targets: np.ndarray  # [N H W] uint8 class index, IGNORE where no truth
    chip_ids: np.ndarray  # [N] str
    dates: np.ndarray  # [N] datetime64[D]
    classes: tuple[str, ...]  # class index -> name
    codes: tuple[int, ...]  # class index -> raster code
    feature_seconds: float


def pixel_training_set(
    lake_root: Path,
    encoder: Encoder,
    truth: LandcoverTruth,
    *,
    regions: Sequence[str] | None = None,
    dates: Sequence[str] | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = lambda _m: None,
) -> PixelTrainingSet:
    """Spatial features of every kept chip of ``regions`` on ``dates`` (default: all in the
    lake) and its label window from ``truth`` (forest cleared by the chip's date is ``IGNORE``)."""
    rows = lake_chip_rows(lake_root, regions, dates)
    if not rows:
        raise SegmentationError(f"no chips in the lake at {lake_root}: materialize chips first")
    codes = tuple(sorted(truth.classes))
    lookup = np.full(256, IGNORE, np.uint8)
    lookup[list(codes)] = np.arange(len(codes), dtype=np.uint8)
    features, targets = [], []
    started = time.perf_counter()
    for part, feats in feature_batches(lake_root, rows, encoder, batch_size):
        features.append(feats)
        for r in part:
            bounds = np.array([r["x_min"], r["y_min"], r["x_max"], r["y_max"]], np.float64)
            targets.append(lookup[truth.pixel_labels(bounds, int(r["epsg"]), r["date"])])
        log(f"features of {sum(len(f) for f in features)}/{len(rows)} chips")
    return PixelTrainingSet(
        features=np.concatenate(features), targets=np.stack(targets),
        chip_ids=np.array([r["chip_id"] for r in rows], dtype=object),
        dates=np.array([r["date"] for r in rows], dtype="datetime64[D]"),
        classes=tuple(truth.classes[c] for c in codes), codes=codes,
        feature_seconds=time.perf_counter() - started,
    )


# --- the decoder ---------------------------------------------------------------------------------
class SegmentationDecoder(nn.Module):
    """[B D g g] features -> [B K g*upscale g*upscale] class logits.

    A 1x1 stem and a 3x3 block at the feature grid, then 2x pixel-shuffle stages (3x3 conv to 4c
    channels, PixelShuffle(2)) and a last 3x3 conv to K * r^2 channels shuffled up by r (r <= 4), so
    most of the work happens at low resolution. Features are standardized by buffers set from
    the training set."""

    def __init__(self, in_dim: int, n_classes: int, upscale: int = 8, hidden: int = 64) -> None:
        super().__init__()
        if upscale < 1 or upscale & (upscale - 1):
            raise SegmentationError(f"upscale must be a power of two, got {upscale}")
        if in_dim < 1 or n_classes < 2 or hidden < 2:
            raise SegmentationError(
                f"bad decoder shape: in_dim={in_dim} n_classes={n_classes} hidden={hidden}")
        self.in_dim, self.n_classes, self.upscale, self.hidden = in_dim, n_classes, upscale, hidden
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        layers: list[nn.Module] = [
            nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.GELU(),
        ]
        channels, factor, last = hidden, upscale, min(upscale, 4)
        while factor > last:
            out = max(channels // 2, 8)
            layers += [nn.Conv2d(channels, out * 4, 3, padding=1), nn.PixelShuffle(2),
                       nn.BatchNorm2d(out), nn.GELU()]
            channels, factor = out, factor // 2
        layers.append(nn.Conv2d(channels, n_classes * last * last, 3, padding=1))
        if last > 1:
            layers.append(nn.PixelShuffle(last))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.feature_mean[None, :, None, None]  # type: ignore[index]
        std = self.feature_std[None, :, None, None]  # type: ignore[index]
        return self.layers((features - mean) / std)


@dataclass
class SegmentationHead:
    decoder: SegmentationDecoder
    classes: tuple[str, ...]
    codes: tuple[int, ...]  # raster code of each class (what the class COGs hold)
    encoder: tuple[str, str]
    grid: int
    meta: dict[str, Any] = field(default_factory=dict)

    def check_encoder(self, encoder: tuple[str, str]) -> None:
        check_same_encoder("this segmentation decoder", self.encoder, encoder)

    def predict(self, features: np.ndarray, *, encoder: tuple[str, str], batch_size: int = 8
                ) -> tuple[np.ndarray, np.ndarray]:
        """(raster codes [B H W] uint8, confidence [B H W] float32) for features [B D g g]."""
        self.check_encoder(encoder)
        if features.ndim != 4 or features.shape[1] != self.decoder.in_dim:
            raise SegmentationError(f"the decoder takes [B {self.decoder.in_dim} g g] features, got "
                                    f"{features.shape}")
        codes = np.asarray(self.codes, np.uint8)
        device = next(self.decoder.parameters()).device
        self.decoder.eval()
        out_codes, out_conf = [], []
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                x = torch.as_tensor(features[start : start + batch_size], dtype=torch.float32, device=device)
                proba = self.decoder(x).softmax(dim=1)  # [b K H W]
                conf, index = proba.max(dim=1)
                out_codes.append(codes[index.cpu().numpy()])
                out_conf.append(conf.cpu().numpy())
        if not out_codes:
            size = self.grid * self.decoder.upscale
            return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.float32)
        return np.concatenate(out_codes), np.concatenate(out_conf)

    def save(self, folder: Path) -> tuple[Path, Path]:
        """``decoder.pt`` (the state dict) and ``decoder.json`` in ``folder``, each written to a
        temporary name and renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights, meta = folder / WEIGHTS_FILE, folder / META_FILE
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        torch.save({k: v.detach().cpu() for k, v in self.decoder.state_dict().items()}, tmp)
        os.replace(tmp, weights)
        doc = {
            "format_version": FORMAT_VERSION, "classes": list(self.classes), "codes": list(self.codes),
            "encoder": {"model": self.encoder[0], "checkpoint_digest": self.encoder[1]},
            "in_dim": self.decoder.in_dim, "grid": self.grid, "upscale": self.decoder.upscale,
            "hidden": self.decoder.hidden, **self.meta,
        }
        write_head_meta(meta, doc)
        return weights, meta


def load_segmentation_head(folder: Path, device: str | torch.device = "cpu") -> SegmentationHead:
    folder = Path(folder)
    doc = read_head_meta(folder, WEIGHTS_FILE, META_FILE, FORMAT_VERSION, "segmentation head",
                         "landcover_segmentation", SegmentationError)
    weights = folder / WEIGHTS_FILE
    decoder = SegmentationDecoder(int(doc["in_dim"]), len(doc["classes"]), int(doc["upscale"]),
                                  int(doc["hidden"]))
    decoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    known = {"format_version", "classes", "codes", "encoder", "in_dim", "grid", "upscale", "hidden"}
    return SegmentationHead(
        decoder.to(device).eval(), tuple(doc["classes"]), tuple(int(c) for c in doc["codes"]),
        (doc["encoder"]["model"], doc["encoder"]["checkpoint_digest"]), int(doc["grid"]),
        {k: v for k, v in doc.items() if k not in known},
    )


# --- training and metrics -------------------------------------------------------------------------
def holdout_chips(chip_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[N] bool: the observations of a seeded ``fraction`` of the chips (at least one chip held
    out and one kept), so a place is never in both parts."""
    unique = np.array(sorted({str(c) for c in chip_ids}), dtype=object)
    if len(unique) < 2:
        raise SegmentationError(f"held-out evaluation needs at least 2 chips, got {len(unique)}")
    n_test = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    test = set(np.random.default_rng(seed).permutation(unique)[:n_test].tolist())
    return np.array([str(c) in test for c in chip_ids], bool)


def pixel_metrics(predicted: np.ndarray, target: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """IoU and F1 per class over pixels with truth (target != IGNORE), their means over the
    classes present in the truth, pixel accuracy and the confusion matrix (rows truth)."""
    k = len(classes)
    valid = target != IGNORE
    t = target[valid].astype(np.int64)
    p = predicted[valid].astype(np.int64)
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    present = support > 0
    return {
        "pixels": int(valid.sum()),
        "pixel_accuracy": float(tp.sum() / max(valid.sum(), 1)),
        "mean_iou": float(np.mean(np.nan_to_num(iou[present]))) if present.any() else float("nan"),
        "mean_f1": float(np.mean(np.nan_to_num(f1[present]))) if present.any() else float("nan"),
        "per_class": {classes[i]: {"iou": round(float(np.nan_to_num(iou[i])), 4),
                                   "f1": round(float(np.nan_to_num(f1[i])), 4), "support": int(support[i])}
                      for i in range(k)},
        "confusion": confusion.tolist(),
    }


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse square-root frequency weights (mean 1 over the classes present)."""
    counts = np.bincount(targets[targets != IGNORE].ravel(), minlength=n_classes)[:n_classes].astype(float)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    w = w / w[counts > 0].mean() if (counts > 0).any() else np.ones(n_classes)
    return torch.as_tensor(w, dtype=torch.float32)


def fit_decoder(
    features: np.ndarray, targets: np.ndarray, n_classes: int, *,
    hidden: int = 64, epochs: int = 30, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
    device: str | torch.device = "cpu", log: Callable[[str], None] = lambda _m: None,
) -> SegmentationDecoder:
    """Train a decoder on features [N D g g] and targets [N H W] (cross-entropy, class-weighted,
    IGNORE left out; AdamW with a cosine schedule)."""
    n, d, g, _ = features.shape
    if targets.shape[0] != n or targets.shape[1] % g:
        raise SegmentationError(f"targets {targets.shape} do not fit features {features.shape}")
    if not (targets != IGNORE).any():
        raise SegmentationError("no pixel of the training chips has a class: nothing to learn from")
    torch.manual_seed(seed)
    decoder = SegmentationDecoder(d, n_classes, targets.shape[1] // g, hidden).to(device)
    x = torch.as_tensor(features, dtype=torch.float32)
    with torch.no_grad():
        decoder.feature_mean.copy_(x.mean(dim=(0, 2, 3)))  # type: ignore[operator]
        decoder.feature_std.copy_(x.std(dim=(0, 2, 3)).clamp(min=1e-6))  # type: ignore[operator]
    y = torch.as_tensor(targets.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(targets, n_classes).to(device), ignore_index=IGNORE)
    steps = epochs * math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1),
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n > 1:  # BatchNorm needs two samples; fold a lone one in next epoch
                continue
            logits = decoder(x[idx].to(device))  # [b K H W]
            loss = loss_fn(logits, y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    return decoder.eval()


@dataclass
class SegmentationReport:
    model: dict[str, Any]  # pixel_metrics of the decoder on held-out chips
    baseline: dict[str, Any]  # pixel_metrics of the training majority class on the same pixels
    train_chips: int
    test_chips: int
    train_observations: int
    test_observations: int
    train_seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "mean_iou": round(self.model["mean_iou"], 4), "mean_f1": round(self.model["mean_f1"], 4),
            "pixel_accuracy": round(self.model["pixel_accuracy"], 4),
            "baseline_mean_iou": round(self.baseline["mean_iou"], 4),
            "baseline_mean_f1": round(self.baseline["mean_f1"], 4),
            "baseline_pixel_accuracy": round(self.baseline["pixel_accuracy"], 4),
            "train_chips": self.train_chips, "test_chips": self.test_chips,
            "train_observations": self.train_observations, "test_observations": self.test_observations,
            "train_seconds": round(self.train_seconds, 2),
        }


def train_segmentation(
    data: PixelTrainingSet, *, encoder: tuple[str, str], holdout: float = 0.25, hidden: int = 64,
    epochs: int = 30, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
    device: str | torch.device = "cpu", log: Callable[[str], None] = lambda _m: None,
) -> tuple[SegmentationHead, SegmentationReport]:
    """Train on a seeded share of the chips and report IoU / F1 on the held-out ones (every date
    of a held-out chip is held out). The saved head is the one the figures describe."""
    test = holdout_chips(data.chip_ids, holdout, seed)
    train = ~test
    k = len(data.classes)
    started = time.perf_counter()
    decoder = fit_decoder(data.features[train], data.targets[train], k, hidden=hidden, epochs=epochs,
                          batch_size=batch_size, lr=lr, seed=seed, device=device, log=log)
    seconds = time.perf_counter() - started
    g = data.features.shape[-1]
    head = SegmentationHead(decoder, data.classes, data.codes, encoder, g)
    code_to_index = np.zeros(256, np.uint8)
    code_to_index[list(data.codes)] = np.arange(k, dtype=np.uint8)
    codes, _ = head.predict(data.features[test], encoder=encoder)
    predicted = code_to_index[codes]
    train_counts = np.bincount(data.targets[train][data.targets[train] != IGNORE].ravel(), minlength=k)
    majority = np.full_like(data.targets[test], int(train_counts[:k].argmax()))
    report = SegmentationReport(
        model=pixel_metrics(predicted, data.targets[test], data.classes),
        baseline=pixel_metrics(majority, data.targets[test], data.classes),
        train_chips=len({str(c) for c in data.chip_ids[train]}),
        test_chips=len({str(c) for c in data.chip_ids[test]}),
        train_observations=int(train.sum()), test_observations=int(test.sum()), train_seconds=seconds,
    )
    head.meta = {
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "held_out": report.summary(), "epochs": epochs, "lr": lr, "seed": seed,
        "test_chip_ids": sorted({str(c) for c in data.chip_ids[test]}),
    }
    return head, report


__all__ = [
    "IGNORE",
    "LabelError",
    "PixelTrainingSet",
    "SegmentationDecoder",
    "SegmentationError",
    "SegmentationHead",
    "load_segmentation_head",
    "pixel_metrics",
    "pixel_training_set",
    "spatial_features",
    "train_segmentation",
]
