"""The S3 lake's commit protocol against a real S3-compatible server (moto, loopback)."""

from __future__ import annotations

import json

import pytest
from s3_helpers import PutFaults, list_keys

from geofm_assets.lake_s3 import MARKER, S3LakeError, checked_relative, parse_s3_uri

REL = "chips/region=jamari/date=2021-06-01"


def write_version(lake, files: dict[str, str]) -> dict:
    with lake.write(REL) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
    manifest = lake.manifest(REL)
    assert manifest is not None
    return manifest


def read_object(lake, rel_name: str) -> str:
    return lake.client.get_object(Bucket=lake.bucket, Key=lake.key(rel_name))["Body"].read().decode()


def test_a_new_version_replaces_the_partition_whole(make_lake):
    lake = make_lake()
    first = write_version(lake, {"a.txt": "one", "datacubes/c1.nc": "cube 1"})
    second = write_version(lake, {"a.txt": "one, again", "b.txt": "two"})

    assert second["version"] != first["version"]
    assert sorted(second["files"]) == ["a.txt", "b.txt"]
    # the previous version's datacube is gone, the marker is there, nothing is left staged
    assert list_keys(lake.client, lake.bucket) == [
        f"geofm/lake/{REL}/{MARKER}", f"geofm/lake/{REL}/a.txt", f"geofm/lake/{REL}/b.txt",
    ]
    assert read_object(lake, f"{REL}/a.txt") == "one, again"
    assert lake.uri(REL) == f"s3://{lake.bucket}/geofm/lake/{REL}"


def test_fetch_downloads_each_version_once(make_lake, tmp_path):
    writer = make_lake()
    write_version(writer, {"a.txt": "one", "sub/b.txt": "two"})
    reader = make_lake(cache_root=tmp_path / "reader")

    local = reader.fetch(REL)
    assert local == tmp_path / "reader" / REL
    assert (local / "a.txt").read_text() == "one" and (local / "sub" / "b.txt").read_text() == "two"
    (local / "a.txt").write_text("edited locally")
    assert (reader.fetch(REL) / "a.txt").read_text() == "edited locally"  # same version: cached

    write_version(writer, {"a.txt": "three"})
    local = reader.fetch(REL)
    assert (local / "a.txt").read_text() == "three"
    assert not (local / "sub").exists()


def test_a_partition_never_committed_reads_as_missing(make_lake):
    lake = make_lake()
    assert not lake.fetch("chips/region=jamari/date=2021-07-01").exists()
    assert lake.manifest("chips/region=jamari/date=2021-07-01") is None


def test_an_error_in_the_writer_uploads_nothing(make_lake):
    lake = make_lake()
    first = write_version(lake, {"a.txt": "one"})
    before = list_keys(lake.client, lake.bucket)
    with pytest.raises(RuntimeError, match="encoder crashed"), lake.write(REL) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("encoder crashed")
    assert list_keys(lake.client, lake.bucket) == before
    assert lake.manifest(REL) == first
    assert read_object(lake, f"{REL}/a.txt") == "one"


def test_a_throttled_put_is_retried_with_exponential_backoff(make_lake, backoff_delays):
    faults = PutFaults(match="b.txt", times=3)
    lake = make_lake(faults)
    manifest = write_version(lake, {"a.txt": "one", "b.txt": "two"})
    assert len(faults.failed) == 3
    assert backoff_delays == [1.0, 2.0, 4.0]  # SlowDown: 1 s base, doubling (jitter set to its max)
    assert sorted(manifest["files"]) == ["a.txt", "b.txt"]
    assert read_object(lake, f"{REL}/b.txt") == "two"


def test_a_put_that_keeps_failing_fails_the_partition_cleanly(make_lake, backoff_delays):
    lake = make_lake()
    first = write_version(lake, {"a.txt": "one", "b.txt": "two"})
    before = list_keys(lake.client, lake.bucket)

    faults = PutFaults(match="b.txt", times=100, status=500, code="InternalError",
                       message="We encountered an internal error. Please try again.")
    failing = make_lake(faults, max_attempts=3)
    with pytest.raises(S3LakeError) as raised:
        write_version(failing, {"a.txt": "one, new", "b.txt": "two, new"})

    message = str(raised.value)
    assert "uploading b.txt" in message and "InternalError (HTTP 500, 4 attempts)" in message
    assert "previous version of the partition is unchanged" in message
    assert len(faults.failed) == 4  # the first try and max_attempts=3 retries
    assert backoff_delays == pytest.approx([0.05, 0.1, 0.2])  # 5xx: 50 ms base, doubling
    # the previous version is intact: same objects, same bytes, same manifest; nothing staged
    assert list_keys(lake.client, lake.bucket) == before
    assert lake.manifest(REL) == first
    assert read_object(lake, f"{REL}/a.txt") == "one"
    # and the failed writer's cache holds no copy of the failed version
    assert not failing.local_path(REL).exists()


def test_a_failure_while_publishing_leaves_no_marker(make_lake):
    lake = make_lake()
    write_version(lake, {"a.txt": "one"})
    faults = PutFaults(match="a.txt", times=100, code="InternalError", status=500,
                       operation="CopyObject")
    failing = make_lake(faults, max_attempts=1)
    with pytest.raises(S3LakeError, match="no _SUCCESS marker now"):
        write_version(failing, {"a.txt": "two"})
    assert lake.manifest(REL) is None
    assert not lake.fetch(REL).exists()
    assert not [k for k in list_keys(lake.client, lake.bucket) if "/_staging/" in k]


def test_the_manifest_lists_sizes_and_etags(make_lake):
    lake = make_lake()
    manifest = write_version(lake, {"a.txt": "12345"})
    raw = json.loads(read_object(lake, f"{REL}/{MARKER}"))
    assert raw == manifest
    head = lake.client.head_object(Bucket=lake.bucket, Key=lake.key(f"{REL}/a.txt"))
    assert manifest["files"]["a.txt"] == {"size": 5, "etag": head["ETag"]}


@pytest.mark.parametrize("rel", ["", "/abs/x", "chips/../../x", "_staging/x"])
def test_folders_outside_the_lake_are_refused(rel):
    with pytest.raises(S3LakeError, match="is not a lake folder"):
        checked_relative(rel)


def test_s3_uris_are_parsed():
    assert parse_s3_uri("s3://bucket/geofm/lake/") == ("bucket", "geofm/lake")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(S3LakeError, match="not an s3://bucket/prefix URI"):
        parse_s3_uri("/local/lake")
