"""Shared fixtures: the tiny seeded sample catalog, a temporary DAGSTER_HOME and lake."""

from __future__ import annotations

import shutil
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
