"""Where things live on one machine by default; each is overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from geofm_assets.geo.regions import DEFAULT_REGIONS_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, else the repository's ``dagster_home/``."""
    return Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / "dagster_home").resolve()


def lake_root() -> str:
    """``$GEOFM_LAKE_ROOT``, else ``$DAGSTER_HOME/lake``."""
    return os.environ.get("GEOFM_LAKE_ROOT") or str(dagster_home() / "lake")


def sample_dir() -> Path:
    """Where ``geofm sample-data`` writes by default: ``$DAGSTER_HOME/sample``."""
    return dagster_home() / "sample"


def stac_catalog() -> str:
    """``$GEOFM_STAC_CATALOG`` (a catalog.json path or a STAC API URL), else the sample's."""
    return os.environ.get("GEOFM_STAC_CATALOG") or str(sample_dir() / "catalog.json")


def regions_file() -> Path:
    """``$GEOFM_REGIONS_FILE``, else the sample regions shipped with the package."""
    return Path(os.environ.get("GEOFM_REGIONS_FILE") or DEFAULT_REGIONS_FILE)
