"""The assets on the S3 lake: one tiny partition's tiles, chips and embeddings written to an
S3-compatible server (moto, loopback) and read back with pyarrow and DuckDB over S3."""

from __future__ import annotations

import logging

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, EnvVar, build_resources, materialize
from dagster._serdes import serialize_value
from dagster_aws.s3 import S3Resource
from s3_helpers import PutFaults, list_keys

from geofm_assets.assets.chips import chips
from geofm_assets.assets.tiles import MANIFEST_FILE, MOSAIC_FILE, sentinel2_tiles
from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, partition_dir
from geofm_assets.lake_s3 import MARKER, S3Lake, arrow_filesystem, s3_client, s3_lake_connection
from geofm_assets.models import build_encoder
from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
from geofm_assets.resources.s3_lake import S3LakeResource
from geofm_assets.resources.stac import StacResource
from geofm_assets.workers.embed import embed_partition

REGION = "candeias"
PREFIX = "geofm/lake"


@pytest.fixture
def instance(tiny_sample) -> DagsterInstance:
    inst = DagsterInstance.ephemeral()
    inst.add_dynamic_partitions(DATE_PARTITIONS_NAME, [d.isoformat() for d in tiny_sample.dates])
    return inst


@pytest.fixture
def env_credentials(monkeypatch, aws_env) -> dict[str, str]:
    """Credentials handed to the S3Resource as EnvVars (the AWS_* variables are unset)."""
    creds = {"GEOFM_TEST_KEY_ID": aws_env["AWS_ACCESS_KEY_ID"],
             "GEOFM_TEST_SECRET": aws_env["AWS_SECRET_ACCESS_KEY"]}
    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return creds


def s3_lake(endpoint: str, bucket: str, cache_dir) -> S3LakeResource:
    return S3LakeResource(
        s3=S3Resource(endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=EnvVar("GEOFM_TEST_KEY_ID"),
                      aws_secret_access_key=EnvVar("GEOFM_TEST_SECRET")),
        bucket=bucket, prefix=PREFIX, cache_dir=str(cache_dir),
    )


def materialize_tiles_and_chips(instance, tiny_sample, lake, date: str):
    return materialize(
        [sentinel2_tiles, chips], instance=instance, partition_key=str(partition_key(date, REGION)),
        resources={"stac": StacResource(catalog=str(tiny_sample.catalog_path)), "lake": lake},
    )


@pytest.mark.slow
def test_one_partition_round_trips_through_s3(
    instance, tiny_sample, s3_endpoint, bucket, env_credentials, aws_env, tmp_path, caplog, capfd,
    monkeypatch,
):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="dagster")
    date = tiny_sample.dates[1].isoformat()
    lake = s3_lake(s3_endpoint, bucket, tmp_path / "user-code-cache")

    result = materialize_tiles_and_chips(instance, tiny_sample, lake, date)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"mosaic_is_valid_cog": True, "datacubes_finite": True,
                      "reflectance_plausible": True, "chip_ids_on_grid": True}

    # outside the run, the default chain (the worker's task role) gives the credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_env["AWS_SECRET_ACCESS_KEY"])
    client = s3_client(s3_endpoint, "us-east-1")
    keys = list_keys(client, bucket)
    tiles = f"{PREFIX}/sentinel2_tiles/region={REGION}/date={date}"
    chips_key = f"{PREFIX}/chips/region={REGION}/date={date}"
    assert {f"{tiles}/{MANIFEST_FILE}", f"{tiles}/{MOSAIC_FILE}", f"{tiles}/{MARKER}",
            f"{chips_key}/{CHIPS_TABLE}", f"{chips_key}/{MARKER}"} <= set(keys)
    assert not [k for k in keys if "/_staging/" in k]

    # The embedding worker, as it runs in its own container: fetch the chips partition from
    # S3 into a scratch lake, embed there, publish the embeddings partition to S3.
    worker = S3Lake.from_uri(lake.uri(), client, cache_root=tmp_path / "worker")
    worker.fetch(partition_dir_rel("chips", date))
    stats = embed_partition(worker.cache_root, REGION, date, build_encoder("rcf"), batch_size=4,
                            log=lambda _m: None)
    emb_rel = partition_dir_rel("embeddings", date)
    worker.commit(worker.local_path(emb_rel), emb_rel)

    # read back over S3: pyarrow ...
    fs = arrow_filesystem(s3_endpoint, "us-east-1", **_keys(env_credentials))
    chips_table = pq.read_table(f"{bucket}/{chips_key}/{CHIPS_TABLE}", filesystem=fs)
    emb_table = pq.read_table(f"{bucket}/{PREFIX}/{emb_rel}/{EMBEDDINGS_TABLE}", filesystem=fs)
    assert chips_table.num_rows == stats.count > 0
    assert emb_table.column("chip_id").to_pylist() == chips_table.column("chip_id").to_pylist()
    vectors = np.stack(emb_table.column("embedding").to_numpy(zero_copy_only=False))  # [N D]
    assert vectors.shape == (stats.count, stats.dim) and np.isfinite(vectors).all()
    assert b"emb" in emb_table.schema.metadata and b"geo" in emb_table.schema.metadata

    # ... and DuckDB, joining the two tables by chip id
    con = s3_lake_connection(fs, bucket, PREFIX)
    joined = con.execute(
        "SELECT count(*), count(DISTINCT e.chip_id), min(len(e.embedding)) "
        "FROM embeddings e JOIN chips c USING (chip_id)"
    ).fetchone()
    assert joined == (stats.count, stats.count, stats.dim)

    # the user-code side reads the embeddings partition the worker published, and its DuckDB
    # sees the same tables
    with build_resources({"lake": lake}) as built:
        local = built.lake.partition_dir("embeddings", REGION, date)
        assert pq.read_table(local / EMBEDDINGS_TABLE).equals(emb_table)
        assert built.lake.sql().execute("SELECT count(*) FROM embeddings").fetchone() == (stats.count,)

    # the secret shows nowhere: not in the run's events, metadata, run record, logs or output
    secret = env_credentials["GEOFM_TEST_SECRET"]
    records = serialize_value(list(instance.all_logs(result.run_id)))
    run = serialize_value(instance.get_run_by_id(result.run_id))
    captured = capfd.readouterr()
    for where, text in {"event log": records, "run record": run, "logs": caplog.text,
                        "stdout": captured.out, "stderr": captured.err}.items():
        assert secret not in text, f"the secret access key appears in the {where}"
    assert "published s3://" in caplog.text  # the logs were captured


def test_a_failing_put_fails_the_run_and_keeps_the_previous_partition(
    instance, tiny_sample, s3_endpoint, bucket, env_credentials, aws_env, tmp_path, monkeypatch,
    backoff_delays,
):
    date = tiny_sample.dates[0].isoformat()
    lake = s3_lake(s3_endpoint, bucket, tmp_path / "cache")
    result = materialize([sentinel2_tiles], instance=instance,
                         partition_key=str(partition_key(date, REGION)),
                         resources={"stac": StacResource(catalog=str(tiny_sample.catalog_path)),
                                    "lake": lake})
    assert result.success
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=aws_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws_env["AWS_SECRET_ACCESS_KEY"])
    rel = partition_dir_rel("sentinel2_tiles", date)
    marker_before = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{rel}/{MARKER}")["Body"].read()

    faults = PutFaults(match=MOSAIC_FILE, times=1000, status=503, code="SlowDown",
                       message="Please reduce your request rate.")
    original = S3Resource.get_client

    def faulty_client(self):
        return faults.install(original(self))

    monkeypatch.setattr(S3Resource, "get_client", faulty_client)
    failing = s3_lake(s3_endpoint, bucket, tmp_path / "cache-2")
    result = materialize([sentinel2_tiles], instance=instance, raise_on_error=False,
                         partition_key=str(partition_key(date, REGION)),
                         resources={"stac": StacResource(catalog=str(tiny_sample.catalog_path)),
                                    "lake": failing})
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    text = error.message + (error.cause.message if error.cause else "")
    assert "uploading mosaic.tif" in text and "SlowDown (HTTP 503, 6 attempts)" in text
    assert "previous version of the partition is unchanged" in text
    assert backoff_delays == [1.0, 2.0, 4.0, 8.0, 16.0]  # dagster-aws's max_attempts=5 retries
    after = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{rel}/{MARKER}")["Body"].read()
    assert after == marker_before
    assert not [k for k in list_keys(client, bucket) if "/_staging/" in k]


def partition_dir_rel(asset: str, date: str) -> str:
    from pathlib import Path

    return partition_dir(Path(), asset, REGION, date).as_posix()


def _keys(creds: dict[str, str]) -> dict[str, str]:
    return {"access_key": creds["GEOFM_TEST_KEY_ID"], "secret_key": creds["GEOFM_TEST_SECRET"]}
