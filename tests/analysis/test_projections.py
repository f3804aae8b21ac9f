"""PCA and t-SNE of a region's series, on small synthetic vectors with known structure."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from sklearn.decomposition import PCA

from geofm_assets.analysis.projections import (
    MIN_TSNE_POINTS,
    ProjectionError,
    adapted_perplexity,
    fit_pca,
    fit_tsne,
    project_region,
    projection_plot,
)
from geofm_assets.analysis.series import RegionSeries


def synthetic_series(chip_index: list[int], date_index: list[int], vectors: np.ndarray,
                     dates: list[str], region: str = "testland") -> RegionSeries:
    """A RegionSeries as ``load_region_series`` returns it, from explicit observations."""
    n_chips = max(chip_index, default=-1) + 1
    return RegionSeries(
        region=region, model="synthetic" if len(vectors) else None, checkpoint_digest=None,
        chip_ids=np.array([f"{region}_r0000_c{i:04d}" for i in range(n_chips)], dtype=object),
        dates=np.array(dates, dtype="datetime64[D]"),
        chip_index=np.asarray(chip_index, np.int64), date_index=np.asarray(date_index, np.int64),
        vectors=np.asarray(vectors, np.float32),
        centroids=np.zeros((n_chips, 2)), geometries=[b""] * n_chips, partitions_read=len(dates),
    )


def planar_cloud(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[n dim]`` points spread with std 3 along one unit axis and 1 along an orthogonal one
    (plus 1e-3 noise), and the two axes ``[2 dim]``."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.normal(size=(dim, 2)))  # [dim 2] orthonormal
    coeffs = rng.normal(size=(n, 2)) * np.array([3.0, 1.0])  # [n 2]
    points = 5.0 + coeffs @ axes.T + rng.normal(scale=1e-3, size=(n, dim))  # [n dim]
    return points.astype(np.float32), axes.T


def test_pca_recovers_known_axes_and_variance_shares():
    points, axes = planar_cloud()
    result = fit_pca(points, n_components=4)
    ratio = result.explained_variance_ratio
    assert result.n_components == 4 and result.skipped_reason is None
    assert ratio.sum() <= 1.0 + 1e-9 and (np.diff(ratio) <= 0).all() and (ratio >= 0).all()
    # two real directions: variance 9 and 1 (empirical, so about 0.9 and 0.1), the rest noise
    assert ratio[0] == pytest.approx(0.9, abs=0.03) and ratio[1] == pytest.approx(0.1, abs=0.03)
    assert ratio[2:].sum() < 1e-4  # noise (and float32 rounding) only
    # PC1 scores are the points' coordinates along the std-3 axis, up to sign
    along = (points - points.mean(axis=0)) @ axes[0]  # [n]
    corr = np.corrcoef(result.scores[:, 0], along)[0, 1]
    assert abs(corr) > 0.999


def test_pca_scores_reproduce_sklearn():
    points, _ = planar_cloud(n=60, dim=12, seed=3)
    result = fit_pca(points, n_components=5, seed=0)
    reference = PCA(n_components=5, svd_solver="full").fit(points.astype(np.float64))
    expected = reference.transform(points.astype(np.float64))  # [n 5]
    signs = np.sign((result.scores[:, :2] * expected[:, :2]).sum(axis=0))  # the real axes only
    np.testing.assert_allclose(result.scores[:, :2] * signs, expected[:, :2], atol=1e-3)
    np.testing.assert_allclose(result.explained_variance_ratio, reference.explained_variance_ratio_,
                               atol=1e-5)


@pytest.mark.parametrize(("n", "dim", "requested", "expected"), [(4, 3, 8, 3), (3, 10, 8, 2), (50, 16, 8, 8)])
def test_pca_components_capped_by_data(n, dim, requested, expected):
    vectors = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    result = fit_pca(vectors, n_components=requested)
    assert result.n_components == expected and result.requested == requested
    assert result.scores is not None and result.scores.shape == (n, expected)


def test_pca_skips_with_a_reason_when_there_is_no_variance():
    one = fit_pca(np.ones((1, 4), np.float32))
    assert one.scores is None and "at least 2 vectors" in (one.skipped_reason or "")
    same = fit_pca(np.ones((6, 4), np.float32))
    assert same.scores is None and "identical" in (same.skipped_reason or "")


def test_bad_parameters_and_non_finite_vectors_are_refused():
    vectors = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(ProjectionError, match="n_components"):
        fit_pca(vectors, n_components=0)
    with pytest.raises(ProjectionError, match="tsne_max_points"):
        fit_tsne(vectors, max_points=2)
    vectors[3, 1] = np.nan
    with pytest.raises(ProjectionError, match="vectors_finite"):
        fit_pca(vectors)


def test_perplexity_adapts_to_small_samples():
    assert adapted_perplexity(5000) == 30.0
    assert adapted_perplexity(46) == 15.0
    assert adapted_perplexity(5) < 5  # t-SNE needs n > perplexity


def test_tsne_skipped_below_minimum_with_reason():
    vectors = np.random.default_rng(0).normal(size=(MIN_TSNE_POINTS - 1, 8)).astype(np.float32)
    result = fit_tsne(vectors)
    assert result.skipped_reason is not None and f"at least {MIN_TSNE_POINTS}" in result.skipped_reason
    assert result.n_points == 0 and np.isnan(result.coords).all()


def test_tsne_subsample_is_seeded_and_leaves_the_rest_null():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    a = fit_tsne(vectors, max_points=12, seed=7, threads=1)
    b = fit_tsne(vectors, max_points=12, seed=7, threads=1)
    c = fit_tsne(vectors, max_points=12, seed=8, threads=1)
    assert a.subsampled and a.n_points == 12 and a.perplexity == pytest.approx(11 / 3)
    np.testing.assert_array_equal(a.in_sample, b.in_sample)
    np.testing.assert_allclose(a.coords[a.in_sample], b.coords[b.in_sample])
    assert not np.array_equal(a.in_sample, c.in_sample)
    assert np.isfinite(a.coords[a.in_sample]).all() and np.isnan(a.coords[~a.in_sample]).all()


def test_tsne_keeps_well_separated_clusters_apart():
    rng = np.random.default_rng(2)
    centres = np.zeros((2, 20))
    centres[1, 0] = 50.0
    labels = np.repeat([0, 1], 15)
    vectors = (centres[labels] + rng.normal(size=(30, 20))).astype(np.float32)
    result = fit_tsne(vectors, seed=0, threads=1)
    xy = result.coords  # [30 2]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)  # [30 30]
    same = labels[:, None] == labels[None]
    off_diag = ~np.eye(30, dtype=bool)
    assert dist[~same].min() > dist[same & off_diag].max()


def test_region_table_is_one_row_per_observation_sorted_with_nullable_tsne():
    rng = np.random.default_rng(4)
    # 3 chips x 4 dates, chip 2 missing on date 1; observations listed date by date as the lake does
    obs = [(c, d) for d in range(4) for c in range(3) if (c, d) != (2, 1)]
    chip_index, date_index = [c for c, _ in obs], [d for _, d in obs]
    vectors = rng.normal(size=(len(obs), 16))
    series = synthetic_series(chip_index, date_index, vectors,
                              ["2021-01-05", "2021-02-04", "2021-03-06", "2021-04-05"])
    result = project_region(series, n_components=3, tsne_max_points=8, seed=0, tsne_threads=1)
    table = result.table()
    assert table.column_names == ["chip_id", "region", "date", "pc1", "pc2", "pc3", "tsne_x", "tsne_y"]
    assert table.schema.field("date").type == pa.date32()
    assert table.schema.field("pc1").type == pa.float32()
    assert table.num_rows == len(obs)
    keys = list(zip(table.column("chip_id").to_pylist(), table.column("date").to_pylist(), strict=True))
    assert keys == sorted(keys)
    assert table.column("tsne_x").null_count == len(obs) - 8 and table.column("pc1").null_count == 0
    meta = json.loads(table.schema.metadata[b"projections"])
    assert meta["tsne_subsampled"] and meta["tsne_left_out"] == len(obs) - 8
    assert meta["pca_components"] == 3 and len(meta["explained_variance_ratio"]) == 3
    # the row for chip 1 on date 2 carries that observation's PCA scores
    row = keys.index(("testland_r0000_c0001", series.dates[2].item()))
    src = obs.index((1, 2))
    assert table.column("pc1")[row].as_py() == pytest.approx(float(result.pca.scores[src, 0]))
    png = projection_plot(result)
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_empty_region_gives_an_empty_labelled_table():
    series = synthetic_series([], [], np.zeros((0, 0)), [])
    result = project_region(series, n_components=4)
    table = result.table()
    assert table.num_rows == 0
    assert table.column_names == ["chip_id", "region", "date", "pc1", "pc2", "pc3", "pc4", "tsne_x", "tsne_y"]
    assert "no embeddings" in json.loads(table.schema.metadata[b"projections"])["status"]
    assert projection_plot(result) is None


def test_tiny_region_projects_what_it_can_and_says_why_not_the_rest():
    series = synthetic_series([0, 1], [0, 0], np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]]), ["2021-01-05"])
    result = project_region(series, n_components=8)
    assert result.pca.n_components == 1  # two vectors: one direction of variance
    assert result.pca.explained_variance_ratio == pytest.approx([1.0])
    assert result.tsne.skipped_reason is not None and result.tsne.n_points == 0
    table = result.table()
    assert [c for c in table.column_names if c.startswith("pc")] == ["pc1"]
    assert table.column("tsne_x").null_count == 2
    meta = json.loads(table.schema.metadata[b"projections"])
    assert meta["tsne_skipped"] == result.tsne.skipped_reason and meta["tsne_left_out"] == 0
    png = projection_plot(result)
    assert png is not None and png.startswith(b"\x89PNG")
