"""The data lake in S3 (production): dagster-aws's ``S3Resource`` for the client, the commit
protocol of ``geofm_assets.lake_s3`` (stage, single PUTs, ``_SUCCESS`` manifest last)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import get_dagster_logger
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from geofm_assets import lake
from geofm_assets.lake_s3 import S3Lake, arrow_filesystem, s3_lake_connection
from geofm_assets.resources.lake import LakeResource, readable_scope


class S3LakeResource(LakeResource):
    """Partitions under ``s3://{bucket}/{prefix}/`` in the hive layout of the local lake.

    Writes go to a local staging folder and are published whole when the asset's block ends
    (nothing on error); reads download the committed partition into ``cache_dir`` once per
    version and return that folder, so assets read local files as they do with the local lake.
    Credentials are never configuration here: ``s3`` takes them from the AWS default chain (the
    ECS task role, or ``AWS_*`` environment variables) or from ``EnvVar``s.
    """

    s3: S3Resource
    bucket: str = Field(description="bucket name, without s3://")
    prefix: str = Field(default="", description="key prefix of the lake, e.g. geofm/lake")
    cache_dir: str | None = Field(
        default=None,
        description="local copies of the partitions read or written (default: a folder in the temp dir)",
    )

    _lake: S3Lake | None = PrivateAttr(default=None)

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        parts = [self.bucket, *[p for p in self.prefix.split("/") if p]]
        return Path(tempfile.gettempdir(), "geofm-s3-lake", *parts)

    def store(self) -> S3Lake:
        """The Dagster-free lake (one S3 client per resource instance)."""
        if self._lake is None:
            self._lake = S3Lake(
                self.s3.get_client(), self.bucket, self.prefix, cache_root=self.cache_root(),
                endpoint_url=self.s3.endpoint_url, region=self.s3.region_name,
                log=get_dagster_logger().info,
            )
        return self._lake

    def uri(self, *parts: str) -> str:
        return self.store().uri(*parts)

    def local_path(self, *parts: str) -> Path:
        """The cached local copy of lake path ``parts`` (present once its partition was read
        or written through this resource)."""
        return self.store().local_path(*parts)

    def partition_dir(self, asset: str, region: str, date: str) -> Path:
        return self.store().fetch(lake.partition_dir(Path(), asset, region, date).as_posix())

    @contextmanager
    def write_partition(self, asset: str, region: str, date: str) -> Iterator[Path]:
        with self.store().write(lake.partition_dir(Path(), asset, region, date).as_posix()) as staging:
            yield staging

    def region_dir(self, asset: str, region: str) -> Path:
        return self.store().fetch(lake.region_dir(Path(), asset, region).as_posix())

    @contextmanager
    def write_region(self, asset: str, region: str) -> Iterator[Path]:
        with self.store().write(lake.region_dir(Path(), asset, region).as_posix()) as staging:
            yield staging

    def readable_root(
        self,
        assets: Sequence[str],
        region: str | None = None,
        date: str | None = None,
        files: Mapping[str, Sequence[str]] | None = None,
    ) -> Path:
        """The cache root, after every committed partition of ``assets`` in scope was fetched
        into it (each version downloaded once) and the cached copies of partitions no longer
        committed were dropped; partitions being written, or abandoned mid-write, are not read."""
        store = self.store()
        for asset in assets:
            scope = readable_scope(asset, region, date).as_posix()
            wanted = (files or {}).get(asset)
            if date is not None:
                store.fetch(scope, wanted)
            else:
                store.fetch_committed(scope, wanted)
        return store.cache_root

    def asset_dir(self, asset: str) -> Path:
        return self.store().fetch(lake.checked_segment("asset", asset))

    @contextmanager
    def write_asset(self, asset: str) -> Iterator[Path]:
        with self.store().write(lake.checked_segment("asset", asset)) as staging:
            yield staging

    def arrow_filesystem(self):  # -> pyarrow.fs.S3FileSystem
        """pyarrow's S3 filesystem for this lake (credentials as for ``s3``)."""
        return arrow_filesystem(
            self.s3.endpoint_url, self.s3.region_name,
            self.s3.aws_access_key_id, self.s3.aws_secret_access_key, self.s3.aws_session_token,
        )

    def sql(self) -> Any:  # -> duckdb.DuckDBPyConnection
        """DuckDB with a view per materialized asset table (committed partitions only)."""
        return s3_lake_connection(self.arrow_filesystem(), self.bucket, self.prefix)
