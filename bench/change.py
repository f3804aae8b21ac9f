"""Harmonic change detection speed: one batched fit for every chip vs a per-chip scikit-learn loop.

    .venv/bin/python bench/change.py [--chips 100000] [--dates 100] [--loop-chips 1000]

Data: synthetic series of ``--chips`` chips x ``--dates`` dates (every 11 days, ~3 years):
an annual + semi-annual signal with random amplitude and phase per chip, Gaussian noise, 15%
of observations missing at random, and a level break in the second year for 5% of the chips.

Vectorized: ``fit_harmonic`` (the normal equations of every chip in two GEMMs and one stacked
``[N P P]`` solve) on the baseline observations, and the whole detection (``harmonic_changes``:
fit, CCDC-style baseline screening and refit, standardized residuals, k-consecutive runs).

Baseline, as the public reference pipeline does it: for each chip, a scikit-learn ``Pipeline``
of a harmonic-feature transformer and ``Ridge``, fitted on the chip's baseline observations,
then ``predict`` over the monitoring period and the RMSE of the baseline fit. The loop is timed
on the first ``--loop-chips`` chips and extrapolated linearly to all chips (it is a loop of
independent fits: its time is linear in the chip count); the extrapolation is printed as such.
The two fits are compared on that subset (largest coefficient difference).

Patch level (change_maps' default ``patch_distance`` series): ``--patch-chips`` chips x
``--cells`` cells x ``--patch-dates`` dates of the same synthetic series, one ``harmonic_changes``
call over all chip x cell series (as ``detect_patch_harmonic`` makes it), timed and extrapolated
linearly to ``--patch-target`` chips (printed as such). Reading the cell features and computing
their distances (``cell_distance_values``) is not part of this timing. Nothing here asserts a
time; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geofm_assets.analysis.change import (
    ChangeParams,
    fit_harmonic,
    harmonic_changes,
    harmonic_design,
)


def synthetic(n: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values [N T], valid [N T], day numbers [T], in_baseline [T])."""
    rng = np.random.default_rng(seed)
    days = 18262.0 + 11.0 * np.arange(t)  # from 2020-01-01, every 11 days
    years = (days - days[0]) / 365.25
    amp = rng.uniform(0.01, 0.05, (n, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1)).astype(np.float32)
    season = np.cos(2 * np.pi * years[None, :] + phase) + 0.3 * np.sin(4 * np.pi * years[None, :])
    values = 0.1 + amp * season + rng.normal(0, 0.005, (n, t)).astype(np.float32)
    breaks = rng.random(n) < 0.05
    values[breaks] += np.where(years >= 1.5, 0.05, 0.0)[None, :]
    valid = rng.random((n, t)) > 0.15
    values[~valid] = np.nan
    return values, valid, days, years < 1.0


def harmonic_features(params: ChangeParams, origin: float) -> FunctionTransformer:
    def transform(days: np.ndarray) -> np.ndarray:
        return harmonic_design(days[:, 0], origin, params)[:, 1:]  # Ridge fits the intercept

    return FunctionTransformer(transform)


def per_chip_loop(values: np.ndarray, valid: np.ndarray, days: np.ndarray, in_baseline: np.ndarray,
                  params: ChangeParams) -> tuple[np.ndarray, np.ndarray]:
    """The reference way: one scikit-learn pipeline fitted per chip. (coef [n P], rmse [n])."""
    coefs, rmses = [], []
    for i in range(len(values)):
        base = valid[i] & in_baseline
        x, y = days[base][:, None], values[i, base]
        model = Pipeline([("harmonics", harmonic_features(params, days[0])),
                          ("ridge", Ridge(alpha=1e-9))])
        model.fit(x, y)
        fitted = model.predict(x)
        model.predict(days[~in_baseline][:, None])  # the monitoring-period prediction
        rmse = float(np.sqrt(((y - fitted) ** 2).sum() / max(len(y) - params.n_params, 1)))
        ridge = model.named_steps["ridge"]
        coefs.append(np.concatenate([[ridge.intercept_], ridge.coef_]))
        rmses.append(rmse)
    return np.array(coefs), np.array(rmses)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=100_000)
    ap.add_argument("--dates", type=int, default=100)
    ap.add_argument("--loop-chips", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--patch-chips", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=256)
    ap.add_argument("--patch-dates", type=int, default=36)
    ap.add_argument("--patch-target", type=int, default=10_000)
    args = ap.parse_args()
    params = ChangeParams()
    values, valid, days, in_baseline = synthetic(args.chips, args.dates)
    design = harmonic_design(days, days[0], params)
    base_mask = valid & in_baseline[None, :]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    print(f"{args.chips} chips x {args.dates} dates, {params.n_params} parameters, "
          f"{int(base_mask.sum(axis=1).mean())} baseline observations a chip on average")

    fit_s = best_of(lambda: fit_harmonic(design, values, base_mask), args.repeat)
    detect_s = best_of(lambda: harmonic_changes(values, valid, days, in_baseline, params), args.repeat)
    out = harmonic_changes(values, valid, days, in_baseline, params)

    n_loop = min(args.loop_chips, args.chips)
    t0 = time.perf_counter()
    ref_coef, ref_rmse = per_chip_loop(values[:n_loop], valid[:n_loop], days, in_baseline, params)
    loop_s = time.perf_counter() - t0
    loop_all = loop_s * args.chips / n_loop
    ours = fit_harmonic(design, values[:n_loop], base_mask[:n_loop])
    coef_diff = float(np.abs(ours.coef - ref_coef).max())
    rmse_diff = float(np.abs(ours.rmse - ref_rmse).max())

    print(f"vectorized fit (fit_harmonic), all chips:     {fit_s:8.3f} s")
    print(f"vectorized detection (harmonic_changes):     {detect_s:8.3f} s "
          f"({int(out.changed.sum())} chips flagged, ~{int(0.05 * args.chips)} with a break)")
    print(f"per-chip scikit-learn loop, {n_loop} chips:       {loop_s:8.3f} s "
          f"-> extrapolated to {args.chips} chips: {loop_all:8.1f} s")
    print(f"agreement on those {n_loop} chips: max |coef diff| {coef_diff:.2e}, "
          f"max |rmse diff| {rmse_diff:.2e}")
    print(f"ratio loop / vectorized fit:        {loop_all / fit_s:10.0f}x (target >= 300x; fit < 1 s: "
          f"{'yes' if fit_s < 1 else 'no'})")
    print(f"ratio loop / vectorized detection:  {loop_all / detect_s:10.0f}x")
    n_series = args.patch_chips * args.cells
    p_values, p_valid, p_days, p_base = synthetic(n_series, args.patch_dates, seed=1)
    patch_s = best_of(lambda: harmonic_changes(p_values, p_valid, p_days, p_base, params), args.repeat)
    patch_target_s = patch_s * args.patch_target / args.patch_chips
    print(f"patch level: {args.patch_chips} chips x {args.cells} cells = {n_series} series x "
          f"{args.patch_dates} dates, whole detection: {patch_s:8.3f} s -> extrapolated to "
          f"{args.patch_target} chips: {patch_target_s:.1f} s")
    print(json.dumps({"chips": args.chips, "dates": args.dates, "fit_s": round(fit_s, 4),
                      "patch_series": n_series, "patch_dates": args.patch_dates,
                      "patch_detect_s": round(patch_s, 3),
                      "patch_target_chips": args.patch_target, "patch_target_s": round(patch_target_s, 1),
                      "detect_s": round(detect_s, 4), "loop_chips": n_loop, "loop_s": round(loop_s, 3),
                      "loop_extrapolated_s": round(loop_all, 1), "ratio_fit": round(loop_all / fit_s),
                      "ratio_detect": round(loop_all / detect_s)}))


if __name__ == "__main__":
    main()
