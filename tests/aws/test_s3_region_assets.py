"""The region-level analyses and the land-cover heads on the S3 lake (moto, loopback): they read
the committed partitions their upstream wrote to S3 (never one left uncommitted), give what they
give on the local lake, and commit their own output to S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import materialize
from dagster_aws.s3 import S3Resource
from s3_helpers import list_keys

from geofm_assets.analysis.change_outputs import CHANGE_TABLE
from geofm_assets.analysis.series import SPATIAL_FILE
from geofm_assets.analysis.similarity import SIMILARITY_TABLE
from geofm_assets.assets.change_maps import change_maps
from geofm_assets.assets.heads import landcover_classifier, landcover_map
from geofm_assets.assets.similarity import similarity_metrics
from geofm_assets.lake import EMBEDDINGS_TABLE
from geofm_assets.lake_s3 import MARKER, S3Lake
from geofm_assets.partitions import partition_key
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.s3_lake import S3LakeResource
from geofm_assets.resources.stac import StacResource

pytestmark = pytest.mark.slow  # the session's tiny lake (tiles, chips, embeddings) first

PREFIX = "geofm/lake"  # make_lake's
REGION = "jamari"
# A date with objects in S3 but no marker: a write that never committed.
UNCOMMITTED = "2031-01-01"


def upload(writer: S3Lake, root: Path, asset: str, region: str) -> list[str]:
    """Commit every partition of ``asset`` in ``region`` of the local lake ``root`` to S3."""
    rels = []
    for folder in sorted((root / asset / f"region={region}").glob("date=*")):
        rel = folder.relative_to(root).as_posix()
        writer.commit(folder, rel)
        rels.append(rel)
    return rels


def leave_uncommitted(writer: S3Lake, root: Path, asset: str, region: str, table: str) -> None:
    """Objects of ``asset``'s partition on ``UNCOMMITTED``: a copy of its first table, no marker."""
    first = sorted((root / asset / f"region={region}").glob(f"date=*/{table}"))[0]
    key = writer.key(f"{asset}/region={region}/date={UNCOMMITTED}/{table}")
    writer.client.put_object(Bucket=writer.bucket, Key=key, Body=first.read_bytes())


def s3_lake(endpoint: str, bucket: str, cache: Path) -> S3LakeResource:
    return S3LakeResource(s3=S3Resource(endpoint_url=endpoint, region_name="us-east-1"),
                          bucket=bucket, prefix=PREFIX, cache_dir=str(cache))


def metadata_of(result, asset: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def table_rows(root: Path, pattern: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in root.glob(pattern))


def read_s3_table(writer: S3Lake, rel_name: str) -> pa.Table:
    body = writer.client.get_object(Bucket=writer.bucket, Key=writer.key(rel_name))["Body"].read()
    return pq.read_table(pa.BufferReader(body))


def test_region_assets_read_the_committed_partitions_and_commit_to_s3(
    tiny_lake, instance, make_lake, s3_endpoint, bucket, tmp_path
):
    writer = make_lake()
    dates = upload(writer, tiny_lake.root, "embeddings", REGION)
    leave_uncommitted(writer, tiny_lake.root, "embeddings", REGION, EMBEDDINGS_TABLE)
    run_config = {"ops": {"change_maps": {"config": {}}, "similarity_metrics": {"config": {}}}}
    lake = s3_lake(s3_endpoint, bucket, tmp_path / "cache")
    on_s3 = materialize([similarity_metrics, change_maps], partition_key=REGION, instance=instance,
                        resources={"lake": lake}, run_config=run_config)
    assert on_s3.success

    local_root = tmp_path / "local"
    shutil.copytree(tiny_lake.root / "embeddings", local_root / "embeddings")
    on_disk = materialize([similarity_metrics, change_maps], partition_key=REGION, instance=instance,
                          resources={"lake": LocalLakeResource(root=str(local_root))},
                          run_config=run_config)
    assert on_disk.success

    # every committed date was read, the uncommitted one was not; the checks agree
    rows = table_rows(tiny_lake.root, f"embeddings/region={REGION}/date=*/{EMBEDDINGS_TABLE}")
    s3_meta, disk_meta = metadata_of(on_s3, "similarity_metrics"), metadata_of(on_disk, "similarity_metrics")
    assert s3_meta["date_partitions_read"] == len(dates) == disk_meta["date_partitions_read"] == 6
    assert s3_meta["dagster/row_count"] == rows == disk_meta["dagster/row_count"] > 0
    assert UNCOMMITTED not in json.dumps(s3_meta["dates"])
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed
              for e in on_s3.get_asset_check_evaluations()}
    assert len(checks) == 7 and all(checks.values()), checks

    # the outputs are committed to S3 and equal the local lake's
    keys = set(list_keys(writer.client, bucket))
    for asset, table in (("similarity_metrics", SIMILARITY_TABLE), ("change_maps", CHANGE_TABLE)):
        rel = f"{asset}/region={REGION}"
        assert {f"{PREFIX}/{rel}/{MARKER}", f"{PREFIX}/{rel}/{table}"} <= keys
        manifest = writer.manifest(rel)
        assert manifest is not None and table in manifest["files"]
        expected = pq.read_table(local_root / rel / table)
        assert read_s3_table(writer, f"{rel}/{table}").equals(expected), asset
    changed = [metadata_of(r, "change_maps")["chips_changed"] for r in (on_s3, on_disk)]
    assert changed[0] == changed[1]

    # the cache holds the committed dates only; the cell features, read by change_maps, too
    cached = sorted(p.name for p in (tmp_path / "cache" / "embeddings" / f"region={REGION}").glob("date=*"))
    assert cached == sorted(Path(d).name for d in dates)
    assert all((tmp_path / "cache" / d / SPATIAL_FILE).exists() for d in dates)


def test_similarity_fetches_only_the_embeddings_tables(
    tiny_lake, instance, make_lake, s3_endpoint, bucket, tmp_path
):
    writer = make_lake()
    dates = upload(writer, tiny_lake.root, "embeddings", REGION)
    lake = s3_lake(s3_endpoint, bucket, tmp_path / "cache")
    result = materialize([similarity_metrics], partition_key=REGION, instance=instance,
                         resources={"lake": lake})
    assert result.success
    for rel in dates:
        assert sorted(p.name for p in (tmp_path / "cache" / rel).iterdir() if not p.name.startswith(".")) == [
            EMBEDDINGS_TABLE]  # not the cell features (spatial*.npy)


def test_landcover_heads_on_the_s3_lake(tiny_lake, instance, make_lake, s3_endpoint, bucket, tmp_path):
    writer = make_lake()
    for region in tiny_lake.regions:
        for asset, table in (("chips", "chips.parquet"), ("embeddings", EMBEDDINGS_TABLE)):
            upload(writer, tiny_lake.root, asset, region)
            leave_uncommitted(writer, tiny_lake.root, asset, region, table)
    resources = {"lake": s3_lake(s3_endpoint, bucket, tmp_path / "train-cache"),
                 "stac": StacResource(catalog=str(tiny_lake.sample.catalog_path))}
    trained = materialize([landcover_classifier], instance=instance, resources=resources,
                          run_config={"ops": {"landcover_classifier": {"config": {"min_share": 0.7}}}})
    assert trained.success
    rows = table_rows(tiny_lake.root, f"embeddings/region=*/date=*/{EMBEDDINGS_TABLE}")
    meta = metadata_of(trained, "landcover_classifier")
    assert meta["observations"] + sum(meta["dropped"].values()) == rows  # no uncommitted copy read
    keys = set(list_keys(writer.client, bucket))
    assert {f"{PREFIX}/landcover_classifier/{MARKER}", f"{PREFIX}/landcover_classifier/model.npz"} <= keys

    # the map runs elsewhere: its own cache, the head and the partition fetched from S3
    date = tiny_lake.dates[0]
    resources["lake"] = s3_lake(s3_endpoint, bucket, tmp_path / "map-cache")
    mapped = materialize([landcover_map], instance=instance, resources=resources,
                         partition_key=str(partition_key(date, REGION)))
    assert mapped.success
    out = f"landcover_map/region={REGION}/date={date}"
    assert f"{PREFIX}/{out}/{MARKER}" in set(list_keys(writer.client, bucket))
    doc = json.loads(writer.client.get_object(
        Bucket=bucket, Key=writer.key(f"{out}/landcover_map.geojson"))["Body"].read())
    partition_rows = pq.read_metadata(
        tiny_lake.root / f"embeddings/region={REGION}/date={date}/{EMBEDDINGS_TABLE}").num_rows
    assert len(doc["features"]) == metadata_of(mapped, "landcover_map")["chips"] == partition_rows > 0
    assert not (tmp_path / "map-cache" / f"chips/region={REGION}/date={date}/datacubes").exists()
