"""The one ``Definitions`` of geofm-assets; resources are picked per environment
(``GEOFM_ENV``, default ``local``) from one dict."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    EnvVar,
)

from geofm_assets.assets.change_maps import change_maps
from geofm_assets.assets.chips import chips
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.freshness import freshness_checks
from geofm_assets.assets.heads import HEAD_ASSETS
from geofm_assets.assets.projections import embedding_projections
from geofm_assets.assets.similarity import similarity_metrics
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.assets.vector_index import vector_index
from geofm_assets.paths import lake_root, stac_catalog
from geofm_assets.resources.aws import aws_resources
from geofm_assets.resources.encoder import EncoderResource, SubprocessEmbeddingLauncher
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource
from geofm_assets.resources.vector_store import VectorStoreResource
from geofm_assets.sensors import scene_sensor


def local_resources() -> dict[str, Any]:
    """One machine: the sample (or any static) STAC catalog, a lake directory, and the
    embedding worker as a local Pipes subprocess (rcf unless GEOFM_ENCODER says otherwise)."""
    return {
        "stac": StacResource(catalog=stac_catalog()),
        "lake": LocalLakeResource(root=lake_root()),
        "encoder": EncoderResource(
            model=os.environ.get("GEOFM_ENCODER", "rcf"),
            checkpoint=os.environ.get("GEOFM_CHECKPOINT") or None,
        ),
        "embedding_launcher": SubprocessEmbeddingLauncher(),
        "vector_store": vector_store_from_env(),
    }


def vector_store_from_env() -> VectorStoreResource:
    """FAISS files in the lake unless GEOFM_VECTOR_STORE=opensearch (then GEOFM_OPENSEARCH_URL,
    and credentials only from GEOFM_OPENSEARCH_USERNAME/PASSWORD or AWS SigV4)."""
    if os.environ.get("GEOFM_VECTOR_STORE", "faiss") != "opensearch":
        return VectorStoreResource(kind="faiss", root=os.path.join(lake_root(), "vector_index"))
    auth: dict[str, Any] = {}
    if os.environ.get("GEOFM_OPENSEARCH_USERNAME"):
        auth = {"username": EnvVar("GEOFM_OPENSEARCH_USERNAME"),
                "password": EnvVar("GEOFM_OPENSEARCH_PASSWORD")}
    return VectorStoreResource(
        kind="opensearch", url=os.environ.get("GEOFM_OPENSEARCH_URL"),
        aws_region=os.environ.get("GEOFM_OPENSEARCH_AWS_REGION"), **auth,
    )


RESOURCES_BY_ENV: Mapping[str, Callable[[], dict[str, Any]]] = {
    "local": local_resources,
    "aws": aws_resources,
}


def resources_for(env: str) -> dict[str, Any]:
    """The resources of environment ``env``, read from the environment variables now."""
    try:
        return RESOURCES_BY_ENV[env]()
    except KeyError:
        raise ValueError(
            f"GEOFM_ENV={env!r} is not a known environment; choose one of "
            f"{', '.join(sorted(RESOURCES_BY_ENV))}"
        ) from None


ASSETS = [
    sentinel2_tiles, chips, embeddings, vector_index,
    embedding_projections, similarity_metrics, change_maps,
    *HEAD_ASSETS,
]

# Declarative automation (embeddings and the index after chips, region-level assets after any new
# date of their region) evaluated by the daemon every 30 s; on from the start, so scenes the
# sensor brings in flow through the whole graph.
automation_sensor = AutomationConditionSensorDefinition(
    "geofm_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes what the assets' automation conditions ask for.",
)

defs = Definitions(
    assets=ASSETS,
    asset_checks=freshness_checks,
    sensors=[scene_sensor, automation_sensor],
    resources=resources_for(os.environ.get("GEOFM_ENV", "local")),
)
