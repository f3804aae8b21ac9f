"""The data lake: hive-style partition folders ``{root}/{asset}/region={r}/date={d}/`` that
DuckDB and pyarrow read directly, written atomically."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource

SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PartitionKeyError(ValueError):
    """A partition key that is not a valid region/date (or would escape the lake)."""


def checked_segment(kind: str, value: str) -> str:
    if not SAFE_SEGMENT.match(value) or ".." in value:
        raise PartitionKeyError(
            f"{kind} {value!r} is not a valid partition key segment: use letters, digits, "
            "'-', '_' and '.', with no path separators"
        )
    return value


def checked_date(value: str) -> dt.date:
    try:
        parsed = dt.date.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.isoformat() != value:
        raise PartitionKeyError(f"date {value!r} is not a YYYY-MM-DD partition key")
    return parsed


class LakeResource(ConfigurableResource):
    """Where assets read and write their partitions."""

    @abstractmethod
    def uri(self, *parts: str) -> str:
        """The URI of a lake path (for metadata and for readers such as DuckDB)."""

    @abstractmethod
    def partition_dir(self, asset: str, region: str, date: str) -> Path:
        """A local directory holding the committed partition (may not exist)."""

    @abstractmethod
    @contextmanager
    def write_partition(self, asset: str, region: str, date: str) -> Iterator[Path]:
        """Yield an empty staging directory; on success it replaces the partition whole, on
        error it is removed and the previous partition stays as it was."""


class LocalLakeResource(LakeResource):
    """The embedded default: a directory (``dagster_home/lake``)."""

    root: str

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def uri(self, *parts: str) -> str:
        return str(self.root_path.joinpath(*parts))

    def partition_dir(self, asset: str, region: str, date: str) -> Path:
        checked_date(date)
        return (
            self.root_path
            / checked_segment("asset", asset)
            / f"region={checked_segment('region', region)}"
            / f"date={checked_segment('date', date)}"
        )

    @contextmanager
    def write_partition(self, asset: str, region: str, date: str) -> Iterator[Path]:
        final = self.partition_dir(asset, region, date)
        final.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        staging = final.parent / f".staging-{final.name}-{token}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replaced = final.parent / f".replaced-{final.name}-{token}"
        if final.exists():
            os.rename(final, replaced)
        os.rename(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
