"""Shared fixtures: the tiny seeded sample catalog, a temporary DAGSTER_HOME and lake."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance

from geofm_assets.geo.sample_data import SampleCatalog, generate_sample
from geofm_assets.partitions import DATE_PARTITIONS_NAME
from geofm_assets.paths import REPO_ROOT
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleCatalog:
    """The `tiny` sample (2 MGRS tiles x 6 dates), written once per test session.
    Tests must not modify it: copy it first (see ``sample_copy``)."""
    return generate_sample(tmp_path_factory.mktemp("sample") / "sample", size="tiny", seed=0)


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GEOFM_LAKE_ROOT", str(home / "lake"))
    return home


@pytest.fixture
def instance(tiny_sample: SampleCatalog) -> DagsterInstance:
    inst = DagsterInstance.ephemeral()
    inst.add_dynamic_partitions(DATE_PARTITIONS_NAME, [d.isoformat() for d in tiny_sample.dates])
    return inst


@pytest.fixture
def resources(tiny_sample: SampleCatalog, tmp_path: Path) -> dict[str, object]:
    return {
        "stac": StacResource(catalog=str(tiny_sample.catalog_path)),
        "lake": LocalLakeResource(root=str(tmp_path / "lake")),
    }


@dataclass(frozen=True)
class TinyLake:
    """The tiny sample carried through sentinel2_tiles, chips and embeddings (rcf) for every
    region x date, once per test session. Read-only: copy ``root`` before writing into it."""

    root: Path
    sample: SampleCatalog
    dates: list[str]
    regions: list[str]


@pytest.fixture(scope="session")
def tiny_lake(tiny_sample: SampleCatalog, tmp_path_factory: pytest.TempPathFactory) -> TinyLake:
    from dagster import materialize

    from geofm_assets.assets.chips import chips
    from geofm_assets.assets.tiles import sentinel2_tiles
    from geofm_assets.models import build_encoder
    from geofm_assets.partitions import REGIONS, partition_key
    from geofm_assets.workers.embed import embed_partition

    root = tmp_path_factory.mktemp("tiny_lake") / "lake"
    inst = DagsterInstance.ephemeral()
    dates = [d.isoformat() for d in tiny_sample.dates]
    inst.add_dynamic_partitions(DATE_PARTITIONS_NAME, dates)
    res = {"stac": StacResource(catalog=str(tiny_sample.catalog_path)),
           "lake": LocalLakeResource(root=str(root))}
    encoder = build_encoder("rcf")
    regions = sorted(REGIONS)
    for region in regions:
        for date in dates:
            result = materialize([sentinel2_tiles, chips], instance=inst, resources=res,
                                 partition_key=str(partition_key(date, region)))
            assert result.success, f"tiles/chips failed for {date}|{region}"
            embed_partition(root, region, date, encoder, batch_size=8, log=lambda _m: None)
    return TinyLake(root, tiny_sample, dates, regions)
