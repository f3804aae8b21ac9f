"""The data lake resource: where assets read and write their partitions."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
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

    @abstractmethod
    def readable_root(
        self,
        assets: Sequence[str],
        region: str | None = None,
        date: str | None = None,
        files: Mapping[str, Sequence[str]] | None = None,
    ) -> Path:
        """A local folder under which the committed partitions of ``assets`` can be read at
        their lake paths: ``{asset}/region={r}/date={d}/...`` (and a region-level asset's
        ``{asset}/region={r}/...``), for the readers that take a lake root (``load_region_series``,
        the heads' loaders).

        Only ``region``'s partitions when given (else every region's), only ``date``'s when given
        (with ``region``). ``files``: for an asset named in it, ``fnmatch`` patterns of the files
        of each partition that the reader needs (e.g. ``{"chips": ["chips.parquet"]}``); the
        others may be missing under the root. Folders of other assets under the root are not
        kept current: read only ``assets`` there."""

    @abstractmethod
    def asset_dir(self, asset: str) -> Path:
        """A local directory holding an unpartitioned asset's committed files, such as a trained
        head (may not exist)."""

    @abstractmethod
    @contextmanager
    def write_asset(self, asset: str) -> Iterator[Path]:
        """``write_partition`` for an unpartitioned asset: its whole folder ``{asset}``."""


def readable_scope(asset: str, region: str | None, date: str | None) -> Path:
    """The lake-relative folder of ``asset`` that ``readable_root`` covers."""
    if date is not None:
        if region is None:
            raise ValueError(f"reading {asset} on {date}: name the region as well as the date")
        return lake.partition_dir(Path(), asset, region, date)
    if region is not None:
        return lake.region_dir(Path(), asset, region)
    return Path(lake.checked_segment("asset", asset))


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

    def readable_root(
        self,
        assets: Sequence[str],
        region: str | None = None,
        date: str | None = None,
        files: Mapping[str, Sequence[str]] | None = None,
    ) -> Path:
        """The lake root itself: its partitions are committed by their final rename."""
        for asset in assets:
            readable_scope(asset, region, date)  # the same key checks as the S3 lake
        return self.root_path

    def asset_dir(self, asset: str) -> Path:
        return self.root_path / lake.checked_segment("asset", asset)

    @contextmanager
    def write_asset(self, asset: str) -> Iterator[Path]:
        with lake.swap_directory(self.asset_dir(asset)) as staging:
            yield staging
