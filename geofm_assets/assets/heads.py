"""Heads trained on frozen embeddings: a chip land-cover classifier and its per-partition map,
and a per-pixel segmentation decoder and its per-partition class COGs (group ``heads``).

The work lives in ``geofm_assets.heads``; these assets read the lake, call it, write atomically
(staging folder, then rename) and report figures and previews."""

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from geofm_assets.assets.chips import chips
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.tiles import md_image
from geofm_assets.automation import follows_upstream_partition
from geofm_assets.geo.regions import ChipGrid
from geofm_assets.heads.classifier import confusion_matrix_png, load_classifier, train_classifier
from geofm_assets.heads.labels import (
    ChipLabels,
    LandcoverTruth,
    check_same_encoder,
    labels_from_file,
    labels_from_truth,
    load_observations,
    observations_from_tables,
    partition_tables,
)
from geofm_assets.heads.maps import (
    NODATA,
    class_map_png,
    write_class_cog,
    write_predictions_geojson,
)
from geofm_assets.heads.segmentation import (
    feature_batches,
    load_segmentation_head,
    partition_chip_rows,
    pixel_training_set,
    train_segmentation,
)
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, partition_dir
from geofm_assets.models import build_encoder
from geofm_assets.models.base import Encoder, resolve_device
from geofm_assets.partitions import ONE_PARTITION_PER_RUN, region_and_date, region_date_partitions
from geofm_assets.resources.encoder import EncoderResource
from geofm_assets.resources.lake import LakeResource
from geofm_assets.resources.stac import StacResource

CLASSIFIER = "landcover_classifier"
SEGMENTATION = "landcover_segmentation"


class TruthConfig(Config):
    truth_raster: str | None = Field(
        default=None, description="land-cover class raster; default: truth/landcover.tif beside the "
        "sample STAC catalog")
    clearing_events: str | None = Field(
        default=None, description="deforestation events GeoJSON (date_cleared); default: "
        "truth/deforestation.geojson beside the raster")
    regions: list[str] = Field(default_factory=list, description="regions to train on; empty: all")


def open_truth(config: TruthConfig, stac: StacResource) -> LandcoverTruth:
    if config.truth_raster:
        raster = Path(config.truth_raster)
        events = Path(config.clearing_events) if config.clearing_events else (
            raster.parent / "deforestation.geojson")
        return LandcoverTruth(raster, events)
    truth = LandcoverTruth.beside_catalog(stac.catalog)
    if config.clearing_events:
        truth.close()
        return LandcoverTruth(truth.path, Path(config.clearing_events))
    return truth


def build_configured_encoder(encoder: EncoderResource) -> Encoder:
    return build_encoder(encoder.model, checkpoint=encoder.checkpoint,
                         device=str(resolve_device(encoder.device)))


# What the chip classifier and its map read of each partition: the two tables (not the
# datacubes, nor the embeddings' cell features).
TABLE_FILES = {"embeddings": [EMBEDDINGS_TABLE], "chips": [CHIPS_TABLE]}


def readable_lake(
    lake: LakeResource,
    assets: Sequence[str],
    regions: Sequence[str],
    dates: Sequence[str] = (),
    files: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """``lake.readable_root`` for ``assets`` over ``regions`` (every region when empty), on
    ``dates`` only when regions are named too (else every date)."""
    if not regions:
        return lake.readable_root(assets, files=files)
    on: list[str | None] = list(dates) or [None]
    roots = [lake.readable_root(assets, region, date, files=files) for region in regions for date in on]
    return roots[0]  # one root for every scope


# --- the chip classifier ---------------------------------------------------------------------------
class ClassifierConfig(TruthConfig):
    labels_path: str | None = Field(
        default=None, description="GeoJSON or GeoParquet of labelled points or polygons (lon/lat); "
        "default: the land-cover raster")
    class_property: str = Field(default="class", description="the labels file's class property")
    head: Literal["logistic", "mlp"] = Field(default="logistic", description="logistic regression or MLP")
    folds: int = Field(default=5, ge=2, description="cross-validation folds, grouped by chip")
    min_share: float = Field(
        default=0.0, ge=0, le=1, description="raster labels: a chip whose majority class covers less "
        "than this share is 'mixed' (0: plain majority)")
    max_cleared: float = Field(
        default=0.5, ge=0, le=1, description="raster labels: drop observations with more of the "
        "footprint cleared by their date")
    min_cover: float = Field(
        default=0.5, gt=0, le=1, description="polygon labels: share of the chip the class must cover")
    seed: int = 0


@asset(
    deps=[embeddings],
    group_name="heads",
    kinds={"scikitlearn", "numpy"},
    description=(
        "A land-cover classifier (logistic regression or a small MLP) on the chips' embeddings, "
        "labelled by the land-cover raster (majority class under the chip; forest cleared by the "
        "observation date left out) or by a user's labelled points/polygons. Cross-validated "
        "grouped by chip; saved as model.npz + model.json with the encoder and checkpoint digest."
    ),
    check_specs=[AssetCheckSpec(
        "beats_majority_baseline", asset=CLASSIFIER,
        description="cross-validated accuracy and macro F1 above the majority class's")],
)
def landcover_classifier(
    context: AssetExecutionContext, config: ClassifierConfig, lake: LakeResource, stac: StacResource
) -> MaterializeResult:
    root = readable_lake(lake, ["embeddings", "chips"], config.regions, files=TABLE_FILES)
    obs = load_observations(root, config.regions or None)
    if not len(obs):
        raise ValueError("no embeddings in the lake to train on: materialize embeddings first")
    labels: ChipLabels
    if config.labels_path:
        labels = labels_from_file(obs, Path(config.labels_path), config.class_property,
                                  min_cover=config.min_cover)
    else:
        with open_truth(config, stac) as truth:
            labels = labels_from_truth(obs, truth, min_share=config.min_share, max_cleared=config.max_cleared)
    started = time.perf_counter()
    clf, report = train_classifier(
        obs.vectors, labels.labels, obs.chip_ids, encoder=obs.encoder, kind=config.head,
        folds=config.folds, seed=config.seed,
        meta={"labels": labels.source, "dropped": labels.dropped,
              "regions": sorted({str(r) for r in obs.regions})},
    )
    seconds = time.perf_counter() - started
    png = confusion_matrix_png(report.confusion, report.classes,
                               f"{config.head} on {obs.model}: grouped {report.folds}-fold CV")
    with lake.write_asset(CLASSIFIER) as staging:
        clf.save(staging)
        (staging / "confusion_matrix.png").write_bytes(png)
        (staging / "cv.json").write_text(json.dumps(report.summary(), indent=1))
    final = lake.asset_dir(CLASSIFIER)
    s = report.summary()
    context.log.info(f"classifier CV accuracy {s['accuracy']} (majority baseline {s['baseline_accuracy']})")
    return MaterializeResult(
        metadata={
            "cv_accuracy": s["accuracy"], "cv_balanced_accuracy": s["balanced_accuracy"],
            "cv_macro_f1": s["macro_f1"], "baseline_accuracy": s["baseline_accuracy"],
            "baseline_macro_f1": s["baseline_macro_f1"], "folds": s["folds"],
            "observations": s["observations"], "chips": s["chips"],
            "per_class": MetadataValue.json(s["per_class"]),
            "classes": MetadataValue.json(list(report.classes)),
            "dropped": MetadataValue.json(labels.dropped),
            "labels": MetadataValue.json(labels.source),
            "encoder": obs.model, "checkpoint_digest": obs.checkpoint_digest,
            "head": config.head, "train_seconds": round(seconds, 2),
            "confusion_matrix": md_image(png, "confusion matrix"),
            "model": MetadataValue.path(str(final / "model.npz")),
        },
        check_results=[AssetCheckResult(
            check_name="beats_majority_baseline",
            passed=bool(report.accuracy > report.baseline_accuracy
                        and report.macro_f1 > report.baseline_macro_f1),
            severity=AssetCheckSeverity.WARN,
            metadata={"accuracy": s["accuracy"], "baseline_accuracy": s["baseline_accuracy"],
                      "macro_f1": s["macro_f1"], "baseline_macro_f1": s["baseline_macro_f1"]},
        )],
    )


@asset(
    partitions_def=region_date_partitions,
    backfill_policy=ONE_PARTITION_PER_RUN,
    deps=[embeddings, landcover_classifier],
    automation_condition=follows_upstream_partition(),
    group_name="heads",
    kinds={"geojson", "cog"},
    description=(
        "landcover_classifier applied to every chip of the partition: GeoJSON of chip footprints "
        "with class and probability, a COG class map with one pixel per chip on the region's chip "
        "grid (0 = no embedding), and a PNG with a legend."
    ),
    check_specs=[AssetCheckSpec("one_prediction_per_embedding", asset="landcover_map",
                                description="a class for every embedded chip and no other")],
)
def landcover_map(context: AssetExecutionContext, lake: LakeResource) -> MaterializeResult:
    region, date = region_and_date(context)
    grid = ChipGrid.for_region(region)
    clf = load_classifier(lake.asset_dir(CLASSIFIER))
    root = lake.readable_root(["embeddings", "chips"], region.name, date.isoformat(), files=TABLE_FILES)
    tables = partition_tables(root, region.name, date.isoformat())
    if tables is None:
        where = lake.uri(*partition_dir(Path(), "embeddings", region.name, date.isoformat()).parts)
        raise FileNotFoundError(f"embeddings have not been materialized for {date}|{region.name} "
                                f"({where} has no committed {EMBEDDINGS_TABLE})")
    obs = observations_from_tables(*tables)
    if len(obs):
        names, proba = clf.predict(obs.vectors, encoder=obs.encoder)
    else:  # an empty partition (no scene, or every chip dropped): an empty, labelled map
        names, proba = np.array([], dtype=object), np.zeros((0, len(clf.classes)))
    class_table = {i + 1: c for i, c in enumerate(clf.classes)}
    code_of = {c: k for k, c in class_table.items()}
    codes = np.full((grid.n_rows, grid.n_cols), NODATA, np.uint8)  # one pixel per chip
    confidence = np.zeros_like(codes)
    for r, c, name, p in zip(obs.rows, obs.cols, names, proba, strict=True):
        codes[r, c] = code_of[str(name)]
        confidence[r, c] = round(100 * float(p.max()))
    transform = grid.transform * grid.transform.scale(grid.chip_size)
    status = "ok" if len(obs) else "empty"
    png = class_map_png(codes, class_table, f"{region.name} {date}: chip classes ({status})")
    with lake.write_partition("landcover_map", region.name, date.isoformat()) as staging:
        write_predictions_geojson(
            staging / "landcover_map.geojson", obs.chip_ids.tolist(), obs.geometries, names.tolist(),
            proba, clf.classes, {"date": date.isoformat(), "region": region.name})
        write_class_cog(staging / "landcover_map.tif", codes, transform, grid.epsg, class_table, confidence)
        (staging / "landcover_map.png").write_bytes(png)
        (staging / "status.json").write_text(json.dumps({"status": status, "chips": len(obs)}))
    out = lake.partition_dir("landcover_map", region.name, date.isoformat())
    counts = {c: int((names == c).sum()) for c in clf.classes}
    if status == "empty":
        context.log.warning(f"no embedded chip in {date}|{region.name}: empty land-cover map")
    return MaterializeResult(
        metadata={
            "status": status, "chips": len(obs), "class_counts": MetadataValue.json(counts),
            "mean_probability": round(float(proba.max(axis=1).mean()), 4) if len(obs) else 0.0,
            "encoder": clf.encoder[0], "geojson": MetadataValue.path(str(out / "landcover_map.geojson")),
            "cog": MetadataValue.path(str(out / "landcover_map.tif")), "preview": md_image(png, "land cover"),
        },
        check_results=[AssetCheckResult(
            check_name="one_prediction_per_embedding",
            passed=bool(int((codes != NODATA).sum()) == len(obs) == len(set(obs.chip_ids.tolist()))),
            metadata={"pixels": int((codes != NODATA).sum()), "embeddings": len(obs)},
        )],
    )


# --- the segmentation decoder ------------------------------------------------------------------------
class SegmentationConfig(TruthConfig):
    dates: list[str] = Field(default_factory=list, description="dates to train on; empty: all")
    hidden: int = Field(default=64, ge=4, description="decoder width at the feature grid")
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=8, ge=2)
    lr: float = Field(default=3e-3, gt=0)
    holdout: float = Field(default=0.25, gt=0, lt=1, description="share of chips held out for the metrics")
    seed: int = 0


@asset(
    deps=[chips],
    group_name="heads",
    kinds={"pytorch"},
    description=(
        "A convolutional decoder with pixel-shuffle upsampling from the frozen encoder's spatial "
        "features (Clay patch tokens, or rcf's feature map) to per-pixel land cover, trained on the "
        "land-cover raster's windows under the chips (forest cleared by the chip's date ignored). "
        "IoU and F1 per class on held-out chips; saved as decoder.pt + decoder.json."
    ),
    check_specs=[AssetCheckSpec("beats_majority_baseline", asset=SEGMENTATION,
                                description="held-out mean IoU above the majority class's")],
)
def landcover_segmentation(
    context: AssetExecutionContext, config: SegmentationConfig, lake: LakeResource, stac: StacResource,
    encoder: EncoderResource,
) -> MaterializeResult:
    model = build_configured_encoder(encoder)
    identity = (model.name, model.checkpoint_digest)
    root = readable_lake(lake, ["chips"], config.regions, config.dates)  # tables and datacubes
    with open_truth(config, stac) as truth:
        data = pixel_training_set(root, model, truth, regions=config.regions or None,
                                  dates=config.dates or None, log=context.log.debug)
    head, report = train_segmentation(
        data, encoder=identity, holdout=config.holdout, hidden=config.hidden, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        device=str(resolve_device(encoder.device)), log=context.log.debug)
    metrics = {"model": report.model, "baseline": report.baseline, **report.summary()}
    with lake.write_asset(SEGMENTATION) as staging:
        head.save(staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
    final = lake.asset_dir(SEGMENTATION)
    s = report.summary()
    per_class = {c: v for c, v in report.model["per_class"].items() if v["support"]}
    return MaterializeResult(
        metadata={
            "mean_iou": s["mean_iou"], "mean_f1": s["mean_f1"], "pixel_accuracy": s["pixel_accuracy"],
            "baseline_mean_iou": s["baseline_mean_iou"], "baseline_mean_f1": s["baseline_mean_f1"],
            "baseline_pixel_accuracy": s["baseline_pixel_accuracy"],
            "per_class": MetadataValue.json(per_class),
            "train_chips": s["train_chips"], "test_chips": s["test_chips"],
            "feature_seconds": round(data.feature_seconds, 2), "train_seconds": s["train_seconds"],
            "encoder": model.name, "checkpoint_digest": model.checkpoint_digest,
            "classes": MetadataValue.json(list(head.classes)),
            "decoder": MetadataValue.path(str(final / "decoder.pt")),
        },
        check_results=[AssetCheckResult(
            check_name="beats_majority_baseline",
            passed=bool(report.model["mean_iou"] > report.baseline["mean_iou"]),
            severity=AssetCheckSeverity.WARN,
            metadata={"mean_iou": s["mean_iou"], "baseline_mean_iou": s["baseline_mean_iou"]},
        )],
    )


@asset(
    partitions_def=region_date_partitions,
    backfill_policy=ONE_PARTITION_PER_RUN,
    deps=[chips, landcover_segmentation],
    automation_condition=follows_upstream_partition(),
    group_name="heads",
    kinds={"pytorch", "cog"},
    description=(
        "landcover_segmentation applied to every kept chip of the partition: one COG on the "
        "region's 10 m chip grid (band 1 class code, 0 where no chip was kept; band 2 confidence "
        "in percent) and a PNG with a legend."
    ),
    check_specs=[AssetCheckSpec("every_kept_chip_classified", asset="landcover_segmentation_map",
                                description="every pixel of every kept chip has one of the head's "
                                            "classes; no pixel outside kept chips does")],
)
def landcover_segmentation_map(
    context: AssetExecutionContext, lake: LakeResource, encoder: EncoderResource
) -> MaterializeResult:
    region, date = region_and_date(context)
    grid = ChipGrid.for_region(region)
    head = load_segmentation_head(lake.asset_dir(SEGMENTATION))
    model = build_configured_encoder(encoder)
    check_same_encoder("this segmentation decoder", head.encoder, (model.name, model.checkpoint_digest))
    root = lake.readable_root(["chips"], region.name, date.isoformat())  # table and datacubes
    rows = partition_chip_rows(root, region.name, date.isoformat())
    size = grid.chip_size
    codes = np.full((grid.height, grid.width), NODATA, np.uint8)
    confidence = np.zeros_like(codes)
    started = time.perf_counter()
    for part, features in feature_batches(root, rows, model):
        chip_codes, chip_conf = head.predict(features, encoder=(model.name, model.checkpoint_digest))
        for r, k, p in zip(part, chip_codes, chip_conf, strict=True):
            window = np.s_[r["row"] * size : (r["row"] + 1) * size, r["col"] * size : (r["col"] + 1) * size]
            codes[window] = k
            confidence[window] = np.round(100 * p).astype(np.uint8)
    class_table = dict(zip(head.codes, head.classes, strict=True))
    status = "ok" if rows else "empty"
    png = class_map_png(codes, class_table, f"{region.name} {date}: pixel classes ({status})")
    with lake.write_partition("landcover_segmentation_map", region.name, date.isoformat()) as staging:
        write_class_cog(staging / "landcover_pixels.tif", codes, grid.transform, grid.epsg, class_table,
                        confidence)
        (staging / "landcover_pixels.png").write_bytes(png)
        (staging / "status.json").write_text(json.dumps({
            "status": status, "chips": len(rows), "made_at": dt.datetime.now(dt.UTC).isoformat()}))
    out = lake.partition_dir("landcover_segmentation_map", region.name, date.isoformat())
    shares = {c: round(float((codes == k).sum()) / max(int((codes != NODATA).sum()), 1), 4)
              for k, c in class_table.items()}
    if status == "empty":
        context.log.warning(f"no kept chip in {date}|{region.name}: empty pixel class map")
    metadata: dict[str, Any] = {
        "status": status, "chips": len(rows), "class_shares": MetadataValue.json(shares),
        "encoder": model.name, "seconds": round(time.perf_counter() - started, 2),
        "cog": MetadataValue.path(str(out / "landcover_pixels.tif")),
        "preview": md_image(png, "pixel classes"),
    }
    inside = np.zeros(codes.shape, bool)
    for r in rows:
        inside[r["row"] * size : (r["row"] + 1) * size, r["col"] * size : (r["col"] + 1) * size] = True
    known = np.isin(codes, list(class_table))
    unclassified = int((inside & ~known).sum())
    stray = int((~inside & (codes != NODATA)).sum())
    return MaterializeResult(
        metadata=metadata,
        check_results=[AssetCheckResult(
            check_name="every_kept_chip_classified", passed=unclassified == 0 and stray == 0,
            metadata={"unclassified_pixels": unclassified, "pixels_outside_kept_chips": stray},
        )],
    )


HEAD_ASSETS = [landcover_classifier, landcover_map, landcover_segmentation, landcover_segmentation_map]
