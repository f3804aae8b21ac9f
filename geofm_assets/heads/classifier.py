"""A chip classifier on frozen embeddings: logistic regression or a small MLP (scikit-learn),
cross-validated grouped by chip, saved as ``model.npz`` + ``model.json`` (no pickle) with the
encoder it was trained on, and applied with numpy.

    clf, report = train_classifier(vectors, labels, groups, encoder=("rcf", digest))
    clf.save(folder); clf = load_classifier(folder)
    names, proba = clf.predict(vectors, encoder=("rcf", digest))   # another encoder: an error
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from geofm_assets.geo.previews import figure_png
from geofm_assets.heads.labels import (
    HeadEncoderMismatch,
    check_same_encoder,
    read_head_meta,
    write_head_meta,
)

HeadKind = Literal["logistic", "mlp"]
MODEL_FILE = "model.npz"
META_FILE = "model.json"
FORMAT_VERSION = 1


class ClassifierError(ValueError):
    """Training data or a saved classifier that cannot be used."""


@dataclass
class ChipClassifier:
    """A fitted head: standardization, then a linear softmax (logistic) or ReLU layers (mlp)."""

    kind: HeadKind
    classes: tuple[str, ...]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    weights: list[np.ndarray]  # per layer [D_in D_out]
    biases: list[np.ndarray]  # per layer [D_out]
    encoder: tuple[str, str]  # (name, checkpoint digest) of the embeddings it was trained on
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def check_encoder(self, encoder: tuple[str, str]) -> None:
        check_same_encoder("this land-cover classifier", self.encoder, encoder)

    def predict_proba(self, vectors: np.ndarray, *, encoder: tuple[str, str]) -> np.ndarray:
        """[M K] class probabilities of embeddings [M D] made by ``encoder``."""
        self.check_encoder(encoder)
        x = np.asarray(vectors, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ClassifierError(f"the classifier takes [M {self.dim}] embeddings, got shape {x.shape}")
        h = (x - self.mean) / self.scale  # [M D]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)  # ReLU hidden layers
        if h.shape[1] == 1:  # binary: one logit for classes[1]
            p1 = 1.0 / (1.0 + np.exp(-h[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray, *, encoder: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """(class names [M] object, probabilities [M K])."""
        proba = self.predict_proba(vectors, encoder=encoder)
        return np.asarray(self.classes, dtype=object)[proba.argmax(axis=1)], proba

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write ``model.npz`` and ``model.json`` into ``folder`` (each to a temporary name, then
        renamed; stage the folder itself to replace a model whole)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        model_path, meta_path = folder / MODEL_FILE, folder / META_FILE
        tmp = folder / f".{MODEL_FILE}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, model_path)
        doc = {
            "format_version": FORMAT_VERSION, "kind": self.kind, "classes": list(self.classes),
            "layers": len(self.weights), "dim": self.dim,
            "encoder": {"model": self.encoder[0], "checkpoint_digest": self.encoder[1]},
            **self.meta,
        }
        write_head_meta(meta_path, doc)
        return model_path, meta_path


def load_classifier(folder: Path) -> ChipClassifier:
    folder = Path(folder)
    doc = read_head_meta(folder, MODEL_FILE, META_FILE, FORMAT_VERSION, "classifier",
                         "landcover_classifier", ClassifierError)
    with np.load(folder / MODEL_FILE) as z:
        n = int(doc["layers"])
        weights = [z[f"w{i}"] for i in range(n)]
        biases = [z[f"b{i}"] for i in range(n)]
        mean, scale = z["mean"], z["scale"]
    known = {"format_version", "kind", "classes", "layers", "dim", "encoder"}
    return ChipClassifier(
        kind=doc["kind"], classes=tuple(doc["classes"]), mean=mean, scale=scale,
        weights=weights, biases=biases,
        encoder=(doc["encoder"]["model"], doc["encoder"]["checkpoint_digest"]),
        meta={k: v for k, v in doc.items() if k not in known},
    )


# --- training ----------------------------------------------------------------------------------
def make_estimator(kind: HeadKind, seed: int) -> LogisticRegression | MLPClassifier:
    if kind == "logistic":
        return LogisticRegression(C=0.05, max_iter=3000, class_weight="balanced", random_state=seed)
    if kind == "mlp":
        return MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=800, random_state=seed)
    raise ClassifierError(f"unknown head kind {kind!r}: choose logistic or mlp")


def fit_head(x: np.ndarray, y: np.ndarray, kind: HeadKind, seed: int) -> tuple[StandardScaler, Any]:
    """Standardize [M D] embeddings and fit the head to integer labels [M]."""
    scaler = StandardScaler().fit(x)
    estimator = make_estimator(kind, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through the CV figures instead
        estimator.fit(scaler.transform(x), y)
    return scaler, estimator


def export_head(scaler: StandardScaler, estimator: Any, kind: HeadKind, classes: Sequence[str],
                encoder: tuple[str, str], meta: dict[str, Any]) -> ChipClassifier:
    """The fitted sklearn head as numpy arrays (what ``predict_proba`` computes)."""
    if list(estimator.classes_) != list(range(len(classes))):
        raise ClassifierError("every class must occur in the training labels")
    if kind == "logistic":
        weights = [np.asarray(estimator.coef_, np.float64).T]  # [D K] (K = 1 when binary)
        biases = [np.asarray(estimator.intercept_, np.float64)]
    else:
        weights = [np.asarray(w, np.float64) for w in estimator.coefs_]
        biases = [np.asarray(b, np.float64) for b in estimator.intercepts_]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return ChipClassifier(kind, tuple(classes), np.asarray(scaler.mean_, np.float64),
                          np.asarray(scale, np.float64), weights, biases, encoder, meta)


@dataclass
class CVReport:
    """Out-of-fold predictions of a grouped cross-validation and the figures computed from them;
    ``baseline_*`` predict each fold's training majority class."""

    classes: tuple[str, ...]
    folds: int
    n_observations: int
    n_groups: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    baseline_accuracy: float
    baseline_macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion: np.ndarray  # [K K] rows truth, columns prediction
    predictions: np.ndarray  # [M] int, out of fold

    def summary(self) -> dict[str, Any]:
        return {
            "folds": self.folds, "observations": self.n_observations, "chips": self.n_groups,
            "accuracy": round(self.accuracy, 4), "balanced_accuracy": round(self.balanced_accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "baseline_accuracy": round(self.baseline_accuracy, 4),
            "baseline_macro_f1": round(self.baseline_macro_f1, 4),
            "per_class": self.per_class, "confusion": self.confusion.tolist(),
            "classes": list(self.classes),
        }


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of ``min(folds, number of groups)`` folds, stratified by label
    as far as the groups allow; every group's rows are all on one side of each fold."""
    n_groups = len(set(np.asarray(groups).tolist()))
    k = min(folds, n_groups)
    if k < 2:
        raise ClassifierError(f"cross-validation needs at least 2 chips, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members"
        return list(splitter.split(np.zeros((len(y), 1)), y, groups))


def grouped_cross_validation(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: Sequence[str],
                             kind: HeadKind, folds: int, seed: int) -> CVReport:
    """``folds``-fold cross-validation in which a group (a chip: the same place on every date) is
    never in both the training and the test part of a fold."""
    n_groups = len(set(groups.tolist()))
    splits = grouped_folds(y, groups, folds, seed)
    predictions = np.empty(len(y), np.int64)
    baseline = np.empty(len(y), np.int64)
    for train, test in splits:
        present = np.unique(y[train])
        counts = np.bincount(y[train], minlength=len(classes))
        baseline[test] = int(counts.argmax())
        if len(present) == 1:  # a fold whose training part has one class predicts it
            predictions[test] = present[0]
            continue
        remap = {c: i for i, c in enumerate(present)}
        scaler, est = fit_head(x[train], np.array([remap[v] for v in y[train]]), kind, seed)
        predictions[test] = present[est.predict(scaler.transform(x[test]))]
    labels = list(range(len(classes)))
    prec, rec, f1, support = precision_recall_fscore_support(
        y, predictions, labels=labels, zero_division=0)
    present_labels = [i for i in labels if support[i] > 0]
    return CVReport(
        classes=tuple(classes), folds=len(splits), n_observations=len(y), n_groups=n_groups,
        accuracy=float(accuracy_score(y, predictions)),
        balanced_accuracy=float(balanced_accuracy_score(y, predictions)),
        macro_f1=float(f1_score(y, predictions, labels=present_labels, average="macro", zero_division=0)),
        baseline_accuracy=float(accuracy_score(y, baseline)),
        baseline_macro_f1=float(f1_score(y, baseline, labels=present_labels, average="macro",
                                         zero_division=0)),
        per_class={classes[i]: {"precision": round(float(prec[i]), 4), "recall": round(float(rec[i]), 4),
                                "f1": round(float(f1[i]), 4), "support": int(support[i])}
                   for i in labels},
        confusion=confusion_matrix(y, predictions, labels=labels),
        predictions=predictions,
    )


def train_classifier(
    vectors: np.ndarray,
    labels: Sequence[str | None] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    encoder: tuple[str, str],
    kind: HeadKind = "logistic",
    folds: int = 5,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> tuple[ChipClassifier, CVReport]:
    """Cross-validate (grouped by ``groups``) and fit the head on all labelled observations.

    ``vectors`` [M D], ``labels`` [M] class names (None: unlabelled, left out), ``groups`` [M]
    (chip ids). The classes are the labels that occur, sorted."""
    x_all = np.asarray(vectors, np.float32)
    lab = np.asarray(labels, dtype=object)
    grp = np.asarray(groups, dtype=object)
    if x_all.ndim != 2 or len(lab) != len(x_all) or len(grp) != len(x_all):
        raise ClassifierError(f"need vectors [M D] with M labels and groups, got {x_all.shape}, "
                              f"{len(lab)}, {len(grp)}")
    keep = np.array([v is not None for v in lab], bool)
    x, lab, grp = x_all[keep], lab[keep], grp[keep].astype(str)
    classes = tuple(sorted({str(v) for v in lab}))
    if len(classes) < 2:
        raise ClassifierError(
            f"the labels hold {len(classes)} class(es) {list(classes)} over {len(x)} observations: a "
            "classifier needs at least two; label more places or choose another labels source")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(v)] for v in lab], np.int64)
    report = grouped_cross_validation(x, y, grp, classes, kind, folds, seed)
    scaler, est = fit_head(x, y, kind, seed)
    info = {"trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "observations": len(y), "chips": report.n_groups,
            "cv": {k: v for k, v in report.summary().items() if k not in ("confusion", "per_class")},
            **(meta or {})}
    return export_head(scaler, est, kind, classes, encoder, info), report


# --- plots -------------------------------------------------------------------------------------
def confusion_matrix_png(confusion: np.ndarray, classes: Sequence[str], title: str = "") -> bytes:
    """A PNG of a confusion matrix [K K] (rows truth, columns prediction), counts in the cells."""
    from matplotlib.figure import Figure

    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k), dpi=100)
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    top = confusion.max() if confusion.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
                    color="white" if confusion[i, j] > top / 2 else "black", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


__all__ = [
    "CVReport",
    "ChipClassifier",
    "ClassifierError",
    "HeadEncoderMismatch",
    "confusion_matrix_png",
    "grouped_cross_validation",
    "grouped_folds",
    "load_classifier",
    "train_classifier",
]
