"""Cosine similarity to a chip's baseline and to its previous observed date, on synthetic series
with known answers, and against a per-chip reference loop."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from geofm_assets.analysis.series import RegionSeries
from geofm_assets.analysis.similarity import (
    SimilarityError,
    baseline_period,
    cosine_to_baseline,
    cosine_to_previous,
    region_similarity,
)

DATES = ["2020-03-01", "2020-07-01", "2020-11-01", "2021-03-01", "2021-07-01", "2021-11-01"]
# default baseline: 2020-03-01 .. 2021-02-28 -> the first three dates


def synthetic_series(obs: list[tuple[int, int]], vectors: np.ndarray, dates: list[str] = DATES,
                     region: str = "testland") -> RegionSeries:
    """A RegionSeries as ``load_region_series`` returns it, from (chip, date) observations."""
    n_chips = max((c for c, _ in obs), default=-1) + 1
    return RegionSeries(
        region=region, model="synthetic" if obs else None, checkpoint_digest=None,
        chip_ids=np.array([f"{region}_r0000_c{i:04d}" for i in range(n_chips)], dtype=object),
        dates=np.array(dates, dtype="datetime64[D]"),
        chip_index=np.array([c for c, _ in obs], np.int64),
        date_index=np.array([d for _, d in obs], np.int64),
        vectors=np.asarray(vectors, np.float32),
        centroids=np.zeros((n_chips, 2)), geometries=[b""] * n_chips, partitions_read=len(dates),
    )


def rows_by_key(table: pa.Table) -> dict[tuple[str, str], dict]:
    return {(r["chip_id"], r["date"].isoformat()): r for r in table.to_pylist()}


def test_a_chip_that_changes_direction_loses_baseline_similarity_at_the_change():
    e = np.eye(4)
    # chip 0 looks like e0 (with small wobble) until 2021-03-01, then like e1; chip 1 never changes
    wobble = np.random.default_rng(0).normal(scale=0.01, size=(12, 4))
    obs, vecs = [], []
    for d in range(len(DATES)):
        obs += [(0, d), (1, d)]
        vecs += [e[0] if d < 3 else e[1], e[2]]
    series = synthetic_series(obs, np.array(vecs) + wobble)
    result = region_similarity(series)
    assert result.period is not None and result.period.as_dict() == {
        "start": "2020-03-01", "end": "2021-02-28", "source": "default"}
    rows = rows_by_key(result.table())
    changed = "testland_r0000_c0000"
    for d in DATES[:3]:
        assert rows[(changed, d)]["cos_baseline"] > 0.99 and rows[(changed, d)]["in_baseline"]
    for d in DATES[3:]:
        assert abs(rows[(changed, d)]["cos_baseline"]) < 0.1 and not rows[(changed, d)]["in_baseline"]
    assert rows[(changed, "2021-03-01")]["cos_previous"] < 0.1  # the change itself
    assert rows[(changed, "2021-07-01")]["cos_previous"] > 0.99  # stable after it
    assert all(rows[("testland_r0000_c0001", d)]["cos_baseline"] > 0.99 for d in DATES)
    assert all(r["n_baseline_obs"] == 3 for r in rows.values())
    assert result.summary()["lowest_cos_baseline"][0]["chip_id"] == changed


def test_baseline_is_the_mean_of_the_chips_vectors_not_of_one_date():
    # baseline vectors [1, 0] and [0, 1]: mean direction (1, 1)/sqrt 2; later [1, 0] -> cos 1/sqrt 2
    series = synthetic_series([(0, 0), (0, 1), (0, 4)], np.array([[1, 0], [0, 1], [1, 0]]))
    rows = rows_by_key(region_similarity(series).table())
    later = rows[("testland_r0000_c0000", "2021-07-01")]
    assert later["cos_baseline"] == pytest.approx(1 / np.sqrt(2), abs=1e-6)


def test_previous_similarity_skips_dates_the_chip_was_not_observed():
    # chip 0 observed on dates 0, 2, 5 only; chip 1 on every date
    obs = [(0, 0), (1, 0), (1, 1), (0, 2), (1, 2), (1, 3), (1, 4), (0, 5), (1, 5)]
    vectors = {(0, 0): [1, 0, 0], (0, 2): [1, 1, 0], (0, 5): [0, 0, 1]}
    series = synthetic_series(obs, np.array([vectors.get(o, [0, 1, 1]) for o in obs]))
    rows = rows_by_key(region_similarity(series).table())
    chip = "testland_r0000_c0000"
    assert rows[(chip, DATES[0])]["previous_date"] is None and rows[(chip, DATES[0])]["cos_previous"] is None
    assert rows[(chip, DATES[2])]["previous_date"] == dt.date.fromisoformat(DATES[0])
    assert rows[(chip, DATES[2])]["cos_previous"] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert rows[(chip, DATES[5])]["previous_date"] == dt.date.fromisoformat(DATES[2])
    assert rows[(chip, DATES[5])]["cos_previous"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("testland_r0000_c0001", DATES[4])]["previous_date"] == dt.date.fromisoformat(DATES[3])


def test_chip_without_baseline_observations_gets_nulls_never_nan():
    # chip 1 first appears after the baseline period
    obs = [(0, 0), (0, 1), (0, 4), (1, 4), (1, 5)]
    vectors = np.random.default_rng(1).normal(size=(5, 6))
    result = region_similarity(synthetic_series(obs, vectors))
    table = result.table()
    late = [r for r in table.to_pylist() if r["chip_id"] == "testland_r0000_c0001"]
    assert [r["cos_baseline"] for r in late] == [None, None]
    assert [r["n_baseline_obs"] for r in late] == [0, 0]
    assert late[1]["cos_previous"] is not None  # previous similarity does not need a baseline
    for name in ("cos_baseline", "cos_previous"):
        assert not pc.any(pc.is_nan(pc.drop_null(table.column(name)))).as_py()
    summary = result.summary()
    assert summary["chips_without_baseline"] == 1
    assert summary["chips_without_baseline_ids"] == ["testland_r0000_c0001"]
    assert json.loads(table.schema.metadata[b"similarity"])["rows_without_baseline"] == 2


def test_configured_baseline_period_overrides_the_default():
    obs = [(0, d) for d in range(6)]
    vectors = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]])
    series = synthetic_series(obs, vectors)
    result = region_similarity(series, baseline_start="2021-01-01", baseline_end="2021-12-31")
    assert result.period is not None and result.period.source == "config"
    rows = rows_by_key(result.table())
    assert rows[("testland_r0000_c0000", DATES[0])]["cos_baseline"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("testland_r0000_c0000", DATES[5])]["cos_baseline"] == pytest.approx(1.0, abs=1e-6)
    assert [r["in_baseline"] for r in result.table().to_pylist()] == [False] * 3 + [True] * 3
    only_start = baseline_period(None, start="2021-01-01", days=10)
    assert only_start is not None and only_start.end == dt.date(2021, 1, 10)


@pytest.mark.parametrize(("start", "end", "message"), [
    ("2021-05-01", "2021-01-01", "ends .* before it starts"),
    ("2021/05/01", None, "baseline_start '2021/05/01' is not an ISO date"),
    (None, "tomorrow", "baseline_end 'tomorrow' is not an ISO date"),
])
def test_bad_baseline_configuration_is_refused(start, end, message):
    with pytest.raises(SimilarityError, match=message):
        baseline_period(dt.date(2020, 1, 1), start, end)


def test_invalid_vectors_are_null_and_skipped_as_previous():
    obs = [(0, 0), (0, 1), (0, 2)]
    series = synthetic_series(obs, np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    result = region_similarity(series)
    rows = result.table().to_pylist()
    assert rows[1]["cos_baseline"] is None and rows[1]["cos_previous"] is None and not rows[1]["in_baseline"]
    assert rows[2]["previous_date"] == dt.date.fromisoformat(DATES[0])
    assert rows[2]["cos_previous"] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert rows[0]["n_baseline_obs"] == 2 and result.summary()["invalid_vectors"] == 1


def test_duplicate_observations_are_an_error():
    series = synthetic_series([(0, 0), (0, 0)], np.ones((2, 3)))
    with pytest.raises(SimilarityError, match="more than one vector for some chip and date"):
        region_similarity(series)


def test_empty_region_gives_an_empty_labelled_table():
    result = region_similarity(synthetic_series([], np.zeros((0, 0)), dates=[]))
    table = result.table()
    assert table.num_rows == 0 and result.period is None
    assert table.column_names == ["chip_id", "region", "date", "cos_baseline", "cos_previous",
                                  "previous_date", "in_baseline", "n_baseline_obs"]
    assert "no embeddings" in json.loads(table.schema.metadata[b"similarity"])["status"]


def test_vectorized_functions_match_a_per_chip_reference_loop():
    rng = np.random.default_rng(5)
    n_chips, n_dates, dim = 7, 9, 5
    observed = rng.random((n_chips, n_dates)) < 0.7
    chip_index, date_index = np.nonzero(observed)
    shuffle = rng.permutation(len(chip_index))
    chip_index, date_index = chip_index[shuffle], date_index[shuffle]
    vectors = rng.normal(size=(len(chip_index), dim)).astype(np.float32)
    member = date_index < 4
    cos_b, counts = cosine_to_baseline(vectors, chip_index, n_chips, member)
    cos_p, prev = cosine_to_previous(vectors, chip_index, date_index)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for chip in range(n_chips):
        rows = np.flatnonzero(chip_index == chip)
        rows = rows[np.argsort(date_index[rows])]
        base_rows = rows[member[rows]]
        assert counts[chip] == len(base_rows)
        for i, row in enumerate(rows):
            if len(base_rows):
                expected = cosine(vectors[row], vectors[base_rows].mean(axis=0))
                assert cos_b[row] == pytest.approx(expected, abs=1e-5)
            else:
                assert np.isnan(cos_b[row])
            if i == 0:
                assert prev[row] == -1 and np.isnan(cos_p[row])
            else:
                assert prev[row] == rows[i - 1]
                assert cos_p[row] == pytest.approx(cosine(vectors[row], vectors[rows[i - 1]]), abs=1e-5)
