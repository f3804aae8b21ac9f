"""The data lake resource: where assets read and write their partitions."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource

from geofm_assets import lake


class LakeResource(ConfigurableResource):
    """Hive-style partitions ``{root}/{asset}/region={r}/date={d}/``, written atomically."""

    @abstractmethod
    def uri(self, *parts: str) -> str:
        """The URI of a lake path (for metadata, workers, and readers such as DuckDB)."""

    @abstractmethod
    def local_path(self, *parts: str) -> Path:
        """The local path of lake path ``parts`` (for the S3 lake: its cached copy, present once
        its partition was read or written through this resource)."""

    @abstractmethod
    def partition_dir(self, asset: str, region: str, date: str) -> Path:
        """A local directory holding the committed partition (may not exist)."""

    @abstractmethod
    @contextmanager
    def write_partition(self, asset: str, region: str, date: str) -> Iterator[Path]:
        """Yield an empty staging directory; on success it replaces the partition whole, on
        error it is removed and the previous partition stays as it was."""

    @abstractmethod
    def region_dir(self, asset: str, region: str) -> Path:
        """A local directory holding a region-level asset's committed files (may not exist)."""

    @abstractmethod
    @contextmanager
    def write_region(self, asset: str, region: str) -> Iterator[Path]:
        """``write_partition`` for a region-level asset (all of a region's dates)."""


class LocalLakeResource(LakeResource):
    """The embedded default: a directory (``dagster_home/lake``)."""

    root: str

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def uri(self, *parts: str) -> str:
        return str(self.root_path.joinpath(*parts))

    def local_path(self, *parts: str) -> Path:
        return self.root_path.joinpath(*parts)

    def partition_dir(self, asset: str, region: str, date: str) -> Path:
        return lake.partition_dir(self.root_path, asset, region, date)

    @contextmanager
    def write_partition(self, asset: str, region: str, date: str) -> Iterator[Path]:
        with lake.write_partition(self.root_path, asset, region, date) as staging:
            yield staging

    def region_dir(self, asset: str, region: str) -> Path:
        return lake.region_dir(self.root_path, asset, region)

    @contextmanager
    def write_region(self, asset: str, region: str) -> Iterator[Path]:
        with lake.write_region(self.root_path, asset, region) as staging:
            yield staging
