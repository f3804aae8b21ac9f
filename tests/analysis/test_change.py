"""Harmonic and bitemporal change detection on known synthetic series."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from geofm_assets.analysis.change import (
    STATUS_INSUFFICIENT,
    STATUS_OK,
    BitemporalParams,
    ChangeConfigError,
    ChangeParams,
    baseline_distance_values,
    bitemporal_cell_scores,
    bitemporal_scores,
    confirmed_runs,
    detect_bitemporal,
    detect_harmonic,
    fit_harmonic,
    harmonic_changes,
    harmonic_design,
)
from geofm_assets.analysis.series import RegionSeries, RegionSpatial, SpatialPartition

START = np.datetime64("2020-01-05")
DAYS = START + np.arange(0, 3 * 365, 16)  # [T] every 16 days over three years
BREAK = np.datetime64("2021-09-01")


def day_numbers(dates: np.ndarray) -> np.ndarray:
    return dates.astype("datetime64[D]").astype(np.int64).astype(np.float64)


def seasonal(n: int, rng: np.random.Generator, noise: float = 0.004) -> np.ndarray:
    """``[n T]`` annual + semi-annual signals with random phases and a little noise."""
    t = (day_numbers(DAYS) - day_numbers(DAYS)[0]) / 365.25
    amp = rng.uniform(0.01, 0.03, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    base = 0.05 + amp * np.cos(2 * np.pi * t + phase) + 0.3 * amp * np.sin(4 * np.pi * t)
    return base + noise * rng.standard_normal((n, len(DAYS)))


def run(values: np.ndarray, valid: np.ndarray | None = None, **kw: object):
    params = ChangeParams(**kw)  # type: ignore[arg-type]
    in_baseline = DAYS - DAYS[0] < np.timedelta64(365, "D")
    if valid is None:
        valid = np.ones(values.shape[:2], bool)
    return harmonic_changes(values, valid, day_numbers(DAYS), in_baseline, params)


def test_fit_recovers_harmonic_coefficients_with_missing_observations():
    rng = np.random.default_rng(0)
    params = ChangeParams(trend=True)
    x = harmonic_design(day_numbers(DAYS), day_numbers(DAYS)[0], params)  # [T 6]
    coef = rng.normal(size=(50, params.n_params))
    mask = rng.random((50, len(DAYS))) > 0.4
    y = coef @ x.T
    y[~mask] = np.nan  # missing observations carry NaN: they must not leak into the fit
    fit = fit_harmonic(x, y, mask)
    np.testing.assert_allclose(fit.coef, coef, atol=1e-6)
    assert np.all(fit.rmse < 1e-6) and np.array_equal(fit.n_obs, mask.sum(axis=1))


def test_level_break_is_flagged_at_the_right_date_and_stable_series_are_not():
    rng = np.random.default_rng(1)
    y = seasonal(20, rng)
    after = DAYS >= BREAK
    y[:5, after] += 0.05  # ~12 noise sigmas from the break on
    out = run(y)
    assert out.ok.all()
    assert out.changed[:5].all() and not out.changed[5:].any()
    first_after = int(np.argmax(after))
    assert (out.start[:5] == first_after).all()
    assert (out.intensity[:5] > 3).all() and (out.intensity[5:] < 3).all()


def test_one_outlier_spike_and_a_short_burst_do_not_raise_an_alarm():
    rng = np.random.default_rng(2)
    y = seasonal(6, rng)
    t = int(np.argmax(DAYS >= BREAK))
    y[0, t] += 0.2  # a cloudy observation
    y[1, t : t + 2] += 0.2  # two in a row: still fewer than k = 3
    y[2, [t, t + 2, t + 4]] += 0.2  # three, not consecutive
    out = run(y)
    assert out.ok.all() and not out.changed.any()
    assert run(y, consecutive=1, persistence=0).changed[:3].all()  # k = 1 would have flagged them
    assert not run(y, consecutive=1).changed.any()  # ... were they not transient (persistence)


def test_seasonal_series_without_break_stays_unflagged_even_with_large_seasonality():
    rng = np.random.default_rng(3)
    y = 5 * seasonal(200, rng)  # strong seasons, proportional noise
    out = run(y)
    assert out.ok.all()
    assert out.changed.mean() <= 0.01


def test_gaps_are_skipped_and_the_change_dates_at_the_first_valid_observation_after_the_break():
    rng = np.random.default_rng(4)
    y = seasonal(4, rng, noise=0.003)
    after = DAYS >= BREAK
    y[:, after] += 0.05
    valid = rng.random(y.shape) > 0.3
    first_after = int(np.argmax(after))
    valid[:, first_after : first_after + 3] = False  # clouds over the break itself
    y[~valid] = np.nan
    out = run(y, valid, threshold=4.0)  # the break is ~12 sigma; keep chance exceedances out
    assert out.changed.all()
    expected = [int(np.flatnonzero(valid[i] & after)[0]) for i in range(4)]
    assert out.start.tolist() == expected


def test_a_spike_between_exceedances_is_skipped_only_when_missing():
    score = np.array([[5.0, np.nan, 5.0, 5.0, 0.0], [5.0, 0.0, 5.0, 5.0, 5.0]])
    valid = np.array([[True, False, True, True, True], [True] * 5])
    runs = confirmed_runs(score, valid, threshold=3.0, k=3)
    assert runs.changed.tolist() == [True, True]
    assert runs.start.tolist() == [0, 2]
    np.testing.assert_allclose(runs.intensity, [5.0, 5.0])


def test_too_few_observations_is_insufficient_data_never_nan():
    rng = np.random.default_rng(5)
    y = seasonal(3, rng)
    valid = np.ones(y.shape, bool)
    in_baseline = DAYS - DAYS[0] < np.timedelta64(365, "D")
    keep = np.flatnonzero(in_baseline)[:6]  # 6 < 5 parameters + margin 2
    valid[0, in_baseline] = False
    valid[0, keep] = True
    valid[1, ~in_baseline] = False
    valid[1, -2:] = True  # 2 monitoring observations < k = 3
    out = run(y, valid)
    assert out.ok.tolist() == [False, False, True]
    assert "baseline observations" in out.reason[0] and "monitoring" in out.reason[1]
    assert not out.changed[:2].any() and np.isnan(out.intensity[:2]).all()


def test_a_perfect_fit_gives_finite_scores():
    t = (day_numbers(DAYS) - day_numbers(DAYS)[0]) / 365.25
    y = np.tile(0.1 + 0.02 * np.cos(2 * np.pi * t), (3, 1))
    y[0, DAYS >= BREAK] += 0.01
    out = run(y)
    assert np.isfinite(out.score).all() and np.isfinite(out.sigma).all()
    assert out.changed.tolist() == [True, False, False]


def synthetic_series(rng: np.random.Generator, n: int, changed: int, dim: int = 16) -> RegionSeries:
    """Embeddings of ``n`` chips on DAYS: a fixed vector per chip, a seasonal wobble, noise, and
    for the first ``changed`` chips a new direction from BREAK on; 15% of observations missing."""
    base = rng.normal(size=(n, dim)) + 3.0
    wobble = rng.normal(size=(n, dim))
    t = (day_numbers(DAYS) - day_numbers(DAYS)[0]) / 365.25
    rows, chips, dates = [], [], []
    for i in range(n):
        for j in range(len(DAYS)):
            if rng.random() < 0.15:
                continue
            v = base[i] + 0.3 * np.cos(2 * np.pi * t[j]) * wobble[i] + 0.05 * rng.normal(size=dim)
            if i < changed and DAYS[j] >= BREAK:
                v = v + 2.0 * np.eye(dim)[i % dim] * 3.0
            rows.append(v)
            chips.append(i)
            dates.append(j)
    return RegionSeries(
        region="testland", model="test", checkpoint_digest="x",
        chip_ids=np.array([f"testland_r0000_c{i:04d}" for i in range(n)], dtype=object),
        dates=DAYS.astype("datetime64[D]"), chip_index=np.array(chips), date_index=np.array(dates),
        vectors=np.array(rows, np.float32), centroids=np.zeros((n, 2)), geometries=[b""] * n,
        partitions_read=len(DAYS),
    )


@pytest.mark.parametrize("series", ["baseline_distance", "pca"])
def test_detect_harmonic_on_embeddings_flags_the_changed_chips(series: str):
    s = synthetic_series(np.random.default_rng(6), n=12, changed=3)
    result = detect_harmonic(s, ChangeParams(series=series))
    assert (result.status == STATUS_OK).all()
    assert result.changed.tolist() == [True] * 3 + [False] * 9
    for i in range(3):
        observed_after = np.sort(s.date_index[(s.chip_index == i) & (s.dates[s.date_index] >= BREAK)])
        assert result.change_date[i] == s.dates[observed_after[0]]
    assert np.isnat(result.change_date[3:]).all()
    assert result.curves is not None and result.curves.values.shape == (12, len(DAYS))


def test_baseline_distance_leaves_each_baseline_observation_out_of_its_own_mean():
    u = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    dist, defined = baseline_distance_values(u, np.zeros(3, int), np.array([True, True, False]), 1)
    # row 0 vs row 1 alone: orthogonal; row 1 vs row 0: orthogonal; row 2 vs mean of both: 0
    np.testing.assert_allclose(dist, [1.0, 1.0, 0.0], atol=1e-12)
    assert defined.all()
    _, lonely = baseline_distance_values(u[:1], np.zeros(1, int), np.array([True]), 1)
    assert not lonely.any()  # nothing else to compare with: not a valid observation


def test_bitemporal_normalization_removes_the_region_wide_shift_and_illumination():
    rng = np.random.default_rng(7)
    n, dim = 60, 32
    before = rng.normal(size=(n, dim)) + 2.0
    season = 1.5 * rng.normal(size=dim)  # every chip moves the same way between the dates
    after = 1.3 * (before + season + 0.1 * rng.normal(size=(n, dim)))  # and is brighter
    after[:4] += 2.0 * rng.normal(size=(4, dim))  # four chips really change
    scores = bitemporal_scores(before, after)
    assert (scores.score[:4] > 3).all() and (scores.score[4:] < 3).all()
    assert abs(np.median(scores.score)) < 1e-9
    raw = np.linalg.norm(after - before, axis=1)  # without normalization the shift dominates
    assert raw[4:].min() > 0.5 * raw[:4].min()


def test_detect_bitemporal_marks_chips_missing_a_date_and_dates_the_change():
    s = synthetic_series(np.random.default_rng(8), n=30, changed=3)
    before, after = s.dates[2].item(), s.dates[-3].item()
    result = detect_bitemporal(s, before, after, BitemporalParams(patch=False))  # chip vectors
    seen = {(c, d) for c, d in zip(s.chip_index.tolist(), s.date_index.tolist(), strict=True)}
    both = np.array([(i, 2) in seen and (i, len(DAYS) - 3) in seen for i in range(30)])
    assert ((result.status == STATUS_OK) == both).all()
    assert (result.status[~both] == STATUS_INSUFFICIENT).all() and np.isnan(result.intensity[~both]).all()
    assert result.changed[:3][both[:3]].all() and not result.changed[3:].any()
    assert (result.change_date[result.changed] == np.datetime64(after)).all()
    with pytest.raises(ChangeConfigError, match="no embeddings on 1999-01-01"):
        detect_bitemporal(s, dt.date(1999, 1, 1), after, BitemporalParams(patch=False))


def test_bad_parameters_are_refused_with_their_name():
    with pytest.raises(ChangeConfigError, match="series 'ndvi'"):
        ChangeParams(series="ndvi")
    with pytest.raises(ChangeConfigError, match="consecutive=0"):
        ChangeParams(consecutive=0)


def test_one_date_gives_a_labelled_empty_result():
    s = synthetic_series(np.random.default_rng(9), n=4, changed=0)
    keep = s.date_index == 0
    one = RegionSeries(s.region, s.model, s.checkpoint_digest, s.chip_ids[np.unique(s.chip_index[keep])],
                       s.dates[:1], np.arange(keep.sum()), np.zeros(keep.sum(), int), s.vectors[keep],
                       s.centroids[: keep.sum()], [b""] * int(keep.sum()), 1)
    result = detect_harmonic(one)
    assert result.mode == "empty" and "1 date" in (result.empty_reason or "")
    assert (result.status == STATUS_INSUFFICIENT).all() and not result.changed.any()


# --- Patch level: cells inside each chip ----------------------------------------------------------
def patch_region(rng: np.random.Generator, n: int = 3, g: int = 4, dim: int = 12,
                 breaks: tuple[tuple[int, int], ...] = ((0, 5),)) -> tuple[RegionSeries, RegionSpatial]:
    """``n`` chips of ``g`` x ``g`` cells over DAYS: each cell a random direction with a seasonal
    wobble and noise; the cells in ``breaks`` (chip, cell) turn to a new direction from BREAK on.
    Every cell is clear on every date (tests cloud some)."""
    chip_ids = np.array([f"testland_r0000_c{i:04d}" for i in range(n)], dtype=object)
    base = rng.normal(size=(n, g * g, dim)) + 3.0
    wobble = rng.normal(size=(n, g * g, dim))
    t = (day_numbers(DAYS) - day_numbers(DAYS)[0]) / 365.25
    parts = []
    for j, day in enumerate(DAYS.astype("datetime64[D]")):
        f = base + 0.2 * np.cos(2 * np.pi * t[j]) * wobble + 0.03 * rng.normal(size=base.shape)
        if day >= BREAK:
            for chip, cell in breaks:
                f[chip, cell] = f[chip, cell] + 6.0 * np.eye(dim)[cell % dim]
        parts.append(SpatialPartition(day, chip_ids, f.reshape(n, g, g, dim).astype(np.float16),
                                      np.ones((n, g, g), np.float16)))
    chips, dates = np.meshgrid(np.arange(n), np.arange(len(DAYS)), indexing="ij")
    series = RegionSeries(
        region="testland", model="test", checkpoint_digest="x", chip_ids=chip_ids,
        dates=DAYS.astype("datetime64[D]"), chip_index=chips.ravel(), date_index=dates.ravel(),
        vectors=np.stack([parts[d].features[c].astype(np.float32).mean(axis=(0, 1))
                          for c, d in zip(chips.ravel(), dates.ravel(), strict=True)]),  # chip = mean cell
        centroids=np.zeros((n, 2)), geometries=[b""] * n, partitions_read=len(DAYS),
    )
    return series, RegionSpatial("testland", g, dim, parts, [])


def first_date_from(day: np.datetime64) -> np.datetime64:
    return DAYS.astype("datetime64[D]")[int(np.argmax(day <= DAYS))]


def test_one_cell_breaking_is_flagged_at_its_date_and_the_other_cells_stay():
    series, spatial = patch_region(np.random.default_rng(10))
    result = detect_harmonic(series, ChangeParams(min_cells=1), spatial)
    cells = result.cells
    assert cells is not None and cells.grid == 4 and cells.ok.all()
    assert np.flatnonzero(cells.changed[0]).tolist() == [5] and not cells.changed[1:].any()
    assert cells.change_date[0, 5] == first_date_from(BREAK)
    assert result.changed.tolist() == [True, False, False]
    assert result.change_date[0] == first_date_from(BREAK) and np.isnat(result.change_date[1:]).all()
    assert result.curves is not None and result.extra["plotted_cell"][0] == 5  # the plot shows that cell
    # one cell is not enough for the default min_cells = 2: the chip is not changed, the cell still is
    default = detect_harmonic(series, ChangeParams(), spatial)
    assert not default.changed.any() and default.cells is not None and default.cells.changed[0, 5]
    assert default.max_score[0] < 3 < default.cells.intensity[0, 5]


def test_two_cells_make_a_changed_chip_dated_at_the_earliest_cell():
    series, spatial = patch_region(np.random.default_rng(11), breaks=((1, 2), (1, 3)))
    result = detect_harmonic(series, ChangeParams(), spatial)
    assert result.changed.tolist() == [False, True, False]
    assert result.change_date[1] == first_date_from(BREAK)


def test_cloudy_cells_are_missing_observations():
    series, spatial = patch_region(np.random.default_rng(12))
    t = int(np.argmax(DAYS >= BREAK))
    for j in (t, t + 1):  # the broken cell is cloudy on the first two dates after the break ...
        spatial.partitions[j].clear[0, 1, 1] = 0.3
    for j in range(t - 6, t - 3):  # ... and three cloudy dates in a row on another chip
        f = np.array(spatial.partitions[j].features)
        f[2, 0, 0] = -50.0  # a cloud: wildly different features, but flagged by SCL
        spatial.partitions[j] = SpatialPartition(spatial.partitions[j].date, spatial.partitions[j].chip_ids,
                                                 f, spatial.partitions[j].clear)
        spatial.partitions[j].clear[2, 0, 0] = 0.2
    params = ChangeParams(min_cells=1, persistence=0)  # no persistence test: masking alone
    result = detect_harmonic(series, params, spatial)
    assert result.cells is not None and np.flatnonzero(result.cells.changed.ravel()).tolist() == [5]
    assert result.cells.change_date[0, 5] == DAYS.astype("datetime64[D]")[t + 2]  # first clear one
    cloudless = detect_harmonic(series, ChangeParams(min_cells=1, min_clear=0.0, persistence=0), spatial)
    assert cloudless.cells is not None and cloudless.cells.changed[2, 0]  # the cloud, taken for ground


def test_patch_series_without_spatial_features_says_what_to_do():
    series, spatial = patch_region(np.random.default_rng(13), n=2)
    with pytest.raises(ChangeConfigError, match="spatial_grid > 0"):
        detect_harmonic(series, ChangeParams())
    partial = RegionSpatial("testland", 4, spatial.dim, spatial.partitions[1:], [str(DAYS[0])])
    with pytest.raises(ChangeConfigError, match=str(DAYS[0])):
        detect_harmonic(series, ChangeParams(), partial)


def test_bitemporal_patch_scores_a_chip_by_its_changed_cells():
    series, spatial = patch_region(np.random.default_rng(14), n=8, breaks=((3, 0), (3, 1)))
    before, after = series.dates[2].item(), series.dates[-2].item()
    result = detect_bitemporal(series, before, after, spatial=spatial)
    assert result.cells is not None and result.mode == "bitemporal"
    assert result.changed.tolist() == [i == 3 for i in range(8)]
    assert np.argmax(result.intensity) == 3 and result.cells.changed[3, :2].all()
    chip_z, cell_z = bitemporal_cell_scores(np.ones((2, 4, 3)), np.ones((2, 4, 3)),
                                            np.array([[True, True, False, False], [True] * 4]), 3)
    assert np.isnan(chip_z[0]) and np.isfinite(chip_z[1]) and np.isnan(cell_z[0, 2:]).all()
