"""Per-partition results for assets that run several region x date partitions in one run
(``PARTITIONS_TOGETHER``): each partition gets its own materialization and check evaluations,
as a one-partition run would record them, and a partition that failed fails the run only after
the others were recorded.

A one-partition run returns its result as usual, so that assets downstream in the same run go
on. A run over several partitions logs them instead (Dagster would copy one returned result to
every partition of the range) and returns none, so a downstream asset selected into the same
run would be skipped: that is why each batched asset has its own backfill policy object (Dagster
groups a backfill's assets into runs by policy) and they run in runs of their own."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    Failure,
    MaterializeResult,
    MetadataValue,
)

# Dagster 1.13 has no public way to record a check result for one partition of a multi-partition
# run (AssetCheckResult attaches to the run's single partition, or none); the evaluation event
# that it builds is logged directly instead, with the partition set.
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluation
from dagster._core.definitions.metadata import normalize_metadata

from geofm_assets.partitions import region_date_partitions

CheckOutcomes = Mapping[str, tuple[bool, Mapping[str, Any]]]


def partition_check_specs(asset: str, checks: Sequence[tuple[str, str]]) -> list[AssetCheckSpec]:
    """Check specs evaluated per region x date partition."""
    return [AssetCheckSpec(name, asset=asset, description=description, partitions_def=region_date_partitions)
            for name, description in checks]


def record_partition(
    context: AssetExecutionContext, asset: str, partition: str, metadata: Mapping[str, Any],
    checks: CheckOutcomes,
) -> None:
    """Log ``partition``'s materialization of ``asset``, then its check evaluations."""
    key = AssetKey(asset)
    context.log_event(AssetMaterialization(asset_key=key, partition=partition, metadata=dict(metadata)))
    for name, (passed, check_metadata) in checks.items():
        context.log_event(AssetCheckEvaluation(
            asset_key=key, check_name=name, passed=passed, partition=partition,
            metadata=normalize_metadata(dict(check_metadata)),
            severity=AssetCheckSeverity.ERROR,
        ))


def results_logged_per_partition(context: AssetExecutionContext) -> None:
    """Tell Dagster that this step's results were logged per partition (``record_partition``)
    rather than returned. A Pipes session marks its step as one that must return its results
    (a guard against forgetting ``get_results()``); a step over several partitions cannot return
    one result per partition, so after its Pipes session it lifts that mark (private in 1.13)."""
    step = context.op_execution_context._step_execution_context
    step._requires_typed_event_stream = False


def fail_for(asset: str, failures: Mapping[str, str], total: int) -> Failure:
    """The error that fails a run in which some of its ``total`` partitions failed."""
    lines = [f"{key}: {error}" for key, error in sorted(failures.items())]
    return Failure(
        description=(f"{asset} failed for {len(failures)} of {total} partitions (the others were "
                     "written and recorded); re-run the failed ones:\n" + "\n".join(lines)),
        metadata={"failed_partitions": MetadataValue.json(sorted(failures))},
    )


def partition_results(
    context: AssetExecutionContext,
    asset: str,
    recorded: Sequence[tuple[str, Mapping[str, Any], CheckOutcomes]],
    failures: Mapping[str, str],
    total: int,
) -> Iterator[MaterializeResult]:
    """The step's results: ``recorded`` (key, metadata, check outcomes) for the partitions that
    succeeded, ``failures`` (key -> error) for the others, of ``total``."""
    if total == 1 and context.has_partition_key:
        if failures:
            raise fail_for(asset, failures, total)
        ((_key, metadata, checks),) = recorded
        yield MaterializeResult(metadata=dict(metadata), check_results=[
            AssetCheckResult(check_name=name, passed=passed, metadata=dict(check_metadata))
            for name, (passed, check_metadata) in checks.items()])
        return
    for key, metadata, checks in recorded:
        record_partition(context, asset, key, metadata, checks)
    results_logged_per_partition(context)
    if failures:
        raise fail_for(asset, failures, total)
