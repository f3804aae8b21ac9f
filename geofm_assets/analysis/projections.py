"""Low-dimensional views of a region's embeddings over all its dates: PCA and t-SNE.

PCA is fitted on every vector of the region (all chips x dates), so component scores are
comparable across dates: a chip drifting along PC1 over time is a change in what the encoder
sees. t-SNE is a picture, not a measurement: it is run on a seeded subsample when the region
has more vectors than ``tsne_max_points``, on the vectors first reduced to at most
``TSNE_INPUT_DIMS`` principal components (the usual preprocessing, and much faster).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from geofm_assets.analysis.series import RegionSeries, as_dates
from geofm_assets.geo.previews import figure_png

PROJECTIONS_TABLE = "projections.parquet"
PROJECTIONS_PLOT = "projections.png"

DEFAULT_N_COMPONENTS = 8
DEFAULT_TSNE_MAX_POINTS = 5000
# t-SNE needs a handful of points to mean anything (and n > perplexity); below this it is skipped.
MIN_TSNE_POINTS = 5
DEFAULT_PERPLEXITY = 30.0
TSNE_INPUT_DIMS = 50


class ProjectionError(ValueError):
    """Projection parameters or inputs that cannot be used (say which and what to do)."""


@dataclass(frozen=True, eq=False)
class PcaResult:
    scores: np.ndarray | None  # [M K] float32, None when PCA was skipped
    explained_variance_ratio: np.ndarray  # [K] float64, non-increasing, sums to <= 1
    requested: int
    skipped_reason: str | None

    @property
    def n_components(self) -> int:
        return 0 if self.scores is None else int(self.scores.shape[1])


@dataclass(frozen=True, eq=False)
class TsneResult:
    coords: np.ndarray  # [M 2] float32: NaN for rows not in the sample, all NaN when skipped
    in_sample: np.ndarray  # [M] bool: which rows were embedded
    perplexity: float | None
    subsampled: bool
    skipped_reason: str | None

    @property
    def n_points(self) -> int:
        return int(self.in_sample.sum())


def fit_pca(vectors: np.ndarray, n_components: int = DEFAULT_N_COMPONENTS, seed: int = 0) -> PcaResult:
    """PCA of ``vectors`` ``[M D]``: the first ``n_components`` scores, capped by the data at
    ``M - 1`` (centred data of M rows has at most M - 1 directions of variance) and ``D``."""
    if n_components < 1:
        raise ProjectionError(f"n_components must be at least 1, got {n_components}")
    m = int(vectors.shape[0])
    d = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    if m < 2:
        return PcaResult(None, np.zeros(0), n_components, f"PCA needs at least 2 vectors, the region has {m}")
    _require_finite(vectors)
    if float(vectors.astype(np.float64).var(axis=0).sum()) == 0.0:
        return PcaResult(None, np.zeros(0), n_components, f"all {m} vectors are identical (no variance)")
    k = min(n_components, m - 1, d)
    pca = PCA(n_components=k, random_state=seed)
    scores = pca.fit_transform(vectors).astype(np.float32)  # [M K]
    return PcaResult(scores, np.asarray(pca.explained_variance_ratio_, np.float64), n_components, None)


def _require_finite(vectors: np.ndarray) -> None:
    if not np.isfinite(vectors).all():
        raise ProjectionError(
            "the region's vectors contain NaN or infinite values: fix the embeddings partitions "
            "whose `vectors_finite` check failed and materialize them again"
        )


def adapted_perplexity(n_points: int, preferred: float = DEFAULT_PERPLEXITY) -> float:
    """``preferred`` unless the sample is small: then (n - 1) / 3, the largest that leaves each
    point about three times its perplexity in neighbours (t-SNE needs n > perplexity)."""
    return float(max(1.0, min(preferred, (n_points - 1) / 3.0)))


def fit_tsne(
    vectors: np.ndarray, max_points: int = DEFAULT_TSNE_MAX_POINTS, seed: int = 0, threads: int | None = None
) -> TsneResult:
    """2-D t-SNE of ``vectors`` ``[M D]``, on a seeded subsample of ``max_points`` rows when there
    are more; rows outside the sample get NaN coordinates. ``threads`` caps the OpenMP/BLAS
    threads (None: all cores); on a busy machine one thread is often faster than spinning."""
    if max_points < MIN_TSNE_POINTS:
        raise ProjectionError(f"tsne_max_points must be at least {MIN_TSNE_POINTS}, got {max_points}")
    if threads is not None and threads < 1:
        raise ProjectionError(f"t-SNE threads must be at least 1 (or unset for all cores), got {threads}")
    m = int(vectors.shape[0])
    in_sample = np.zeros(m, bool)
    coords = np.full((m, 2), np.nan, np.float32)
    if m < MIN_TSNE_POINTS:
        return TsneResult(coords, in_sample, None, False,
                          f"t-SNE needs at least {MIN_TSNE_POINTS} vectors, the region has {m}")
    _require_finite(vectors)
    subsampled = m > max_points
    rows = np.sort(np.random.default_rng(seed).choice(m, max_points, replace=False)) if subsampled else (
        np.arange(m))
    sample = vectors[rows].astype(np.float32)  # [S D]
    if float(sample.astype(np.float64).var(axis=0).sum()) == 0.0:
        return TsneResult(coords, in_sample, None, subsampled,
                          f"all {len(rows)} sampled vectors are identical (no structure to show)")
    if sample.shape[1] > TSNE_INPUT_DIMS and len(rows) > TSNE_INPUT_DIMS + 1:
        sample = PCA(n_components=TSNE_INPUT_DIMS, random_state=seed).fit_transform(sample)  # [S 50]
    perplexity = adapted_perplexity(len(rows))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(limits=threads):
        coords[rows] = tsne.fit_transform(sample).astype(np.float32)  # [S 2]
    in_sample[rows] = True
    return TsneResult(coords, in_sample, perplexity, subsampled, None)


@dataclass(frozen=True, eq=False)
class RegionProjections:
    series: RegionSeries
    pca: PcaResult
    tsne: TsneResult
    order: np.ndarray  # [M] int: observations sorted by chip, then date (the table's row order)

    @property
    def status(self) -> str:
        m = len(self.order)
        if m == 0:
            return (f"no embeddings for region {self.series.region!r} yet "
                    f"({self.series.partitions_read} date partitions read): materialize `embeddings` "
                    "for its dates first; this table is empty until then")
        return f"{m} vectors of {self.series.n_chips} chips over {self.series.n_dates} dates"

    def table(self) -> pa.Table:
        """One row per observation (chip x date), sorted by chip and date."""
        s, o = self.series, self.order
        k = self.pca.n_components or self.pca.requested
        columns: dict[str, pa.Array] = {
            "chip_id": pa.array(s.chip_ids[s.chip_index[o]].tolist(), pa.string()),
            "region": pa.array([s.region] * len(o), pa.string()),
            "date": pa.array(as_dates(s.dates[s.date_index[o]]), pa.date32()),
        }
        for j in range(k):
            values = (np.full(len(o), np.nan, np.float32) if self.pca.scores is None
                      else self.pca.scores[o, j])
            columns[f"pc{j + 1}"] = pa.array(values, pa.float32(), mask=np.isnan(values))
        for j, name in enumerate(("tsne_x", "tsne_y")):
            values = self.tsne.coords[o, j]
            columns[name] = pa.array(values, pa.float32(), mask=~self.tsne.in_sample[o])
        table = pa.table(columns)
        return table.replace_schema_metadata({b"projections": json.dumps(self.summary()).encode()})

    def summary(self) -> dict[str, Any]:
        """What was computed, for the table's metadata and the asset's."""
        s = self.series
        ratio = self.pca.explained_variance_ratio
        return {
            "region": s.region,
            "status": self.status,
            "model": s.model,
            "checkpoint_digest": s.checkpoint_digest,
            "vectors": len(self.order),
            "chips": s.n_chips,
            "dates": [d.isoformat() for d in as_dates(s.dates)],
            "pca_components_requested": self.pca.requested,
            "pca_components": self.pca.n_components,
            "pca_skipped": self.pca.skipped_reason,
            "explained_variance_ratio": [round(float(r), 6) for r in ratio],
            "explained_variance_total": round(float(ratio.sum()), 6),
            "tsne_points": self.tsne.n_points,
            "tsne_subsampled": self.tsne.subsampled,
            "tsne_left_out": int(len(self.order) - self.tsne.n_points) if self.tsne.skipped_reason is None
            else 0,
            "tsne_perplexity": self.tsne.perplexity,
            "tsne_skipped": self.tsne.skipped_reason,
        }


def project_region(
    series: RegionSeries,
    n_components: int = DEFAULT_N_COMPONENTS,
    tsne_max_points: int = DEFAULT_TSNE_MAX_POINTS,
    seed: int = 0,
    tsne_threads: int | None = None,
) -> RegionProjections:
    """PCA (all vectors) and t-SNE (seeded subsample) of a region's series."""
    vectors = series.vectors  # [M D]
    order = np.lexsort((series.date_index, series.chip_index))  # [M]
    return RegionProjections(
        series=series,
        pca=fit_pca(vectors, n_components, seed),
        tsne=fit_tsne(vectors, tsne_max_points, seed, tsne_threads),
        order=order,
    )


def projection_plot(projections: RegionProjections, dpi: int = 100) -> bytes | None:
    """PNG: PC1 vs PC2 and the t-SNE map side by side, points coloured by date; None when the
    region has no vectors."""
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure

    s = projections.series
    if len(projections.order) == 0:
        return None
    day = np.asarray(mdates.date2num(as_dates(s.dates[s.date_index])), np.float64)  # [M]
    fig = Figure(figsize=(11, 4.6), dpi=dpi, layout="constrained")
    ax_pca, ax_tsne = fig.subplots(1, 2)
    norm = _date_norm(day)
    scatter = None
    pca = projections.pca
    if pca.scores is not None:
        y = pca.scores[:, 1] if pca.n_components > 1 else np.zeros(len(day), np.float32)
        scatter = ax_pca.scatter(pca.scores[:, 0], y, c=day, cmap="viridis", norm=norm, s=14)
        ratio = pca.explained_variance_ratio
        ax_pca.set_xlabel(f"PC1 ({ratio[0]:.0%})")
        ax_pca.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "(only one component)")
    else:
        _skipped(ax_pca, pca.skipped_reason or "")
    ax_pca.set_title("PCA, all vectors")
    tsne = projections.tsne
    if tsne.skipped_reason is None:
        inside = tsne.in_sample
        scatter = ax_tsne.scatter(tsne.coords[inside, 0], tsne.coords[inside, 1], c=day[inside],
                                  cmap="viridis", norm=norm, s=14)
        left_out = f", {int((~inside).sum())} left out" if tsne.subsampled else ""
        ax_tsne.set_title(f"t-SNE, {tsne.n_points} vectors (perplexity {tsne.perplexity:.0f}{left_out})")
        ax_tsne.set_xticks([])
        ax_tsne.set_yticks([])
    else:
        ax_tsne.set_title("t-SNE")
        _skipped(ax_tsne, tsne.skipped_reason)
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=[ax_pca, ax_tsne], shrink=0.9, label="date")
        bar.ax.yaxis.set_major_locator(mdates.AutoDateLocator())
        bar.ax.yaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.suptitle(f"{s.region}: {s.model} embeddings, {s.n_chips} chips x {s.n_dates} dates")
    return figure_png(fig)


def _date_norm(day: np.ndarray) -> Any:
    from matplotlib.colors import Normalize

    lo, hi = float(day.min()), float(day.max())
    return Normalize(lo, hi if hi > lo else lo + 1.0)


def _skipped(ax: Any, reason: str) -> None:
    ax.text(0.5, 0.5, f"skipped:\n{reason}", ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
