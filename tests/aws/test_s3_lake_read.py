"""Reading many partitions of the S3 lake at once (moto, loopback): only committed partitions are
listed and fetched, the cache drops the copies of partitions no longer committed, and a fetch
can take some of a partition's files and add the rest later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster_aws.s3 import S3Resource
from s3_helpers import list_keys

from geofm_assets.lake_s3 import CACHE_MANIFEST, CACHED_FILES, MARKER, S3Lake, outermost
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.s3_lake import S3LakeResource

JAMARI = "embeddings/region=jamari"
JUNE = f"{JAMARI}/date=2021-06-01"
JULY = f"{JAMARI}/date=2021-07-01"
AUGUST = f"{JAMARI}/date=2021-08-01"
SEPTEMBER = f"{JAMARI}/date=2021-09-01"
CANDEIAS_JUNE = "embeddings/region=candeias/date=2021-06-01"


def publish(lake: S3Lake, rel: str, files: dict[str, str]) -> dict:
    with lake.write(rel) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
    manifest = lake.manifest(rel)
    assert manifest is not None
    return manifest


def put(lake: S3Lake, rel_name: str, text: str) -> None:
    lake.client.put_object(Bucket=lake.bucket, Key=lake.key(rel_name), Body=text.encode())


def drop_marker(lake: S3Lake, rel: str) -> None:
    """What a writer's commit does first (and what a writer killed mid-commit leaves)."""
    lake.client.delete_object(Bucket=lake.bucket, Key=lake.key(f"{rel}/{MARKER}"))


def count_downloads(lake: S3Lake) -> list[str]:
    """The object names the lake's client GETs (manifests left out)."""
    got: list[str] = []

    def record(request, **_kwargs):
        if not request.url.split("?")[0].endswith(MARKER):
            got.append(request.url.split("?")[0].rsplit("/", 1)[-1])

    lake.client.meta.events.register("before-send.s3.GetObject", record)
    return got


def test_committed_lists_the_partitions_with_a_marker_only(make_lake):
    lake = make_lake()
    for rel in (JUNE, JULY, CANDEIAS_JUNE):
        publish(lake, rel, {"embeddings.parquet": rel})
    publish(lake, SEPTEMBER, {"embeddings.parquet": "september"})
    drop_marker(lake, SEPTEMBER)  # a new version being published: no marker until it is whole
    put(lake, f"{AUGUST}/embeddings.parquet", "abandoned")  # objects of a write that never committed
    # a file of a partition may be named _SUCCESS: it does not make a partition of its folder
    nested = "chips/region=jamari/date=2021-06-01"
    publish(lake, nested, {"chips.parquet": "t", f"extra/{MARKER}": "a file, not a marker"})
    publish(lake, "similarity_metrics/region=jamari", {"similarity.parquet": "s"})

    assert lake.committed("embeddings") == [CANDEIAS_JUNE, JUNE, JULY]
    assert lake.committed(JAMARI) == [JUNE, JULY]
    assert lake.committed(AUGUST) == [] and lake.committed(SEPTEMBER) == []
    assert lake.committed(JUNE) == [JUNE]
    assert lake.committed("chips") == [nested]
    assert lake.committed("similarity_metrics") == ["similarity_metrics/region=jamari"]
    assert lake.committed("change_maps") == []


def test_outermost_keeps_folders_not_inside_another():
    assert outermost(["a/b", "a/b-c", "a/b/x", "a/bc", "d"]) == ["a/b", "a/b-c", "a/bc", "d"]
    assert outermost([]) == []


def test_fetch_committed_keeps_the_cache_to_committed_versions(make_lake, tmp_path):
    writer = make_lake()
    publish(writer, JUNE, {"embeddings.parquet": "june"})
    publish(writer, JULY, {"embeddings.parquet": "july"})
    put(writer, f"{AUGUST}/embeddings.parquet", "abandoned")
    reader = make_lake(cache_root=tmp_path / "reader")

    assert reader.fetch_committed(JAMARI) == [JUNE, JULY]
    base = tmp_path / "reader" / JAMARI
    assert sorted(p.name for p in base.iterdir()) == ["date=2021-06-01", "date=2021-07-01"]
    assert (base / "date=2021-07-01" / "embeddings.parquet").read_text() == "july"

    # July is being rewritten (its marker is gone) and June was deleted from the lake: neither
    # may be read from the cache any more
    drop_marker(writer, JULY)
    writer._delete_keys(k for k in list_keys(writer.client, writer.bucket) if "date=2021-06-01" in k)
    assert reader.fetch_committed(JAMARI) == []
    assert not any(base.glob("date=*"))

    # July's new version is committed: fetched again, whole
    publish(writer, JULY, {"embeddings.parquet": "july, again", "spatial.npy": "cells"})
    assert reader.fetch_committed("embeddings") == [JULY]
    assert (base / "date=2021-07-01" / "embeddings.parquet").read_text() == "july, again"


def test_a_stale_copy_committed_again_meanwhile_is_kept(make_lake, tmp_path, monkeypatch):
    """A cached partition the listing does not show is checked on its own before it is
    dropped: it may have been committed after the listing."""
    writer = make_lake()
    publish(writer, JUNE, {"embeddings.parquet": "june"})
    reader = make_lake(cache_root=tmp_path / "reader")
    reader.fetch(JUNE)
    monkeypatch.setattr(reader, "committed", lambda rel: [])  # listed before June's commit
    assert reader.fetch_committed(JAMARI) == [JUNE]
    assert (tmp_path / "reader" / JUNE / "embeddings.parquet").read_text() == "june"


def test_a_fetch_can_take_some_files_and_add_the_rest(make_lake, tmp_path):
    writer = make_lake()
    first = publish(writer, JUNE, {"embeddings.parquet": "table", "spatial.npy": "cells",
                                   "spatial_valid.npy": "clear"})
    reader = make_lake(cache_root=tmp_path / "reader")
    got = count_downloads(reader)
    local = reader.fetch(JUNE, ["embeddings.parquet"])
    assert sorted(p.name for p in local.iterdir()) == [CACHE_MANIFEST, "embeddings.parquet"]
    assert json.loads((local / CACHE_MANIFEST).read_text())[CACHED_FILES] == ["embeddings.parquet"]
    assert reader.fetch(JUNE, ["embeddings.parquet"]) == local and got == ["embeddings.parquet"]

    reader.fetch_committed(JAMARI, ["spatial*.npy"])  # the same version: only the new files
    assert sorted(got) == ["embeddings.parquet", "spatial.npy", "spatial_valid.npy"]
    assert (local / "spatial.npy").read_text() == "cells"
    cached = json.loads((local / CACHE_MANIFEST).read_text())
    assert CACHED_FILES not in cached and cached["version"] == first["version"]  # complete now
    assert not [p for p in local.iterdir() if p.name.startswith(".") and p.name != CACHE_MANIFEST]
    reader.fetch(JUNE)
    assert len(got) == 3  # every file cached: nothing downloaded

    publish(writer, JUNE, {"embeddings.parquet": "table 2", "spatial.npy": "cells 2"})
    reader.fetch(JUNE, ["embeddings.parquet"])  # a new version replaces the folder whole
    assert sorted(p.name for p in local.iterdir()) == [CACHE_MANIFEST, "embeddings.parquet"]
    assert (local / "embeddings.parquet").read_text() == "table 2"


def s3_lake_resource(endpoint: str, bucket: str, cache: Path) -> S3LakeResource:
    return S3LakeResource(s3=S3Resource(endpoint_url=endpoint, region_name="us-east-1"),
                          bucket=bucket, prefix="geofm/lake", cache_dir=str(cache))


def test_readable_root_of_the_s3_lake_resource(s3_endpoint, bucket, make_lake, tmp_path):
    writer = make_lake()
    publish(writer, JUNE, {"embeddings.parquet": "june", "spatial.npy": "cells"})
    publish(writer, "chips/region=jamari/date=2021-06-01", {"chips.parquet": "chips"})
    publish(writer, CANDEIAS_JUNE, {"embeddings.parquet": "candeias"})
    put(writer, f"{AUGUST}/embeddings.parquet", "abandoned")
    lake = s3_lake_resource(s3_endpoint, bucket, tmp_path / "cache")

    root = lake.readable_root(["embeddings"], "jamari", files={"embeddings": ["embeddings.parquet"]})
    assert root == tmp_path / "cache"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*")) == [
        f"{JUNE}/{CACHE_MANIFEST}", f"{JUNE}/embeddings.parquet"]  # not candeias, not August

    lake.readable_root(["embeddings", "chips"], "jamari", "2021-06-01")  # one date, every file
    assert (root / JUNE / "spatial.npy").read_text() == "cells"
    assert (root / "chips/region=jamari/date=2021-06-01/chips.parquet").read_text() == "chips"
    lake.readable_root(["embeddings"])
    assert (root / CANDEIAS_JUNE / "embeddings.parquet").read_text() == "candeias"
    with pytest.raises(ValueError, match="name the region as well as the date"):
        lake.readable_root(["embeddings"], date="2021-06-01")

    with lake.write_asset("landcover_classifier") as staging:
        (staging / "model.json").write_text("{}")
    assert f"geofm/lake/landcover_classifier/{MARKER}" in list_keys(writer.client, bucket)
    reader = s3_lake_resource(s3_endpoint, bucket, tmp_path / "cache-2")
    assert (reader.asset_dir("landcover_classifier") / "model.json").read_text() == "{}"


def test_readable_root_of_the_local_lake_is_its_root(tmp_path: Path):
    lake = LocalLakeResource(root=str(tmp_path / "lake"))
    assert lake.readable_root(["embeddings", "chips"], "jamari") == tmp_path / "lake"
    with pytest.raises(ValueError, match="not a valid partition key segment"):
        lake.readable_root(["embeddings"], "../elsewhere")
    with lake.write_asset("landcover_classifier") as staging:
        (staging / "model.json").write_text("{}")
    assert (lake.asset_dir("landcover_classifier") / "model.json").read_text() == "{}"
