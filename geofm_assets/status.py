"""``geofm status``: per asset and region, what the Dagster instance holds.

For a region x date asset: the newest materialized date, the registered dates still missing,
the failed and in-progress ones; for a region-level asset: whether (and when) the region was
last materialized. For both, the latest asset-check results per partition, summed up per
region, and the latest result of checks on the whole asset (e.g. ``chips_up_to_date``).
The asset list comes from ``geofm_assets.definitions.defs`` at run time, so new assets appear
without a change here.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    MultiPartitionsDefinition,
    PartitionsDefinition,
    RunsFilter,
)
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)
from dagster._core.storage.partition_status_cache import AssetPartitionStatus
from dagster._core.storage.tags import PARTITION_NAME_TAG

if TYPE_CHECKING:
    from dagster import Definitions

ALL = "*"  # the "region" of an asset that is not partitioned by region
HISTORY_PAGE = 1000
LIST_IN_TABLE = 4  # dates listed in a table cell before "+N more"
BAD_CHECK_STATES = ("failed", "warned", "execution_failed")


@dataclass(frozen=True)
class PartitionPlace:
    """Where a partition key sits: its region (``ALL`` if none) and date (None if none)."""

    region: str
    date: str | None


def place_of(key: str, partitions_def: PartitionsDefinition | None, regions: Iterable[str]) -> PartitionPlace:
    """Region and date of a partition key, for region x date, region-only, or other partitioning."""
    if partitions_def is None:
        return PartitionPlace(ALL, None)
    if isinstance(partitions_def, MultiPartitionsDefinition):
        dims = partitions_def.get_partition_key_from_str(key).keys_by_dimension
        return PartitionPlace(dims.get("region", ALL), dims.get("date"))
    if key in set(regions):
        return PartitionPlace(key, None)
    return PartitionPlace(ALL, key)


def materialized_dates_by_region(instance: DagsterInstance, asset_key: AssetKey,
                                 partitions_def: MultiPartitionsDefinition) -> dict[str, list[dt.date]]:
    """The dates materialized at least once, per region, of a region x date asset."""
    out: dict[str, list[dt.date]] = defaultdict(list)
    for key in instance.get_materialized_partitions(asset_key):
        dims = partitions_def.get_partition_key_from_str(key).keys_by_dimension
        out[dims["region"]].append(dt.date.fromisoformat(dims["date"]))
    return {region: sorted(dates) for region, dates in out.items()}


@dataclass
class CheckStatus:
    """One asset check over a region's partitions (or over the whole asset): the status of
    each partition's latest evaluation, counted, and the partitions in each bad state."""

    check: str
    latest_status: str | None = None
    latest_partition: str | None = None
    latest_at: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failing: list[str] = field(default_factory=list)  # partitions failed, warned or execution_failed
    description: str | None = None
    metadata: dict[str, Any] | None = None  # of the latest evaluation, for checks on the whole asset

    @property
    def ok(self) -> bool:
        return not self.failing and self.latest_status not in BAD_CHECK_STATES


@dataclass
class AssetRegionStatus:
    asset: str
    region: str
    partitioning: str  # "region x date", "region", "date", "none"
    expected: int  # partitions registered (dates x this region, or 1)
    materialized: int
    newest_date: str | None
    last_materialized_at: str | None
    missing: list[str]
    failed: list[str]
    in_progress: list[str]
    failed_runs: dict[str, str]  # partition label -> run id of the failure
    checks: list[CheckStatus]


@dataclass
class StatusReport:
    dagster_home: str | None
    registered_dates: int
    regions: list[str]
    rows: list[AssetRegionStatus]
    asset_checks: dict[str, list[CheckStatus]]  # asset -> checks on the whole asset

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        for row in doc["rows"]:
            row["ok"] = not row["missing"] and not row["failed"] and all(
                not c["failing"] for c in row["checks"])
        return doc


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _check_history(instance: DagsterInstance, key: AssetCheckKey) -> list[AssetCheckExecutionRecord]:
    """Every execution of ``key``, newest first."""
    records: list[AssetCheckExecutionRecord] = []
    cursor = None
    while True:
        page = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=HISTORY_PAGE, cursor=cursor)
        records.extend(page)
        if len(page) < HISTORY_PAGE:
            return records
        cursor = page[-1].id


def _runs(instance: DagsterInstance, run_ids: Iterable[str]) -> dict[str, Any]:
    ids = sorted(set(run_ids))
    runs: dict[str, Any] = {}
    for start in range(0, len(ids), 500):
        for record in instance.get_run_records(RunsFilter(run_ids=ids[start:start + 500])):
            runs[record.dagster_run.run_id] = record.dagster_run
    return runs


def _resolved_status(record: AssetCheckExecutionRecord, runs: Mapping[str, Any]) -> str:
    """passed / failed / warned / execution_failed / skipped / in_progress, as the UI shows it."""
    if record.status == AssetCheckExecutionRecordStatus.SUCCEEDED:
        return "passed"
    if record.status == AssetCheckExecutionRecordStatus.FAILED:
        evaluation = record.evaluation
        severity = getattr(getattr(evaluation, "severity", None), "value", "ERROR")
        return "warned" if severity == "WARN" else "failed"
    run = runs.get(record.run_id)
    if run is None or (run.is_finished and run.status != DagsterRunStatus.FAILURE):
        return "skipped"
    return "execution_failed" if run.is_finished else "in_progress"


def _summarize(check: str, latest_by_label: Mapping[str, tuple[AssetCheckExecutionRecord, str]],
               description: str | None) -> CheckStatus:
    out = CheckStatus(check=check, description=description)
    if not latest_by_label:
        return out
    counts: dict[str, int] = defaultdict(int)
    for label, (_record, status) in sorted(latest_by_label.items()):
        counts[status] += 1
        if status in BAD_CHECK_STATES and label != ALL:
            out.failing.append(label)
    label, (record, status) = max(latest_by_label.items(), key=lambda kv: kv[1][0].id)
    out.latest_status = status
    out.latest_partition = None if label == ALL else label
    # when it was evaluated (the record is created earlier, when its run plans the check)
    out.latest_at = _iso(record.event.timestamp if record.event else record.create_timestamp)
    out.counts = dict(sorted(counts.items()))
    if label == ALL and record.evaluation is not None:
        out.metadata = {k: _plain(v) for k, v in record.evaluation.metadata.items()}
    return out


def _plain(value: Any) -> Any:
    """A metadata value as JSON-ready data."""
    value = getattr(value, "value", value)
    return json.loads(json.dumps(value, default=str))


def check_statuses(
    instance: DagsterInstance,
    check_keys: Sequence[AssetCheckKey],
    partitions_def: PartitionsDefinition | None,
    partitioned: bool,
    regions: Sequence[str],
    descriptions: Mapping[AssetCheckKey, str | None],
) -> dict[str, list[CheckStatus]]:
    """Per region (``ALL`` for checks on the whole asset): each check's summary over the latest
    evaluation of every partition. A check evaluated with its asset's partition (one declared
    in the asset's ``check_specs``) is placed by the partition tag of its run."""
    histories = {key: _check_history(instance, key) for key in check_keys}
    runs = _runs(instance, (r.run_id for records in histories.values() for r in records))
    out: dict[str, list[CheckStatus]] = defaultdict(list)
    for key in sorted(check_keys, key=lambda k: k.name):
        latest: dict[str, dict[str, tuple[AssetCheckExecutionRecord, str]]] = defaultdict(dict)
        for record in histories[key]:  # newest first: keep the first per partition
            run = runs.get(record.run_id)
            partition = record.partition or (run.tags.get(PARTITION_NAME_TAG) if run else None)
            if partitioned and partition is not None:
                place = place_of(partition, partitions_def, regions)
                region, label = place.region, place.date or partition
            else:
                region, label = ALL, ALL
            if label not in latest[region]:
                latest[region][label] = (record, _resolved_status(record, runs))
        places = regions if partitioned else [ALL]
        for region in places:
            out[region].append(_summarize(key.name, latest.get(region, {}), descriptions.get(key)))
    return out


def _failed_runs(instance: DagsterInstance, asset_key: AssetKey, keys: Sequence[str],
                 labels: Mapping[str, str]) -> dict[str, str]:
    """The run that last tried (and failed) to materialize each failed partition."""
    out: dict[str, str] = {}
    for key in keys:
        planned = instance.get_latest_planned_materialization_info(asset_key, key)
        if planned is not None:
            out[labels[key]] = planned.run_id
    return out


def _last_materialized(instance: DagsterInstance, asset_key: AssetKey,
                       keys: Sequence[str] | None) -> float | None:
    if keys is not None and not keys:
        return None
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=list(keys) if keys else None), limit=1
    ).records
    return records[0].timestamp if records else None


def _partitioning(partitions_def: PartitionsDefinition | None, regions: Sequence[str]) -> str:
    if partitions_def is None:
        return "none"
    if isinstance(partitions_def, MultiPartitionsDefinition):
        return " x ".join(sorted(d.name for d in partitions_def.partitions_defs)[::-1])
    return "region" if set(partitions_def.get_partition_keys()) == set(regions) else "other"


def collect_status(
    instance: DagsterInstance,
    defs: Definitions,
    regions: Sequence[str],
    only_regions: Sequence[str] | None = None,
) -> StatusReport:
    """The report for every asset of ``defs`` on ``instance``; ``only_regions`` narrows the rows."""
    from geofm_assets.partitions import DATE_PARTITIONS_NAME

    unknown = sorted(set(only_regions or []) - set(regions))
    if unknown:
        raise ValueError(f"unknown region(s) {', '.join(unknown)}: choose from {', '.join(regions)}")
    shown = [r for r in regions if not only_regions or r in only_regions]
    graph = defs.resolve_asset_graph()
    rows: list[AssetRegionStatus] = []
    asset_checks: dict[str, list[CheckStatus]] = {}
    for asset_key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(asset_key)
        if not node.is_materializable:
            continue
        pdef = node.partitions_def
        name = asset_key.to_user_string()
        check_keys = list(node.check_keys)
        embedded = [k for k in check_keys if graph.assets_def_for_key(k).partitions_def is not None]
        whole = [k for k in check_keys if k not in embedded]
        descriptions = {k: graph.get_check_spec(k).description for k in check_keys}
        per_region = check_statuses(instance, embedded, pdef, True, shown, descriptions)
        if whole:
            asset_checks[name] = check_statuses(instance, whole, pdef, False, shown, descriptions)[ALL]
        if pdef is None:
            event = instance.get_latest_materialization_event(asset_key)
            rows.append(AssetRegionStatus(
                name, ALL, "none", 1, int(event is not None), None,
                _iso(event.timestamp) if event else None, [] if event else ["(unpartitioned)"], [], [],
                {}, per_region.get(ALL, [])))
            continue
        keys = list(pdef.get_partition_keys(dynamic_partitions_store=instance))
        places = {k: place_of(k, pdef, regions) for k in keys}
        statuses = instance.get_status_by_partition(asset_key, keys, pdef) or {}
        ever = instance.get_materialized_partitions(asset_key)  # a re-run may since have failed
        partitioning = _partitioning(pdef, regions)
        for region in (shown if any(p.region != ALL for p in places.values()) else [ALL]):
            region_keys = [k for k in keys if places[k].region == region]
            labels = {k: places[k].date or k for k in region_keys}
            by_status: dict[AssetPartitionStatus | None, list[str]] = defaultdict(list)
            for k in region_keys:
                by_status[statuses.get(k)].append(labels[k])
            done = sorted(by_status[AssetPartitionStatus.MATERIALIZED])
            failed = sorted(by_status[AssetPartitionStatus.FAILED])
            dated = [d for k in region_keys if k in ever and (d := places[k].date) is not None]
            rows.append(AssetRegionStatus(
                asset=name, region=region, partitioning=partitioning, expected=len(region_keys),
                materialized=len(done), newest_date=max(dated) if dated else None,
                last_materialized_at=_iso(_last_materialized(instance, asset_key, region_keys)),
                missing=sorted(by_status[None]), failed=failed,
                in_progress=sorted(by_status[AssetPartitionStatus.IN_PROGRESS]),
                failed_runs=_failed_runs(instance, asset_key,
                                         [k for k in region_keys if labels[k] in failed], labels),
                checks=per_region.get(region, []),
            ))
    return StatusReport(
        dagster_home=_home(), registered_dates=len(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME)),
        regions=shown, rows=rows, asset_checks=asset_checks,
    )


def _home() -> str | None:
    import os

    return os.environ.get("DAGSTER_HOME")


def _dates_cell(dates: Sequence[str]) -> str:
    if not dates:
        return "-"
    shown = ", ".join(dates[:LIST_IN_TABLE])
    return shown + (f" +{len(dates) - LIST_IN_TABLE} more" if len(dates) > LIST_IN_TABLE else "")


def _checks_cell(checks: Sequence[CheckStatus]) -> str:
    evaluated = [c for c in checks if c.latest_status is not None]
    if not checks:
        return "-"
    bad = [c for c in checks if c.failing]
    if not bad:
        return f"{len(evaluated)}/{len(checks)} evaluated, all ok" if evaluated else "not evaluated"
    return "; ".join(f"{c.check} FAILING on {_dates_cell(c.failing)}" for c in bad)


def format_table(report: StatusReport) -> str:
    header = ("asset", "region", "newest", "done", "missing", "failed", "checks")
    lines = [header]
    for row in report.rows:
        newest = row.newest_date or (row.last_materialized_at or "-")[:16]
        lines.append((row.asset, row.region, newest, f"{row.materialized}/{row.expected}",
                      _dates_cell(row.missing), _dates_cell(row.failed), _checks_cell(row.checks)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
           for line in lines]
    for asset, checks in sorted(report.asset_checks.items()):
        for c in checks:
            state = c.latest_status or "not evaluated"
            when = f" at {c.latest_at}" if c.latest_at else ""
            out.append(f"check {asset}.{c.check} (whole asset): {state}{when}")
    home = report.dagster_home or "(ephemeral)"
    out.append(f"{report.registered_dates} registered date(s); instance {home}")
    return "\n".join(out)


def format_json(report: StatusReport) -> str:
    return json.dumps(report.to_dict(), indent=1)
