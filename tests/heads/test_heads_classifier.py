"""The chip classifier: numpy inference equals scikit-learn's, grouped CV keeps chips apart,
it beats the majority class on held-out chips, and it refuses another encoder's embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from geofm_assets.heads.classifier import (
    ClassifierError,
    export_head,
    fit_head,
    grouped_folds,
    load_classifier,
    train_classifier,
)
from geofm_assets.heads.labels import (
    HeadEncoderMismatch,
    LandcoverTruth,
    labels_from_truth,
    load_observations,
)

ENCODER = ("rcf", "rcf:seed=0")


def blobs(n_classes: int, per_class: int = 30, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return (centres[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize(("kind", "n_classes"), [("logistic", 2), ("logistic", 4), ("mlp", 2), ("mlp", 3)])
def test_numpy_inference_equals_sklearn(kind, n_classes, tmp_path):
    x, y = blobs(n_classes)
    scaler, est = fit_head(x, y, kind, seed=0)
    clf = export_head(scaler, est, kind, [f"c{i}" for i in range(n_classes)], ENCODER, {})
    expected = est.predict_proba(scaler.transform(x))
    np.testing.assert_allclose(clf.predict_proba(x, encoder=ENCODER), expected, atol=1e-6)
    clf.save(tmp_path)
    again = load_classifier(tmp_path)
    np.testing.assert_allclose(again.predict_proba(x, encoder=ENCODER), expected, atol=1e-6)
    assert again.classes == clf.classes and again.encoder == ENCODER


def test_grouped_folds_never_split_a_chip():
    rng = np.random.default_rng(1)
    groups = np.array([f"chip{g}" for g in rng.integers(0, 12, 80)])
    y = rng.integers(0, 2, 80)
    folds = grouped_folds(y, groups, 5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(80))  # every row tested once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


def test_classifier_on_the_tiny_lake_beats_the_majority_class(tiny_lake, tmp_path):
    obs = load_observations(tiny_lake.root)
    with LandcoverTruth.beside_catalog(tiny_lake.sample.catalog_path) as truth:
        labels = labels_from_truth(obs, truth, min_share=0.7)
    clf, report = train_classifier(obs.vectors, labels.labels, obs.chip_ids, encoder=obs.encoder)
    assert report.classes == ("forest", "mixed") and report.n_groups == len(set(obs.chip_ids))
    assert report.accuracy > report.baseline_accuracy
    assert report.macro_f1 > report.baseline_macro_f1
    assert report.confusion.sum() == len(obs) and set(report.per_class) == {"forest", "mixed"}

    clf.save(tmp_path / "model")
    loaded = load_classifier(tmp_path / "model")
    names, proba = loaded.predict(obs.vectors, encoder=obs.encoder)
    assert proba.shape == (len(obs), 2) and np.allclose(proba.sum(axis=1), 1)
    assert (names == labels.labels).mean() > 0.9  # on its own training data
    assert loaded.meta["cv"]["accuracy"] == round(report.accuracy, 4)

    with pytest.raises(HeadEncoderMismatch, match=r"trained on rcf .* given clay-v1\.5"):
        loaded.predict(obs.vectors, encoder=("clay-v1.5", "sha256:abc"))
    with pytest.raises(HeadEncoderMismatch, match="retrain"):
        loaded.predict(obs.vectors, encoder=("rcf", "rcf:seed=1"))


def test_one_class_is_a_clear_error():
    x, _ = blobs(2)
    with pytest.raises(ClassifierError, match="at least two"):
        train_classifier(x, ["forest"] * len(x), [str(i % 5) for i in range(len(x))], encoder=ENCODER)
