"""Declarative automation: how each asset follows its upstream (AutomationCondition)."""

from dagster import AutomationCondition


def follows_upstream_partition() -> AutomationCondition:
    """Per-partition downstream assets (embeddings after chips, vector_index after embeddings):
    run a region x date partition when its upstream partition is updated or newly missing."""
    return AutomationCondition.eager()


def follows_new_dates_of_region() -> AutomationCondition:
    """Region-level assets (all dates of a region): run when any date of the region is updated.
    Unlike ``eager()`` it does not wait for every date to exist: a date that failed or was never
    materialized must not block a region's map forever; it waits only for dates in progress."""
    return AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()).with_label(
        "after any new date of the region"
    )
