"""Checks on a written embeddings partition (no Dagster imports): each (passed, details)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

CheckOutcome = tuple[bool, dict[str, Any]]


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """[N D] float32 from a fixed-size-list column."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


def check_embeddings(chips: pa.Table, embeddings: pa.Table, expected_dim: int) -> dict[str, CheckOutcome]:
    kept = chips.column("chip_id").to_pylist()
    got = embeddings.column("chip_id").to_pylist()
    missing, extra = sorted(set(kept) - set(got)), sorted(set(got) - set(kept))
    duplicates = len(got) - len(set(got))
    matrix = embedding_matrix(embeddings) if embeddings.num_rows else np.zeros((0, expected_dim), np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(matrix), matrix, 0), axis=1)
    ids = np.asarray(got, dtype=object)
    dim = int(embeddings.column("embedding").type.list_size)
    return {
        "one_vector_per_kept_chip": (
            not missing and not extra and duplicates == 0,
            {"kept_chips": len(kept), "vectors": len(got), "missing": missing[:20],
             "extra": extra[:20], "duplicates": duplicates},
        ),
        "vectors_finite": (bool(finite.all()), {"non_finite": ids[~finite][:20].tolist()}),
        "vectors_nonzero": (
            bool((norms > 1e-12).all()),
            {"zero_norm": ids[norms <= 1e-12][:20].tolist(),
             "min_norm": float(norms.min()) if len(norms) else None},
        ),
        "dimension_matches_model": (dim == expected_dim, {"dim": dim, "model_dim": expected_dim}),
    }
