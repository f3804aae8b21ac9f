"""Heads trained on frozen embeddings (no Dagster imports): a chip land-cover classifier
(``classifier``), a per-pixel segmentation decoder (``segmentation``), their labels
(``labels``) and the maps they write (``maps``)."""

from geofm_assets.heads.classifier import ChipClassifier, ClassifierError, load_classifier, train_classifier
from geofm_assets.heads.labels import (
    ChipLabels,
    ChipObservations,
    HeadEncoderMismatch,
    LabelError,
    LandcoverTruth,
    labels_from_file,
    labels_from_truth,
    load_observations,
)
from geofm_assets.heads.segmentation import (
    SegmentationDecoder,
    SegmentationError,
    SegmentationHead,
    load_segmentation_head,
    pixel_training_set,
    spatial_features,
    train_segmentation,
)

__all__ = [
    "ChipClassifier",
    "ChipLabels",
    "ChipObservations",
    "ClassifierError",
    "HeadEncoderMismatch",
    "LabelError",
    "LandcoverTruth",
    "SegmentationDecoder",
    "SegmentationError",
    "SegmentationHead",
    "labels_from_file",
    "labels_from_truth",
    "load_classifier",
    "load_observations",
    "load_segmentation_head",
    "pixel_training_set",
    "spatial_features",
    "train_classifier",
    "train_segmentation",
]
