"""Analytics over a region's embedding time series: projections, similarity, change (no Dagster
imports)."""
