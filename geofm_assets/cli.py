"""The ``geofm`` command: sample data, date registration and materializing partitions."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geofm_assets import paths

# The per-partition (region x date) ingest and embedding assets: `geofm materialize`'s default.
MATERIALIZABLE = ("sentinel2_tiles", "chips", "embeddings", "vector_index")
# Runs still log everything to the instance (the UI shows it); the terminal gets warnings only.
# The run tags with which Dagster's backfills give a run a range of partition keys
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance():
    from dagster import DagsterInstance

    home = paths.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DAGSTER_HOME", str(home))
    return DagsterInstance.get()


def cmd_sample_data(args: argparse.Namespace) -> int:
    from geofm_assets.geo.sample_data import generate_sample

    out = Path(args.out) if args.out else paths.sample_dir()
    t0 = time.perf_counter()
    sample = generate_sample(out, size=args.size, seed=args.seed)
    print(
        f"sample catalog ({args.size}, seed {args.seed}): {len(sample.item_ids)} items, "
        f"{len(sample.dates)} dates, tiles {', '.join(sample.tiles)} in "
        f"{time.perf_counter() - t0:.1f} s\n  catalog  {sample.catalog_path}\n"
        f"  regions  {sample.regions_path}\n  truth    {sample.deforestation_path}"
    )
    return 0


def catalog_dates(regions: Sequence[str] | None = None) -> list[dt.date]:
    """Acquisition dates in the configured catalog over the given (default: all) regions."""
    from geofm_assets.geo.catalog import open_catalog
    from geofm_assets.partitions import REGIONS

    catalog = open_catalog(paths.stac_catalog())
    dates: set[dt.date] = set()
    for name in regions or sorted(REGIONS):
        items = catalog.search(REGIONS[name].bounds, dt.date(1900, 1, 1), dt.date(2999, 12, 31))
        dates.update(i.datetime.date() for i in items if i.datetime)
    return sorted(dates)


def cmd_dates(args: argparse.Namespace) -> int:
    from geofm_assets.lake import checked_date
    from geofm_assets.partitions import DATE_PARTITIONS_NAME

    instance = _instance()
    if args.action == "list":
        for key in sorted(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME)):
            print(key)
        return 0
    if args.action == "add":
        new = sorted({checked_date(d).isoformat() for d in args.dates})
    else:  # sync
        new = [d.isoformat() for d in catalog_dates()]
    known = set(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME))
    added = [d for d in new if d not in known]
    if added:
        instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, added)
    print(f"registered {len(added)} new date(s); {len(known) + len(added)} in all")
    return 0


def materialize_partitions(
    regions: Sequence[str], dates: Sequence[str], select: Sequence[str], instance=None
) -> list[dict[str, Any]]:
    """Materialize ``select`` for every region x date on the instance in ``DAGSTER_HOME``,
    split into runs as a backfill would: one run per partition for the assets that run so
    (tiles, chips, the maps), one run per region and block of dates for the batched ones
    (embeddings, vector_index). Returns one summary row per partition."""
    from dagster import materialize

    from geofm_assets import definitions
    from geofm_assets.geo.regions import get_region
    from geofm_assets.lake import checked_date
    from geofm_assets.partitions import DATE_PARTITIONS_NAME, REGIONS, partition_key

    instance = instance or _instance()
    for r in regions:
        get_region(REGIONS, r)
    known = set(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME))
    for d in dates:
        checked_date(d)
        if d not in known:
            raise ValueError(
                f"date {d} is not a registered partition date; run `geofm dates add {d}` "
                "(or `geofm dates sync` for every date in the catalog) first"
            )
    by_name = {a.key.to_user_string(): a for a in definitions.ASSETS
                if partitioning(a) == "region_date"}
    unknown = [s for s in select if s not in by_name]
    if unknown:
        raise ValueError(f"cannot select {unknown} per region x date; choose from {', '.join(by_name)}")
    assets = [by_name[s] for s in select]
    resources = definitions.resources_for(os.environ.get("GEOFM_ENV", "local"))
    rows: dict[tuple[str, str], dict[str, Any]] = {
        (d, r): {"date": d, "region": r, "success": True, "seconds": 0.0} for d in dates for r in regions}

    def note(row: dict[str, Any], result: Any, key: str | None) -> None:
        for event in result.get_asset_materialization_events():
            mat = event.step_materialization_data.materialization
            if key is not None and mat.partition is not None and mat.partition != key:
                continue
            md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            if mat.asset_key.to_user_string() == "chips":
                row.update(status=md.get("status"), kept=md.get("chips_kept"),
                           dropped=md.get("chips_dropped"))
            if mat.asset_key.to_user_string() == "embeddings":
                row.update(vectors=md.get("count"), model=md.get("model"))

    for batched, group in policy_groups(assets):
        names = ", ".join(a.key.to_user_string() for a in group)
        if not batched:  # one run per partition, as backfills run these
            for d in dates:
                for r in regions:
                    row, t0 = rows[(d, r)], time.perf_counter()
                    result = materialize(group, instance=instance, partition_key=str(partition_key(d, r)),
                                         resources=resources, raise_on_error=False, run_config=QUIET_CONSOLE)
                    row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 1)
                    row["success"] = row["success"] and result.success
                    note(row, result, None)
                    vectors = f" vectors={row['vectors']}" if "vectors" in row else ""
                    print(f"  {'ok ' if result.success else 'FAILED'} {names} {d}|{r}: "
                          f"{row.get('status', '')} kept={row.get('kept', '-')} "
                          f"dropped={row.get('dropped', '-')}{vectors} ({time.perf_counter() - t0:.1f} s)",
                          flush=True)
            continue
        # one run per region and contiguous block of dates, as backfills run these
        order = list(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME))
        for r in regions:
            for block in contiguous_blocks(dates, order):
                t0 = time.perf_counter()
                first, last = str(partition_key(block[0], r)), str(partition_key(block[-1], r))
                result = materialize(group, instance=instance, resources=resources, raise_on_error=False,
                                     run_config=QUIET_CONSOLE,
                                     tags={RANGE_START_TAG: first, RANGE_END_TAG: last})
                done = {event.step_materialization_data.materialization.partition
                        for event in result.get_asset_materialization_events()}
                for d in block:
                    row, key = rows[(d, r)], str(partition_key(d, r))
                    note(row, result, key)
                    row["success"] = row["success"] and (result.success or (key in done and len(group) == 1))
                    row["seconds"] = round(row["seconds"] + (time.perf_counter() - t0) / len(block), 1)
                print(f"  {'ok ' if result.success else 'FAILED'} {names} {block[0]}..{block[-1]}|{r}: "
                      f"{len(block)} partitions in one run ({time.perf_counter() - t0:.1f} s)", flush=True)
    return list(rows.values())


def policy_groups(assets: Sequence[Any]) -> list[tuple[bool, list[Any]]]:
    """``assets`` (in dependency order) in consecutive groups of one backfill policy, each
    marked batched (several partitions a run) or not, as backfills would split them into runs."""
    from geofm_assets.partitions import ONE_PARTITION_PER_RUN

    groups: list[tuple[bool, list[Any]]] = []
    last = None
    for asset in assets:
        policy = asset.backfill_policy
        if groups and policy == last:
            groups[-1][1].append(asset)
        else:
            groups.append((policy not in (None, ONE_PARTITION_PER_RUN), [asset]))
        last = policy
    return groups


def contiguous_blocks(dates: Sequence[str], order: Sequence[str]) -> list[list[str]]:
    """``dates`` split into runs that are contiguous in ``order`` (the dynamic partition's
    order, in which Dagster reads a key range), each in that order."""
    position = {d: i for i, d in enumerate(order)}
    blocks: list[list[str]] = []
    for d in sorted(dates, key=lambda x: position[x]):
        if blocks and position[d] == position[blocks[-1][-1]] + 1:
            blocks[-1].append(d)
        else:
            blocks.append([d])
    return blocks


def partitioning(asset) -> str:
    """``region_date``, ``region`` (a region-level asset over all its dates) or ``none``."""
    from geofm_assets.partitions import region_date_partitions, region_partitions

    if asset.partitions_def == region_date_partitions:
        return "region_date"
    if asset.partitions_def == region_partitions:
        return "region"
    if asset.partitions_def is None:
        return "none"
    raise ValueError(f"{asset.key.to_user_string()} has a partitioning the CLI does not know")


def graph_stages(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The selected assets in stages that can run one after the other: within a stage every asset
    has the same partitioning (so one run per partition covers them all); a stage starts where the
    partitioning changes along a dependency (e.g. chips -> change_maps -> landcover_map)."""
    from geofm_assets import definitions

    graph = definitions.defs.resolve_asset_graph()
    assets = {a.key: a for a in definitions.ASSETS if a.key.to_user_string() in names}
    unknown = set(names) - {k.to_user_string() for k in assets}
    if unknown:
        raise ValueError(f"unknown assets {sorted(unknown)}; choose from "
                         f"{', '.join(a.key.to_user_string() for a in definitions.ASSETS)}")
    level: dict[Any, int] = {}
    for key in graph.toposorted_asset_keys:
        if key not in assets:
            continue
        kind = partitioning(assets[key])
        level[key] = max(
            [level[p] + (partitioning(assets[p]) != kind) for p in graph.get(key).parent_keys
             if p in level] or [0]
        )
    stages: dict[tuple[int, str], list[str]] = {}
    for key, lv in level.items():
        stages.setdefault((lv, partitioning(assets[key])), []).append(key.to_user_string())
    return [(kind, names_) for (_lv, kind), names_ in sorted(stages.items())]


def materialize_whole(
    names: Sequence[str], regions: Sequence[str], instance=None
) -> list[dict[str, Any]]:
    """Materialize region-level assets (one run per region) or unpartitioned ones (one run)."""
    from dagster import materialize

    from geofm_assets import definitions

    instance = instance or _instance()
    assets = [a for a in definitions.ASSETS if a.key.to_user_string() in names]
    kinds = {partitioning(a) for a in assets}
    if kinds - {"region", "none"} or len(kinds) != 1:
        raise ValueError(f"{list(names)} are not all region-level or all unpartitioned")
    resources = definitions.resources_for(os.environ.get("GEOFM_ENV", "local"))
    keys: list[str | None] = list(regions) if kinds == {"region"} else [None]
    rows = []
    for key in keys:
        t0 = time.perf_counter()
        result = materialize(assets, instance=instance, partition_key=key, resources=resources,
                             raise_on_error=False, run_config=QUIET_CONSOLE)
        row: dict[str, Any] = {"region": key, "assets": list(names), "success": result.success,
                                  "seconds": round(time.perf_counter() - t0, 1)}
        failed_checks = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        rows.append(row)
        print(f"  {'ok ' if result.success else 'FAILED'} {', '.join(names)}"
              f"{' | ' + key if key else ''} ({row['seconds']} s)"
              f"{'  failed checks: ' + ', '.join(failed_checks) if failed_checks else ''}", flush=True)
    return rows


def materialize_stages(
    names: Sequence[str], regions: Sequence[str], dates: Sequence[str], instance=None
) -> list[dict[str, Any]]:
    """Materialize ``names`` stage by stage (see ``graph_stages``)."""
    rows: list[dict[str, Any]] = []
    for kind, stage in graph_stages(names):
        how = {"region_date": "per region x date", "region": "per region", "none": "once"}[kind]
        print(f"-- {', '.join(stage)} ({how})", flush=True)
        if kind == "region_date":
            rows += materialize_partitions(regions, dates, stage, instance)
        else:
            rows += materialize_whole(stage, regions, instance)
    return rows


def _dates_from_args(args: argparse.Namespace, instance) -> list[str]:
    from geofm_assets.partitions import DATE_PARTITIONS_NAME

    if args.date:
        return sorted(set(args.date))
    dates = sorted(instance.get_dynamic_partitions(DATE_PARTITIONS_NAME))
    if args.start:
        dates = [d for d in dates if d >= args.start]
    if args.end:
        dates = [d for d in dates if d <= args.end]
    return dates


def cmd_materialize(args: argparse.Namespace) -> int:
    from geofm_assets.partitions import REGIONS

    instance = _instance()
    regions = args.region or sorted(REGIONS)
    dates = _dates_from_args(args, instance)
    if not dates:
        print("no registered dates to materialize: run `geofm dates sync` first", file=sys.stderr)
        return 2
    rows = materialize_stages(args.select.split(","), regions, dates, instance)
    return 0 if all(r["success"] for r in rows) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from geofm_assets.partitions import REGIONS

    sample_marker = paths.sample_dir() / "sample.json"
    wanted = {"size": args.size, "seed": args.seed}
    if not (sample_marker.exists() and json.loads(sample_marker.read_text()) == wanted):
        print(f"[1/3] writing the sample catalog ({args.size}) to {paths.sample_dir()}", flush=True)
        cmd_sample_data(argparse.Namespace(out=None, size=args.size, seed=args.seed))
        sample_marker.write_text(json.dumps(wanted))
    else:
        print(f"[1/3] sample catalog ({args.size}) already in {paths.sample_dir()}")
    print("[2/3] registering the catalog's dates as partitions", flush=True)
    cmd_dates(argparse.Namespace(action="sync"))
    instance = _instance()
    dates = [d.isoformat() for d in catalog_dates()]
    regions = sorted(REGIONS)
    from geofm_assets import definitions

    names = [a.key.to_user_string() for a in definitions.ASSETS]
    print(f"[3/3] materializing the whole graph ({', '.join(names)}) for {len(regions)} regions x "
          f"{len(dates)} dates on the instance in {paths.dagster_home()}", flush=True)
    t0 = time.perf_counter()
    rows = materialize_stages(names, regions, dates, instance)
    failed = [r for r in rows if not r["success"]]
    partitions = [r for r in rows if "date" in r]  # a partition has a row in each of its stages
    kept = sum(int(r.get("kept") or 0) for r in partitions)
    dropped = sum(int(r.get("dropped") or 0) for r in partitions)
    vectors = sum(int(r.get("vectors") or 0) for r in partitions)
    partitions = list({(r["date"], r["region"]): r for r in partitions}.values())
    lake = paths.lake_root()
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} partition and region-level steps succeeded in "
        f"{time.perf_counter() - t0:.0f} s: {len(partitions)} region x date partitions, {kept} chips "
        f"kept, {dropped} dropped, {vectors} embeddings; then the region-level assets.\n"
        f"Outputs (hive-style, DuckDB reads them directly):\n"
        f"  {lake}/sentinel2_tiles/region=*/date=*/mosaic.tif   region mosaics (COG)\n"
        f"  {lake}/chips/region=*/date=*/chips.parquet          chip tables (GeoParquet)\n"
        f"  {lake}/chips/region=*/date=*/datacubes/*.nc         datacubes (NetCDF)\n"
        f"  {lake}/chips/region=*/date=*/thumbnails/*.png       RGB thumbnails\n"
        f"  {lake}/embeddings/region=*/date=*/*.parquet         embeddings (GeoParquet)\n"
        f"  {lake}/vector_index/                                 the FAISS vector index\n"
        f"  {lake}/embedding_projections/region=*/             PCA + t-SNE table and plot\n"
        f"  {lake}/similarity_metrics/region=*/                cosine to baseline / previous date\n"
        f"  {lake}/change_maps/region=*/                       change map: GeoJSON, COG, PNG, plots\n"
        f"Try: .venv/bin/geofm sql \"SELECT region, count(*) FILTER (changed) AS changed, count(*) "
        f"AS chips FROM change_maps GROUP BY region\"\n"
        f"Health: .venv/bin/geofm status\n"
        f"Open the UI: make ui  (then http://127.0.0.1:3000, Catalog -> change_maps)"
    )
    example = next((r for r in rows if r.get("vectors")), None)
    if example is not None:
        from geofm_assets.lake import lake_connection

        chip = lake_connection(Path(lake)).execute(
            "SELECT chip_id FROM embeddings WHERE date = ? AND region = ? ORDER BY chip_id LIMIT 1",
            [dt.date.fromisoformat(example["date"]), example["region"]],
        ).fetchall()
        if chip:
            print(f"Search: .venv/bin/geofm search --chip {chip[0][0]} --date {example['date']} --k 5")
    return 1 if failed else 0


def _date_arg(value: str | None) -> dt.date | None:
    from geofm_assets.lake import checked_date

    return checked_date(value) if value else None


def cmd_search(args: argparse.Namespace) -> int:
    from geofm_assets import definitions
    from geofm_assets.search.query import as_json, find_similar, results_geojson

    resources = definitions.resources_for(os.environ.get("GEOFM_ENV", "local"))
    model = args.model or resources["encoder"].model
    chips = [args.chip] if args.chip else []
    chips += [c for c in (args.chips or "").split(",") if c]
    point = None
    if args.point:
        try:
            lon, lat = (float(v) for v in args.point.split(","))
        except ValueError:
            raise ValueError(f"--point takes LON,LAT in degrees, got {args.point!r}") from None
        point = (lon, lat)
    lake_root = Path(paths.lake_root())
    answer = find_similar(
        resources["vector_store"].store(), lake_root, model, chips=chips, date=_date_arg(args.date),
        point=point, k=args.k, min_score=args.min_score, regions=args.region,
        date_from=_date_arg(args.start), date_to=_date_arg(args.end), exclude_self=args.exclude_self,
    )
    if args.format == "json":
        print(as_json(answer))
    elif args.format == "geojson":
        print(as_json(results_geojson(lake_root, answer)))
    else:
        print(f"{'rank':>4}  {'score':>8}  {'date':10}  {'region':10}  chip_id")
        for i, r in enumerate(answer["results"], 1):
            print(f"{i:>4}  {r['score']:8.4f}  {r['date']:10}  {r['region']:10}  {r['chip_id']}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from geofm_assets.lake import lake_connection

    con = lake_connection(Path(paths.lake_root()))
    try:
        rel = con.sql(args.query)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from None
    if rel is None:
        return 0
    if args.format == "csv":
        rel.to_df().to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(rel.to_df().to_json(orient="records", date_format="iso", default_handler=str))
    else:
        rel.show(max_width=200, max_rows=args.max_rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from geofm_assets import definitions
    from geofm_assets.partitions import REGIONS
    from geofm_assets.status import collect_status, format_json, format_table

    report = collect_status(_instance(), definitions.defs, sorted(REGIONS), args.region)
    print(format_json(report) if args.format == "json" else format_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geofm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample-data", help="write the seeded sample STAC catalog")
    s.add_argument("--out", help=f"output folder (default {paths.sample_dir()})")
    s.add_argument("--size", default="demo", choices=("tiny", "demo", "bench"))
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample_data)

    d = sub.add_parser("dates", help="list or register date partitions")
    dsub = d.add_subparsers(dest="action", required=True)
    dsub.add_parser("list", help="registered dates")
    add = dsub.add_parser("add", help="register dates (YYYY-MM-DD)")
    add.add_argument("dates", nargs="+")
    dsub.add_parser("sync", help="register every date of the catalog over the regions")
    d.set_defaults(func=cmd_dates)

    m = sub.add_parser("materialize", help="materialize region x date partitions here")
    m.add_argument("--select", default=",".join(MATERIALIZABLE))
    m.add_argument("--region", action="append", help="a region (repeatable; default all)")
    m.add_argument("--date", action="append", help="a date (repeatable; default all registered)")
    m.add_argument("--from", dest="start", help="first date (inclusive)")
    m.add_argument("--to", dest="end", help="last date (inclusive)")
    m.set_defaults(func=cmd_materialize)

    q = sub.add_parser("search", help="chips most like reference chips (cosine, best first)")
    q.add_argument("--chip", help="a reference chip id")
    q.add_argument("--chips", help="several reference chips, comma-separated (their average vector)")
    q.add_argument("--date", help="the reference chips' date (default: their newest embedding)")
    q.add_argument("--point", help="LON,LAT: the chip covering this point on --date "
                   "(write --point=-63.8,-9.1 when LON is negative)")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--min-score", type=float)
    q.add_argument("--region", action="append", help="only results in this region (repeatable)")
    q.add_argument("--from", dest="start", help="only results on or after this date")
    q.add_argument("--to", dest="end", help="only results on or before this date")
    q.add_argument("--exclude-self", action="store_true", help="leave out the reference chips' ground")
    q.add_argument("--model", help="the encoder whose index to search (default: the configured one)")
    q.add_argument("--format", choices=("table", "json", "geojson"), default="table")
    q.set_defaults(func=cmd_search)

    sq = sub.add_parser("sql", help="DuckDB SQL over the lake (views: chips, embeddings, ...)")
    sq.add_argument("query")
    sq.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sq.add_argument("--max-rows", type=int, default=40)
    sq.set_defaults(func=cmd_sql)

    st = sub.add_parser("status", help="per asset and region: newest date, missing and failed "
                        "partitions, latest asset-check results (from the instance in DAGSTER_HOME)")
    st.add_argument("--region", action="append", help="only this region (repeatable; default all)")
    st.add_argument("--format", choices=("table", "json"), default="table")
    st.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="sample data, dates, and every partition materialized")
    demo.add_argument("--size", default="demo", choices=("tiny", "demo", "bench"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Dagster's preview/beta notices about its own APIs are for us, not for the terminal
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=PreviewWarning)
    warnings.filterwarnings("ignore", category=BetaWarning)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, LookupError) as exc:
        print(f"geofm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
