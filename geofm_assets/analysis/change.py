"""Change detection over a region's embedding time series (no Dagster imports).

Two modes share one result type (``ChangeResult``):

* ``harmonic`` (CCDC-like) — per chip, a harmonic regression (annual and semi-annual terms,
  optionally a linear trend) is fitted to the chip's series over the baseline period, predicted
  over the monitoring period, and the residuals are standardized by the baseline fit's RMSE
  (with a floor). A change is confirmed when ``consecutive`` valid observations in a row exceed
  ``threshold``; the change date is the first observation of that run. All chips of a region are
  fitted in one batched normal-equation solve (``fit_harmonic``), with per-chip masks for missing
  observations, and runs are found with one pass over the dates vectorized over the chips.
* ``bitemporal`` — two dates only: each chip's before -> after displacement in embedding space
  minus the region's typical displacement (season, illumination), standardized robustly
  (median / MAD) over the region's chips (``bitemporal_scores``).

The chip's series (config ``series``):

* ``baseline_distance`` (default) — the cosine distance of each observation to the chip's
  baseline-mean embedding (a baseline observation is compared to the mean of the *other*
  baseline observations, so the baseline fit's error is not biased low). Only an increase of
  the distance counts as change: the score is the signed standardized residual.
* ``pca`` — the first ``n_components`` principal components of the L2-normalized vectors, fit
  across all observations of the region (at most ``PCA_FIT_ROWS`` rows, seeded sample). Each
  component gets its own harmonic fit; the score of an observation is the sum of its squared
  standardized residuals (chi-square with K degrees of freedom under no change) mapped to an
  equivalent one-sided normal z with the Wilson-Hilferty transform, so one ``threshold`` means
  the same in both modes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse

from geofm_assets.analysis.series import RegionSeries, RegionSpatial, SpatialPartition

SeriesKind = Literal["patch_distance", "baseline_distance", "pca"]
SERIES_KINDS: tuple[str, ...] = ("patch_distance", "baseline_distance", "pca")
STATUS_OK = "ok"
STATUS_INSUFFICIENT = "insufficient_data"
PCA_FIT_ROWS = 20000
CELL_BLOCK_CHIPS = 256  # chips whose cell features are held at once
MAD_TO_SIGMA = 1.4826


class ChangeConfigError(ValueError):
    """Change-detection parameters that cannot be used."""


@dataclass(frozen=True)
class ChangeParams:
    """Parameters of the harmonic change detection (defaults are the product's defaults)."""

    series: str = "patch_distance"
    n_components: int = 3  # series "pca" only
    min_clear: float = 0.9  # patch_distance: a cell observation counts when this fraction is clear
    min_cells: int = 2  # patch_distance: confirmed cells a chip needs to be changed
    baseline_days: int = 365  # baseline = the region's first date + this many days (exclusive)
    baseline_end: dt.date | None = None  # explicit last baseline date (inclusive), overrides days
    harmonics: int = 2  # 1: annual; 2: annual + semi-annual
    trend: bool = False
    period_days: float = 365.25
    threshold: float = 3.0  # standardized residual (z) an observation must exceed
    consecutive: int = 3  # k: valid observations in a row over the threshold to confirm
    persistence: float = 0.5  # of the valid observations after the confirming run, the fraction
    #                           that must stay over the threshold (a lasting change; 0: off)
    margin: int = 2  # baseline observations needed beyond the model's parameters
    rmse_floor_fraction: float = 0.5  # RMSE floor: this fraction of the region's median RMSE
    screen: float = 4.0  # drop baseline observations beyond this robust z, then refit (0: off)
    min_rmse: float = 1e-6  # absolute RMSE floor (a perfect fit must not give infinite z)

    def __post_init__(self) -> None:
        if self.series not in SERIES_KINDS:
            raise ChangeConfigError(
                f"change series {self.series!r} is unknown: choose one of {', '.join(SERIES_KINDS)}"
            )
        for name, low in (("n_components", 1), ("baseline_days", 1), ("harmonics", 0),
                          ("consecutive", 1), ("margin", 0), ("min_cells", 1)):
            if getattr(self, name) < low:
                raise ChangeConfigError(f"change parameter {name}={getattr(self, name)} must be >= {low}")
        if self.screen < 0:
            raise ChangeConfigError(f"change parameter screen={self.screen} must be >= 0 (0: off)")
        for name in ("threshold", "period_days", "min_rmse"):
            if not getattr(self, name) > 0:
                raise ChangeConfigError(f"change parameter {name}={getattr(self, name)} must be > 0")
        for name in ("min_clear", "persistence"):
            if not 0 <= getattr(self, name) <= 1:
                raise ChangeConfigError(f"change parameter {name}={getattr(self, name)} must be in [0, 1]")
        if not 0 <= self.rmse_floor_fraction <= 1:
            raise ChangeConfigError(
                f"change parameter rmse_floor_fraction={self.rmse_floor_fraction} must be in [0, 1]"
            )

    @property
    def n_params(self) -> int:
        """Coefficients of the harmonic model: intercept, trend, a cos and a sin per harmonic."""
        return 1 + int(self.trend) + 2 * self.harmonics

    @property
    def min_baseline_obs(self) -> int:
        return self.n_params + self.margin

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["baseline_end"] = self.baseline_end.isoformat() if self.baseline_end else None
        return out


@dataclass(frozen=True)
class BitemporalParams:
    """Parameters of the two-date score."""

    threshold: float = 3.0  # robust z a chip's normalized displacement must exceed
    min_spread: float = 1e-6  # floor of the robust spread (a region of identical chips)
    patch: bool = True  # score cells (spatial features) and aggregate per chip; False: chip vectors
    min_clear: float = 0.9  # patch: a cell counts when this fraction is clear on both dates
    min_cells: int = 2  # patch: the chip's score is its min_cells-th highest cell z

    def __post_init__(self) -> None:
        if not self.threshold > 0 or not self.min_spread > 0:
            raise ChangeConfigError(
                f"bitemporal threshold={self.threshold} and min_spread={self.min_spread} must be > 0"
            )
        if not 0 <= self.min_clear <= 1 or self.min_cells < 1:
            raise ChangeConfigError(
                f"bitemporal min_clear={self.min_clear} must be in [0, 1] and min_cells={self.min_cells} >= 1"
            )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- The harmonic model ---------------------------------------------------------------------------
def harmonic_design(days: np.ndarray, origin: float, params: ChangeParams) -> np.ndarray:
    """``[T P]`` regressors at ``days`` (days since the epoch): 1, [years since ``origin``],
    then cos and sin of 2 pi h t / period for h = 1..harmonics."""
    t = (np.asarray(days, np.float64) - origin) / params.period_days  # [T] years
    cols = [np.ones_like(t)]
    if params.trend:
        cols.append(t)
    for h in range(1, params.harmonics + 1):
        cols += [np.cos(2 * np.pi * h * t), np.sin(2 * np.pi * h * t)]
    return np.stack(cols, axis=1)


@dataclass(frozen=True, eq=False)
class HarmonicFit:
    coef: np.ndarray  # [S P]
    rmse: np.ndarray  # [S] sqrt(SSE / max(n - P, 1)) on the fitted observations
    n_obs: np.ndarray  # [S] observations used

    def predict(self, design: np.ndarray) -> np.ndarray:
        """``[S T]`` predictions at the rows of ``design`` ``[T P]``."""
        return self.coef @ design.T


def fit_harmonic(design: np.ndarray, values: np.ndarray, mask: np.ndarray) -> HarmonicFit:
    """Least squares of every series on one design, in one batched solve.

    design ``[T P]``; values ``[S T]`` (anything where ``mask`` is False, NaN included);
    mask ``[S T]`` bool: which observations each series' fit uses. The normal equations
    ``X' W_s X b_s = X' W_s y_s`` are built for all series at once (two GEMMs) and solved as one
    stacked ``[S P P]`` system; a tiny ridge keeps series with fewer observations than
    parameters solvable (they are flagged by their ``n_obs``, not fitted meaningfully)."""
    x = np.asarray(design, np.float64)
    n_t, n_p = x.shape
    w = np.asarray(mask, np.float64)  # [S T]
    y = np.where(mask, values, 0.0).astype(np.float64)  # [S T]
    outer = (x[:, :, None] * x[:, None, :]).reshape(n_t, n_p * n_p)  # [T P*P]
    gram = (w @ outer).reshape(-1, n_p, n_p)  # [S P P]
    rhs = (w * y) @ x  # [S P]
    scale = np.trace(gram, axis1=1, axis2=2) / n_p + 1.0  # [S]
    gram += (1e-9 * scale)[:, None, None] * np.eye(n_p)
    coef = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]  # [S P]
    resid = (y - coef @ x.T) * w  # [S T]
    n_obs = w.sum(axis=1)
    rmse = np.sqrt((resid**2).sum(axis=1) / np.maximum(n_obs - n_p, 1.0))
    return HarmonicFit(coef, rmse, n_obs.astype(np.int64))


@dataclass(frozen=True, eq=False)
class RunStats:
    changed: np.ndarray  # [N] bool: a confirmed run exists
    start: np.ndarray  # [N] int: date index of the first observation of the first confirmed run, -1
    intensity: np.ndarray  # [N] mean score over the first confirmed run's k observations, else
    #                        over the k-window with the highest minimum; NaN when < k observations
    max_sustained: np.ndarray  # [N] the highest minimum score of any k consecutive valid observations


def confirmed_runs(score: np.ndarray, valid: np.ndarray, threshold: float, k: int) -> RunStats:
    """Find, per row, the first run of ``k`` consecutive *valid* observations with
    ``score > threshold`` (missing observations are skipped, they do not break a run).

    score ``[N T]``, valid ``[N T]`` bool. Each row's valid observations are packed to the left
    (a stable argsort), then every window of k packed observations is scored at once: no loop."""
    n, n_t = score.shape
    nan = np.full(n, np.nan)
    if n_t < k or n == 0:
        return RunStats(np.zeros(n, bool), np.full(n, -1, np.int64), nan, nan.copy())
    order = np.argsort(~valid, axis=1, kind="stable")  # [N T] valid dates first, in time order
    packed = np.take_along_axis(np.where(valid, score, 0.0), order, axis=1)  # [N T]
    count = valid.sum(axis=1)  # [N]
    n_w = n_t - k + 1
    wmin = packed[:, :n_w].copy()  # [N W] min and mean of packed[:, j : j + k], window by window
    wsum = packed[:, :n_w].copy()
    for j in range(1, k):
        np.minimum(wmin, packed[:, j : j + n_w], out=wmin)
        wsum += packed[:, j : j + n_w]
    wmean = wsum / k
    real = np.arange(wmin.shape[1])[None, :] + k <= count[:, None]  # [N W] all k observations exist
    over = real & (wmin > threshold)
    changed = over.any(axis=1)
    first = over.argmax(axis=1)  # [N] first confirming window (0 when none)
    rows = np.arange(n)
    best = np.where(real, wmin, -np.inf).argmax(axis=1)  # [N] window with the highest minimum
    has_window = real.any(axis=1)
    start = np.where(changed, order[rows, first], -1)
    intensity = np.where(changed, wmean[rows, first], np.where(has_window, wmean[rows, best], np.nan))
    max_sustained = np.where(has_window, wmin[rows, best], np.nan)
    return RunStats(changed, start.astype(np.int64), intensity, max_sustained)


def persists(score: np.ndarray, valid: np.ndarray, start: np.ndarray, threshold: float, k: int,
             fraction: float) -> np.ndarray:
    """``[N]`` bool: whether each row's confirmed run (``start`` >= 0) lasts: of the valid
    observations after the run's ``k``, at least ``fraction`` are still over ``threshold`` (true
    when there is none after it yet). A transient departure (smoke, a flood, a wet-season
    anomaly) comes back; a land-cover change does not. score, valid ``[N T]``; start ``[N]``."""
    rank = np.cumsum(valid, axis=1) - 1  # [N T] position of each valid observation
    rows = np.arange(len(start))
    start_rank = np.where(start >= 0, rank[rows, np.maximum(start, 0)], 0)  # [N]
    after = valid & (rank >= (start_rank + k)[:, None])  # [N T]
    n_after = after.sum(axis=1)
    n_over = (after & (np.nan_to_num(score, nan=-np.inf) > threshold)).sum(axis=1)
    return (start >= 0) & ((n_after == 0) | (n_over >= fraction * n_after))


def wilson_hilferty_z(chi2: np.ndarray, dof: int) -> np.ndarray:
    """The one-sided normal z of a chi-square(``dof``) value (Wilson-Hilferty cube root)."""
    c = 2.0 / (9.0 * dof)
    return (np.cbrt(np.maximum(chi2, 0.0) / dof) - (1.0 - c)) / np.sqrt(c)


# --- Series from the embeddings ------------------------------------------------------------------
def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``[M D]`` float64 rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def baseline_distance_values(
    vectors: np.ndarray, chip_index: np.ndarray, in_baseline: np.ndarray, n_chips: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance of each observation to its chip's baseline-mean embedding.

    vectors ``[M D]``, chip_index ``[M]``, in_baseline ``[M]`` bool. A baseline observation is
    compared with the mean of the chip's *other* baseline observations (leave one out), so its
    distance is an honest sample of the noise. Returns (distance ``[M]``, defined ``[M]`` bool:
    False where the chip has no other baseline observation to compare with)."""
    u = unit_rows(vectors)  # [M D]
    m = len(u)
    member = scipy.sparse.csr_matrix(
        (in_baseline.astype(np.float64), (chip_index, np.arange(m))), shape=(n_chips, m)
    )
    sums = np.asarray(member @ u)  # [N D]
    counts = np.asarray(member.sum(axis=1)).ravel()  # [N]
    dot = np.einsum("md,md->m", u, sums[chip_index])  # [M] u . S
    sq = np.einsum("nd,nd->n", sums, sums)[chip_index]  # [M] |S|^2
    unit = np.einsum("md,md->m", u, u)  # [M] 1, or 0 for a zero vector
    own = in_baseline.astype(np.float64)  # leave one out: S - u for baseline rows
    ref_dot = dot - own * unit
    ref_norm = np.sqrt(np.maximum(sq - own * (2 * dot - unit), 0.0))
    others = counts[chip_index] - own
    defined = (others >= 1) & (ref_norm > 0)
    distance = np.where(defined, 1.0 - ref_dot / np.where(ref_norm > 0, ref_norm, 1.0), 0.0)
    return distance, defined


def pca_values(vectors: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """``[M K]`` scores on the first K principal components of the unit-length vectors, fitted
    on all observations (a seeded sample of at most ``PCA_FIT_ROWS`` rows)."""
    u = unit_rows(vectors)  # [M D]
    fit = u
    if len(u) > PCA_FIT_ROWS:
        fit = u[np.random.default_rng(seed).choice(len(u), PCA_FIT_ROWS, replace=False)]
    mean = fit.mean(axis=0)
    cov = np.cov(fit - mean, rowvar=False) if len(fit) > 1 else np.zeros((u.shape[1], u.shape[1]))
    cov = np.atleast_2d(cov)
    _, vecs = np.linalg.eigh(cov)  # ascending
    k = min(n_components, u.shape[1])
    components = vecs[:, ::-1][:, :k]  # [D K]
    return (u - mean) @ components


# --- Results ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SeriesCurves:
    """What the time-series plots need, per chip (the plotted series: ``plotted`` component)."""

    values: np.ndarray  # [N T] the plotted series (NaN where not observed)
    valid: np.ndarray  # [N T] bool
    coef: np.ndarray  # [N P] harmonic coefficients of the plotted series
    sigma: np.ndarray  # [N] standardization of the plotted series
    score: np.ndarray  # [N T] the change score (NaN where not valid)
    origin: float  # day number the design's trend is counted from
    label: str  # what ``values`` is, for the axis
    params: ChangeParams


@dataclass(frozen=True, eq=False)
class CellResult:
    """Per-cell outcome of the patch-level modes (N chips, a g x g grid of C = g * g cells,
    row-major from the chip's north-west corner)."""

    grid: int  # g
    ok: np.ndarray  # [N C] bool: the cell could be analysed
    changed: np.ndarray  # [N C] bool: a confirmed (and lasting) change
    change_date: np.ndarray  # [N C] datetime64[D], NaT when not changed
    intensity: np.ndarray  # [N C] float: as the chip's intensity, per cell (NaN where not ok)

    @property
    def n_changed(self) -> np.ndarray:
        """``[N]`` confirmed cells per chip."""
        return self.changed.sum(axis=1)


@dataclass(frozen=True, eq=False)
class ChangeResult:
    region: str
    mode: str  # "harmonic" | "bitemporal" | "empty"
    chip_ids: np.ndarray  # [N] str
    geometries: list[bytes]  # [N] WKB, EPSG:4326
    status: np.ndarray  # [N] str: "ok" | "insufficient_data"
    reason: np.ndarray  # [N] str: why a chip is not "ok" ("" when ok)
    changed: np.ndarray  # [N] bool
    change_date: np.ndarray  # [N] datetime64[D], NaT when not changed
    intensity: np.ndarray  # [N] float, NaN where status is not ok
    max_score: np.ndarray  # [N] float, NaN where status is not ok
    sigma: np.ndarray  # [N] float: the standardization used (RMSE with floor / robust spread)
    n_obs: np.ndarray  # [N] int
    n_baseline: np.ndarray  # [N] int
    n_monitoring: np.ndarray  # [N] int
    dates: np.ndarray  # [T] datetime64[D]: the dates analysed
    baseline_end: dt.date | None  # last baseline date (harmonic) / the before date (bitemporal)
    params: dict[str, Any]
    intensity_definition: str
    curves: SeriesCurves | None = None
    cells: CellResult | None = None  # patch-level modes only
    empty_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_chips(self) -> int:
        return len(self.chip_ids)

    @property
    def n_changed(self) -> int:
        return int(self.changed.sum())

    def strongest(self, n: int, fill: bool = False) -> np.ndarray:
        """Indices of up to ``n`` changed chips, highest intensity first; with ``fill``, topped
        up with the unchanged chips that came closest (highest ``max_score``)."""
        idx = np.flatnonzero(self.changed)
        top = idx[np.argsort(-self.intensity[idx], kind="stable")][:n]
        if fill and len(top) < n:
            rest = np.flatnonzero(~self.changed & np.isfinite(self.max_score))
            rest = rest[np.argsort(-self.max_score[rest], kind="stable")][: n - len(top)]
            top = np.concatenate([top, rest])
        return top


HARMONIC_INTENSITY = (
    "mean standardized residual (z) over the k observations of the first confirmed run; for a "
    "chip without a confirmed change, over the k consecutive observations whose minimum z is highest"
)
PATCH_INTENSITY = (
    "per cell: mean standardized residual (z) of the cell's cosine distance to its baseline-mean "
    "features over the k observations of its first confirmed run (else its best k-window); per "
    "chip: the mean over its confirmed cells, or for an unchanged chip the min_cells-th highest "
    "cell value (how close it came)"
)
PATCH_BITEMPORAL_INTENSITY = (
    "per cell: robust z, over all the region's cells clear on both dates, of the length of the "
    "cell's before->after displacement after removing the region's median cell displacement; "
    "per chip: the min_cells-th highest cell z"
)
BITEMPORAL_INTENSITY = (
    "robust z of the chip's before->after displacement after removing the region's median "
    "displacement: (d - median d) / (1.4826 MAD d)"
)


def empty_result(series: RegionSeries, reason: str, mode: str, params: dict[str, Any]) -> ChangeResult:
    """A labelled result without analysis: every chip known is ``insufficient_data``."""
    n = series.n_chips
    observed = series.observed()
    return ChangeResult(
        region=series.region, mode=mode, chip_ids=series.chip_ids, geometries=list(series.geometries),
        status=np.full(n, STATUS_INSUFFICIENT, dtype=object), reason=np.full(n, reason, dtype=object),
        changed=np.zeros(n, bool), change_date=np.full(n, np.datetime64("NaT"), "datetime64[D]"),
        intensity=np.full(n, np.nan), max_score=np.full(n, np.nan), sigma=np.full(n, np.nan),
        n_obs=observed.sum(axis=1).astype(np.int64), n_baseline=np.zeros(n, np.int64),
        n_monitoring=np.zeros(n, np.int64), dates=series.dates, baseline_end=None, params=params,
        intensity_definition="", empty_reason=reason,
    )


def baseline_end_date(dates: np.ndarray, params: ChangeParams) -> dt.date:
    """The last day of the baseline period (inclusive)."""
    if params.baseline_end is not None:
        return params.baseline_end
    first: dt.date = dates[0].astype("datetime64[D]").item()
    return first + dt.timedelta(days=params.baseline_days - 1)


@dataclass(frozen=True, eq=False)
class HarmonicChanges:
    """Per-series outcome of ``harmonic_changes`` (N series, T dates, K components)."""

    ok: np.ndarray  # [N] bool: enough baseline and monitoring observations
    reason: np.ndarray  # [N] str: why not ok ("" when ok)
    changed: np.ndarray  # [N] bool
    start: np.ndarray  # [N] int: date index of the first observation of the confirmed run, -1
    intensity: np.ndarray  # [N] float (NaN where not ok)
    max_score: np.ndarray  # [N] float: highest minimum score over k consecutive observations
    sigma: np.ndarray  # [N K] RMSE with floor
    coef: np.ndarray  # [N K P]
    score: np.ndarray  # [N T] (NaN where not a valid observation)
    z: np.ndarray  # [N T K] standardized residuals (NaN where not a valid observation)
    n_baseline: np.ndarray  # [N] int
    n_monitoring: np.ndarray  # [N] int


def harmonic_changes(
    values: np.ndarray, valid: np.ndarray, days: np.ndarray, in_baseline: np.ndarray,
    params: ChangeParams, one_sided: bool = True,
) -> HarmonicChanges:
    """The detection itself, on dense series.

    values ``[N T K]`` (or ``[N T]``: K = 1), valid ``[N T]`` bool, days ``[T]`` day numbers,
    in_baseline ``[T]`` bool. With K = 1 and ``one_sided`` the score is the signed z (only an
    increase counts); otherwise the squared z of the K components are summed and mapped to an
    equivalent normal z (Wilson-Hilferty). One batched fit for all N*K series, one pass over T
    for the runs: no loop over series."""
    if values.ndim == 2:
        values = values[:, :, None]
    n, n_t, n_k = values.shape
    if valid.shape != (n, n_t) or days.shape != (n_t,) or in_baseline.shape != (n_t,):
        raise ValueError(
            f"values {values.shape}, valid {valid.shape}, days {days.shape} and in_baseline "
            f"{in_baseline.shape} do not describe one [N T K] set of series"
        )
    valid = valid & np.isfinite(values).all(axis=2)
    base_mask = valid & in_baseline[None, :]  # [N T]
    mon_mask = valid & ~in_baseline[None, :]
    design = harmonic_design(days, float(days[0]), params)  # [T P]
    flat = values.transpose(0, 2, 1).reshape(n * n_k, n_t)  # [N*K T]
    fit = fit_harmonic(design, flat, np.repeat(base_mask, n_k, axis=0))
    if params.screen > 0:
        base_mask = base_mask & ~baseline_outliers(fit, design, flat, base_mask, n_k, params.screen)
        fit = fit_harmonic(design, flat, np.repeat(base_mask, n_k, axis=0))
    n_base = base_mask.sum(axis=1)
    n_mon = mon_mask.sum(axis=1)
    enough = n_base >= params.min_baseline_obs
    rmse = fit.rmse.reshape(n, n_k)  # [N K]
    floor = np.full(n_k, params.min_rmse)
    if enough.any():
        floor = np.maximum(floor, params.rmse_floor_fraction * np.median(rmse[enough], axis=0))
    sigma = np.maximum(rmse, floor[None, :])  # [N K]
    pred = fit.predict(design).reshape(n, n_k, n_t).transpose(0, 2, 1)  # [N T K]
    z = (np.where(valid[:, :, None], values, 0.0) - pred) / sigma[:, None, :]  # [N T K]
    score = z[:, :, 0] if n_k == 1 and one_sided else wilson_hilferty_z((z**2).sum(axis=2), n_k)
    ok = enough & (n_mon >= params.consecutive)
    runs = confirmed_runs(score, mon_mask & ok[:, None], params.threshold, params.consecutive)
    if params.persistence > 0:
        lasting = persists(score, mon_mask & ok[:, None], runs.start, params.threshold,
                           params.consecutive, params.persistence)
        runs = RunStats(runs.changed & lasting, np.where(lasting, runs.start, -1),
                        runs.intensity, runs.max_sustained)
    reason = np.full(n, "", dtype=object)
    reason[n_mon < params.consecutive] = (
        f"fewer than consecutive={params.consecutive} monitoring observations"
    )
    reason[~enough] = (
        f"fewer than {params.min_baseline_obs} baseline observations "
        f"({params.n_params} model parameters + margin {params.margin})"
    )
    return HarmonicChanges(
        ok=ok, reason=reason, changed=runs.changed & ok, start=np.where(ok, runs.start, -1),
        intensity=np.where(ok, runs.intensity, np.nan), max_score=np.where(ok, runs.max_sustained, np.nan),
        sigma=sigma, coef=fit.coef.reshape(n, n_k, -1), score=np.where(valid, score, np.nan),
        z=np.where(valid[:, :, None], z, np.nan), n_baseline=n_base.astype(np.int64),
        n_monitoring=n_mon.astype(np.int64),
    )


def masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[S]`` median of each row's entries where ``mask`` (NaN for an empty row); one sort."""
    count = mask.sum(axis=1)  # [S]
    ordered = np.sort(np.where(mask, values, np.inf), axis=1)  # [S T] masked entries last
    lo = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(ordered, np.minimum(count // 2, values.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan)


def baseline_outliers(
    fit: HarmonicFit, design: np.ndarray, flat: np.ndarray, base_mask: np.ndarray, n_k: int,
    screen: float,
) -> np.ndarray:
    """``[N T]`` bool: baseline observations whose residual from a first fit lies beyond
    ``screen`` robust standard deviations (1.4826 x the median absolute residual of the chip)
    in any component: the clouds and shadows the chip filter let through, screened out of the
    baseline before the final fit, as CCDC's robust initialization does. Only chips with at
    least twice as many baseline observations as parameters are screened (with fewer, the first
    fit follows the outliers too closely to tell them apart)."""
    n, n_t = base_mask.shape
    n_p = design.shape[1]
    resid = np.abs(flat - fit.predict(design)).reshape(n, n_k, n_t)  # [N K T]
    spread = MAD_TO_SIGMA * masked_median(resid.reshape(n * n_k, n_t),
                                          np.repeat(base_mask, n_k, axis=0)).reshape(n, n_k, 1)
    floor = np.nanmedian(spread) if np.isfinite(spread).any() else 0.0
    spread = np.maximum(np.nan_to_num(spread), max(float(floor) * 0.1, 1e-12))
    enough = base_mask.sum(axis=1) >= 2 * n_p  # [N]
    return base_mask & (resid > screen * spread).any(axis=1) & enough[:, None]


def cell_distance_values(
    series: RegionSeries, spatial: RegionSpatial, in_baseline: np.ndarray, min_clear: float,
    block: int = CELL_BLOCK_CHIPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance of every cell of every chip on every date to that cell's baseline-mean
    feature vector: (distance ``[N C T]`` float32, valid ``[N C T]`` bool), C = g * g cells.

    in_baseline ``[T]`` bool over ``series.dates``. A cell observation counts (is valid) when its
    clear fraction is at least ``min_clear``; a baseline observation is compared with the mean of
    the cell's *other* valid baseline observations (leave one out, as ``baseline_distance_values``).
    Chips are processed ``block`` at a time (two passes over the memory-mapped partitions: the
    baseline sums, then the distances), so memory is ``block x C x D`` floats, not the region's."""
    n, n_t, g = series.n_chips, series.n_dates, spatial.grid
    n_c = g * g
    distance = np.zeros((n, n_c, n_t), np.float32)
    valid = np.zeros((n, n_c, n_t), bool)
    date_pos = {d: i for i, d in enumerate(series.dates.astype("datetime64[D]"))}
    parts = []  # (date index, chip index [n] of each row, partition)
    for part in spatial.partitions:
        t = date_pos.get(part.date)
        if t is None:
            continue
        rows_chip = np.searchsorted(series.chip_ids, part.chip_ids)
        known = (rows_chip < n) & (series.chip_ids[np.minimum(rows_chip, n - 1)] == part.chip_ids)
        parts.append((t, np.where(known, rows_chip, -1), part))
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        sums = np.zeros((b1 - b0, n_c, spatial.dim), np.float32)  # [B C D]
        counts = np.zeros((b1 - b0, n_c), np.float32)  # [B C]
        for t, rows_chip, part in parts:  # pass 1: baseline sums of unit cell vectors
            if not in_baseline[t]:
                continue
            rows = np.flatnonzero((rows_chip >= b0) & (rows_chip < b1))
            if rows.size:
                u, w = cell_units(part, rows, min_clear)  # [r C D], [r C]
                np.add.at(sums, rows_chip[rows] - b0, u * w[:, :, None])
                np.add.at(counts, rows_chip[rows] - b0, w)
        for t, rows_chip, part in parts:  # pass 2: distances to the (leave-one-out) means
            rows = np.flatnonzero((rows_chip >= b0) & (rows_chip < b1))
            if not rows.size:
                continue
            u, w = cell_units(part, rows, min_clear)
            ref = sums[rows_chip[rows] - b0]  # [r C D]
            others = counts[rows_chip[rows] - b0]  # [r C]
            if in_baseline[t]:
                ref = ref - u * w[:, :, None]
                others = others - w
            norm = np.linalg.norm(ref, axis=2)  # [r C]
            dot = np.einsum("rcd,rcd->rc", u, ref)
            ok = (w > 0) & (others >= 1) & (norm > 0)
            distance[rows_chip[rows], :, t] = np.where(ok, 1.0 - dot / np.where(norm > 0, norm, 1.0), 0.0)
            valid[rows_chip[rows], :, t] = ok
    return distance, valid


def cell_units(part: SpatialPartition, rows: np.ndarray, min_clear: float) -> tuple[np.ndarray, np.ndarray]:
    """(unit-length cell vectors ``[r C D]`` float32, clear enough ``[r C]`` float32 0/1) of
    ``rows`` of one partition."""
    f = np.asarray(part.features[rows], dtype=np.float32)  # [r g g D]
    r, g, _, d = f.shape
    f = f.reshape(r, g * g, d)
    norm = np.linalg.norm(f, axis=2, keepdims=True)
    u = f / np.where(norm > 0, norm, 1.0)
    w = (np.asarray(part.clear[rows], np.float32).reshape(r, g * g) >= min_clear) & (norm[:, :, 0] > 0)
    return u, w.astype(np.float32)


def series_values(series: RegionSeries, params: ChangeParams, in_baseline: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """The chips' series from the embeddings: (values ``[N T K]``, valid ``[N T]``, label)."""
    if params.series == "baseline_distance":
        dist, defined = baseline_distance_values(
            series.vectors, series.chip_index, in_baseline[series.date_index], series.n_chips
        )
        valid = np.zeros((series.n_chips, series.n_dates), bool)
        valid[series.chip_index, series.date_index] = defined
        return series.dense(dist[:, None]), valid, "cosine distance to the baseline-mean embedding"
    comps = pca_values(series.vectors, params.n_components)  # [M K]
    return series.dense(comps), series.observed(), "principal component"


def require_spatial(series: RegionSeries, spatial: RegionSpatial | None) -> RegionSpatial:
    """``spatial`` when it covers every date of ``series``; else a clear error."""
    if spatial is None or spatial.grid == 0 or spatial.missing:
        which = (f"the dates {', '.join(spatial.missing[:5])}{' ...' if len(spatial.missing) > 5 else ''}"
                 if spatial is not None and spatial.missing else "any date")
        raise ChangeConfigError(
            f"change series patch_distance needs the embeddings' spatial features (spatial.npy), which "
            f"region {series.region!r} lacks for {which}: materialize its embeddings again with the "
            "encoder resource's spatial_grid > 0 (rcf or clay-*), or choose series baseline_distance"
        )
    return spatial


def detect_harmonic(series: RegionSeries, params: ChangeParams | None = None,
                    spatial: RegionSpatial | None = None) -> ChangeResult:
    """Harmonic-regression change detection for every chip of ``series`` (see module doc);
    series ``patch_distance`` (the default) needs the region's ``spatial`` features."""
    params = params or ChangeParams()
    info = {"mode": "harmonic", **params.to_dict()}
    if series.n_dates < 2:
        return empty_result(
            series, f"the region has {series.n_dates} date(s) with embeddings; change needs at least 2",
            "empty", info,
        )
    if params.series == "patch_distance":
        return detect_patch_harmonic(series, require_spatial(series, spatial), params)
    n = series.n_chips
    end = baseline_end_date(series.dates, params)
    days = series.day_numbers()  # [T]
    in_baseline = series.dates <= np.datetime64(end)  # [T]
    values, valid, label = series_values(series, params, in_baseline)
    out = harmonic_changes(values, valid, days, in_baseline, params,
                           one_sided=params.series == "baseline_distance")
    change_date = np.full(n, np.datetime64("NaT"), "datetime64[D]")
    change_date[out.changed] = series.dates[out.start[out.changed]]
    rows = np.arange(n)
    plotted = np.zeros(n, np.int64)
    if values.shape[2] > 1:  # the component that moved most over the monitoring period
        moved = np.abs(np.where(in_baseline[None, :, None], np.nan, out.z))  # [N T K]
        plotted = np.nansum(moved, axis=1).argmax(axis=1)
        label = f"{label} (the one that moved most)"
    curves = SeriesCurves(
        values=np.where(valid, values[rows, :, plotted], np.nan), valid=valid,
        coef=out.coef[rows, plotted], sigma=out.sigma[rows, plotted], score=out.score,
        origin=float(days[0]), label=label, params=params,
    )
    return ChangeResult(
        region=series.region, mode="harmonic", chip_ids=series.chip_ids,
        geometries=list(series.geometries),
        status=np.where(out.ok, STATUS_OK, STATUS_INSUFFICIENT).astype(object), reason=out.reason,
        changed=out.changed, change_date=change_date, intensity=out.intensity, max_score=out.max_score,
        sigma=np.where(out.ok, out.sigma[rows, plotted], np.nan),
        n_obs=valid.sum(axis=1).astype(np.int64), n_baseline=out.n_baseline,
        n_monitoring=out.n_monitoring, dates=series.dates, baseline_end=end, params=info,
        intensity_definition=HARMONIC_INTENSITY, curves=curves,
    )


def detect_patch_harmonic(series: RegionSeries, spatial: RegionSpatial, params: ChangeParams
                          ) -> ChangeResult:
    """Harmonic change per cell (``cell_distance_values``: C series per chip, all the region's
    chips x cells in one batched fit), aggregated per chip: changed when at least
    ``min_cells`` cells are confirmed, dated at the earliest confirmed cell (module doc)."""
    n, n_t, g = series.n_chips, series.n_dates, spatial.grid
    n_c = g * g
    info = {"mode": "harmonic", **params.to_dict(), "grid": g}
    end = baseline_end_date(series.dates, params)
    days = series.day_numbers()  # [T]
    in_baseline = series.dates <= np.datetime64(end)  # [T]
    distance, valid = cell_distance_values(series, spatial, in_baseline, params.min_clear)  # [N C T]
    out = harmonic_changes(distance.reshape(n * n_c, n_t), valid.reshape(n * n_c, n_t), days,
                           in_baseline, params, one_sided=True)
    cell_ok = out.ok.reshape(n, n_c)
    cell_changed = out.changed.reshape(n, n_c)
    cell_start = out.start.reshape(n, n_c)
    cell_intensity = out.intensity.reshape(n, n_c)
    cell_max = out.max_score.reshape(n, n_c)
    cell_date = np.full((n, n_c), np.datetime64("NaT"), "datetime64[D]")
    cell_date[cell_changed] = series.dates[cell_start[cell_changed]]

    n_changed = cell_changed.sum(axis=1)  # [N]
    chip_ok = cell_ok.any(axis=1)
    changed = chip_ok & (n_changed >= params.min_cells)
    first = np.where(cell_changed, cell_start, n_t).min(axis=1)  # [N] earliest confirmed cell
    change_date = np.full(n, np.datetime64("NaT"), "datetime64[D]")
    change_date[changed] = series.dates[first[changed]]
    kth = min(params.min_cells, n_c)
    # the min_cells-th highest cell value: above the threshold exactly when enough cells are
    kth_max = -np.sort(-np.where(cell_ok, np.nan_to_num(cell_max, nan=-np.inf), -np.inf), axis=1)[:, kth - 1]
    kth_int = -np.sort(-np.where(cell_ok, np.nan_to_num(cell_intensity, nan=-np.inf), -np.inf),
                       axis=1)[:, kth - 1]
    mean_changed = np.where(cell_changed, cell_intensity, 0.0).sum(axis=1) / np.maximum(n_changed, 1)
    intensity = np.where(changed, mean_changed, kth_int)
    intensity = np.where(chip_ok & np.isfinite(intensity), intensity, np.nan)
    max_score = np.where(chip_ok & np.isfinite(kth_max), kth_max, np.nan)

    # the plotted cell of each chip: its strongest confirmed cell, else the one that came closest
    rank = np.where(cell_changed, 1e6 + np.nan_to_num(cell_intensity, nan=0.0),
                    np.where(cell_ok, np.nan_to_num(cell_max, nan=-1e6), -1e7))
    plotted = rank.argmax(axis=1)  # [N]
    rows = np.arange(n)
    flat = rows * n_c + plotted  # [N] rows of the flattened [N*C] series
    cell_valid = valid[rows, plotted]  # [N T]
    curves = SeriesCurves(
        values=np.where(cell_valid, distance[rows, plotted], np.nan), valid=cell_valid,
        coef=out.coef[flat, 0], sigma=out.sigma[flat, 0], score=out.score[flat], origin=float(days[0]),
        label="cosine distance of the strongest cell to its baseline mean", params=params,
    )
    reason = np.where(chip_ok, "", "no cell with enough clear observations: ").astype(object)
    reason[~chip_ok] = reason[~chip_ok] + out.reason.reshape(n, n_c)[~chip_ok, 0]
    observed = series.observed()
    n_base = (observed & in_baseline[None, :]).sum(axis=1)
    return ChangeResult(
        region=series.region, mode="harmonic", chip_ids=series.chip_ids,
        geometries=list(series.geometries),
        status=np.where(chip_ok, STATUS_OK, STATUS_INSUFFICIENT).astype(object), reason=reason,
        changed=changed, change_date=change_date, intensity=intensity, max_score=max_score,
        sigma=np.where(chip_ok, out.sigma[flat, 0], np.nan),
        n_obs=observed.sum(axis=1).astype(np.int64), n_baseline=n_base.astype(np.int64),
        n_monitoring=(observed.sum(axis=1) - n_base).astype(np.int64), dates=series.dates,
        baseline_end=end, params=info, intensity_definition=PATCH_INTENSITY, curves=curves,
        cells=CellResult(g, cell_ok, cell_changed, cell_date,
                         np.where(cell_ok, cell_intensity, np.nan)),
        extra={"plotted_cell": plotted},
    )


# --- Two dates -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BitemporalScores:
    score: np.ndarray  # [N] robust z of the normalized displacement
    distance: np.ndarray  # [N] length of the normalized displacement
    center: float  # median distance
    spread: float  # 1.4826 MAD of the distances (floored)


def bitemporal_scores(before: np.ndarray, after: np.ndarray, min_spread: float = 1e-6) -> BitemporalScores:
    """A change score per chip from its vectors on two dates, normalized against the region.

    before, after ``[N D]`` (rows of one chip on both dates). Vectors are scaled to unit length
    (a global brightness change scales a vector, it does not turn it), then the region's median
    displacement (per dimension: what season and illumination did to every chip, robust to the
    few chips that changed) is removed from each chip's displacement; the remaining length is
    standardized by the median and MAD over the region's chips, so a score of 3 means three
    robust standard deviations beyond a typical chip of this pair of dates."""
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must both be [N D]")
    if len(before) == 0:
        return BitemporalScores(np.zeros(0), np.zeros(0), 0.0, min_spread)
    delta = unit_rows(after) - unit_rows(before)  # [N D]
    residual = delta - np.median(delta, axis=0, keepdims=True)  # [N D]
    distance = np.linalg.norm(residual, axis=1)  # [N]
    center = float(np.median(distance))
    spread = max(float(MAD_TO_SIGMA * np.median(np.abs(distance - center))), min_spread)
    return BitemporalScores((distance - center) / spread, distance, center, spread)


def bitemporal_cell_scores(
    before: np.ndarray, after: np.ndarray, usable: np.ndarray, min_cells: int, min_spread: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Patch-level two-date scores: (chip score ``[N]``, cell z ``[N C]``), NaN where not usable.

    before, after ``[N C D]`` cell features of the same chips; usable ``[N C]`` bool (clear on
    both dates). ``bitemporal_scores``' normalization over all the region's usable cells (unit
    vectors, the median displacement removed, robust z of the remaining length), then per chip
    the ``min_cells``-th highest cell z: a chip scores high when at least that many of its cells
    changed more than the region's typical cell. Chips with fewer usable cells score NaN."""
    n, n_c, _ = before.shape
    z = np.full((n, n_c), np.nan)
    if usable.any():
        scores = bitemporal_scores(before[usable], after[usable], min_spread)
        z[usable] = scores.score
    k = min(min_cells, n_c)
    ordered = -np.sort(-np.where(usable, z, -np.inf), axis=1)  # [N C] highest first
    chip = np.where(usable.sum(axis=1) >= k, ordered[:, k - 1], np.nan)
    return chip, z


def spatial_pair(series: RegionSeries, spatial: RegionSpatial, days: tuple[dt.date, dt.date],
                 min_clear: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(before ``[N C D]``, after ``[N C D]`` float32 cell features, usable ``[N C]``: clear
    enough on both dates) of the chips of ``series``; zero and unusable where a chip is missing."""
    n, g = series.n_chips, spatial.grid
    feats = np.zeros((2, n, g * g, spatial.dim), np.float32)
    clear = np.zeros((2, n, g * g), bool)
    by_date = {p.date.item(): p for p in spatial.partitions}
    for j, day in enumerate(days):
        part = by_date[day]
        idx = np.searchsorted(series.chip_ids, part.chip_ids)
        known = (idx < n) & (series.chip_ids[np.minimum(idx, n - 1)] == part.chip_ids)
        rows = np.flatnonzero(known)
        feats[j, idx[rows]] = np.asarray(part.features[rows], np.float32).reshape(len(rows), g * g, -1)
        clear[j, idx[rows]] = np.asarray(part.clear[rows], np.float32).reshape(len(rows), g * g) >= min_clear
    usable = np.logical_and(clear[0], clear[1])  # [N C]
    return feats[0], feats[1], usable


def detect_bitemporal(
    series: RegionSeries, before: dt.date, after: dt.date, params: BitemporalParams | None = None,
    spatial: RegionSpatial | None = None,
) -> ChangeResult:
    """Two-date change for every chip of ``series``; chips not observed on both dates are
    ``insufficient_data``. With ``params.patch`` (the default) scored per cell from the region's
    ``spatial`` features and aggregated per chip (``bitemporal_cell_scores``)."""
    params = params or BitemporalParams()
    if not before < after:
        raise ChangeConfigError(f"bitemporal before={before} must be earlier than after={after}")
    info = {"mode": "bitemporal", "before": before.isoformat(), "after": after.isoformat(),
            **params.to_dict()}
    index = {d.item(): i for i, d in enumerate(series.dates.astype("datetime64[D]"))}
    missing = [d.isoformat() for d in (before, after) if d not in index]
    if missing:
        known = ", ".join(str(d) for d in series.dates) or "(none)"
        raise ChangeConfigError(
            f"region {series.region!r} has no embeddings on {', '.join(missing)}; dates with "
            f"embeddings: {known}"
        )
    n = series.n_chips
    dense = np.zeros((n, 2, series.dim))
    seen = np.zeros((n, 2), bool)
    for j, day in enumerate((before, after)):
        rows = np.flatnonzero(series.date_index == index[day])
        dense[series.chip_index[rows], j] = series.vectors[rows]
        seen[series.chip_index[rows], j] = True
    both = np.asarray(seen.all(axis=1), dtype=bool)  # [N]
    cells: CellResult | None = None
    extra: dict[str, Any]
    if params.patch:
        spatial = require_spatial(series, spatial)
        feats_b, feats_a, usable = spatial_pair(series, spatial, (before, after), params.min_clear)
        usable &= both[:, None]
        z, cell_z = bitemporal_cell_scores(feats_b, feats_a, usable, params.min_cells, params.min_spread)
        both = both & np.isfinite(z)
        cell_changed = usable & (np.nan_to_num(cell_z) > params.threshold)
        cell_date = np.where(cell_changed, np.datetime64(after, "D"), np.datetime64("NaT", "D"))
        cells = CellResult(spatial.grid, usable, cell_changed, cell_date, cell_z)
        spread = np.where(both, 1.0, np.nan)  # cell z are already standardized
        extra = {"grid": spatial.grid, "usable_cells": int(usable.sum())}
        info["grid"] = spatial.grid
        definition = PATCH_BITEMPORAL_INTENSITY
    else:
        scores = bitemporal_scores(dense[both, 0], dense[both, 1], params.min_spread)
        z = np.full(n, np.nan)
        z[both] = scores.score
        spread = np.where(both, scores.spread, np.nan)
        extra = {"median_distance": scores.center, "robust_spread": scores.spread}
        definition = BITEMPORAL_INTENSITY
    changed = both & (np.nan_to_num(z) > params.threshold)
    change_date = np.full(n, np.datetime64("NaT"), "datetime64[D]")
    change_date[changed] = np.datetime64(after)
    reason = np.where(both, "", "not observed on both dates" if not params.patch else
                      f"not observed on both dates with {params.min_cells}+ clear cells").astype(object)
    return ChangeResult(
        region=series.region, mode="bitemporal", chip_ids=series.chip_ids,
        geometries=list(series.geometries),
        status=np.where(both, STATUS_OK, STATUS_INSUFFICIENT).astype(object), reason=reason,
        changed=changed, change_date=change_date, intensity=z, max_score=z.copy(),
        sigma=spread, n_obs=seen.sum(axis=1).astype(np.int64),
        n_baseline=seen[:, 0].astype(np.int64), n_monitoring=seen[:, 1].astype(np.int64),
        dates=np.array([before, after], dtype="datetime64[D]"), baseline_end=before, params=info,
        intensity_definition=definition, cells=cells, extra=extra,
    )
