"""Heads on frozen embeddings, on the seeded sample with the default encoder (rcf): the chip
classifier's grouped cross-validated accuracy and the segmentation decoder's held-out mean
IoU, each beside the majority-class baseline measured on the same folds / pixels, and the
time each takes to train.

    .venv/bin/python bench/heads.py [--size tiny] [--epochs 20] [--hidden 32]

The sample and its lake (tiles, chips, rcf embeddings) are made in-process on first use under
``bench/out/heads-<size>/`` as tests/conftest.py's ``tiny_lake`` does. The last line is the
classifier's accuracy (default labels: the truth raster's majority class under each chip).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def build_lake(size: str) -> tuple[Path, Path]:
    """(lake root, catalog path) of the ``size`` sample carried through tiles, chips and rcf
    embeddings for every region x date; reused when already there."""
    from dagster import DagsterInstance, materialize

    from geofm_assets.assets.chips import chips
    from geofm_assets.assets.tiles import sentinel2_tiles
    from geofm_assets.geo.sample_data import generate_sample
    from geofm_assets.models import build_encoder
    from geofm_assets.partitions import DATE_PARTITIONS_NAME, REGIONS, partition_key
    from geofm_assets.resources.lake import LocalLakeResource
    from geofm_assets.resources.stac import StacResource
    from geofm_assets.workers.embed import embed_partition

    base = OUT / f"heads-{size}"
    root, done = base / "lake", base / "lake.done"
    catalog = base / "sample" / "catalog.json"
    if done.exists():
        return root, catalog
    sample = generate_sample(base / "sample", size=size, seed=0)
    inst = DagsterInstance.ephemeral()
    dates = [d.isoformat() for d in sample.dates]
    inst.add_dynamic_partitions(DATE_PARTITIONS_NAME, dates)
    res = {"stac": StacResource(catalog=str(sample.catalog_path)), "lake": LocalLakeResource(root=str(root))}
    encoder = build_encoder("rcf")
    for region in sorted(REGIONS):
        for date in dates:
            result = materialize([sentinel2_tiles, chips], instance=inst, resources=res,
                                 partition_key=str(partition_key(date, region)))
            if not result.success:
                raise RuntimeError(f"tiles/chips failed for {date}|{region}")
            embed_partition(root, region, date, encoder, batch_size=8, log=lambda _m: None)
    done.write_text("ok\n")
    return root, catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from geofm_assets.heads.classifier import train_classifier
    from geofm_assets.heads.labels import LandcoverTruth, labels_from_truth, load_observations
    from geofm_assets.heads.segmentation import pixel_training_set, train_segmentation
    from geofm_assets.models import build_encoder

    t0 = time.perf_counter()
    root, catalog = build_lake(args.size)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sample {args.size} (lake ready in "
          f"{time.perf_counter() - t0:.1f} s)")
    obs = load_observations(root)
    print(f"observations: {len(obs)} (chip x date) over {len(set(obs.chip_ids))} chips, encoder {obs.model}")

    results = {}
    with LandcoverTruth.beside_catalog(catalog) as truth:
        for name, min_share in (("majority class (default)", 0.0), ("forest vs mixed (min_share 0.7)", 0.7)):
            labels = labels_from_truth(obs, truth, min_share=min_share)
            counts = {c: int((labels.labels == c).sum()) for c in sorted({str(v) for v in labels.labels})}
            for kind in ("logistic", "mlp"):
                started = time.perf_counter()
                _, report = train_classifier(obs.vectors, labels.labels, obs.chip_ids,
                                             encoder=obs.encoder, kind=kind)
                seconds = time.perf_counter() - started
                results[(min_share, kind)] = report.accuracy
                print(f"classifier {kind:8s} labels {name}: {counts}; grouped {report.folds}-fold CV "
                      f"accuracy {report.accuracy:.4f} vs majority baseline {report.baseline_accuracy:.4f} "
                      f"(ratio {report.accuracy / report.baseline_accuracy:.3f}); macro F1 "
                      f"{report.macro_f1:.4f} vs {report.baseline_macro_f1:.4f}; train (CV + final fit) "
                      f"{seconds:.2f} s")

        encoder = build_encoder("rcf")
        data = pixel_training_set(root, encoder, truth)
    print(f"segmentation features: {len(data.features)} chips x {data.features.shape[1:]} in "
          f"{data.feature_seconds:.1f} s ({data.feature_seconds / len(data.features):.3f} s a chip)")
    _, rep = train_segmentation(data, encoder=(encoder.name, encoder.checkpoint_digest),
                                hidden=args.hidden, epochs=args.epochs, device=args.device)
    m, b = rep.model, rep.baseline
    print(f"segmentation decoder (hidden {args.hidden}, {args.epochs} epochs, {rep.train_chips} train / "
          f"{rep.test_chips} held-out chips): mean IoU {m['mean_iou']:.4f} vs majority baseline "
          f"{b['mean_iou']:.4f}; mean F1 {m['mean_f1']:.4f} vs {b['mean_f1']:.4f}; pixel accuracy "
          f"{m['pixel_accuracy']:.4f} vs {b['pixel_accuracy']:.4f}; train {rep.train_seconds:.1f} s")
    shown = [f"{c} {v['iou']:.3f}" for c, v in m["per_class"].items() if v["support"]]
    print("per-class IoU (held-out classes): " + ", ".join(shown))
    print(f"classifier_accuracy {results[(0.0, 'logistic')]:.4f}")


if __name__ == "__main__":
    main()
