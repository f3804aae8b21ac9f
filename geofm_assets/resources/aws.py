"""The production resources (``GEOFM_ENV=aws``): Earth Search, the lake in S3, the embedding
worker as an ECS GPU task, OpenSearch k-NN. Everything is read from environment variables;
secrets are never read here: AWS credentials come from the task role (boto3's default chain),
OpenSearch basic-auth credentials through ``EnvVar``s."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster import EnvVar
from dagster_aws.s3 import S3Resource

from geofm_assets.resources.encoder import EcsEmbeddingLauncher, EncoderResource
from geofm_assets.resources.s3_lake import S3LakeResource
from geofm_assets.resources.stac import StacResource
from geofm_assets.resources.vector_store import VectorStoreResource

EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"

# (variable, what it is) of every variable the aws environment cannot do without
REQUIRED = (
    ("GEOFM_LAKE_BUCKET", "the S3 bucket of the data lake"),
    ("GEOFM_ECS_CLUSTER", "the ECS cluster the embedding worker runs in"),
    ("GEOFM_ECS_WORKER_TASK_DEFINITION", "the worker's task definition (deploy/ecs-worker-task.json)"),
    ("GEOFM_OPENSEARCH_URL", "the OpenSearch endpoint, e.g. https://search-geofm.us-west-2.es.amazonaws.com"),
)


class MissingSettingError(ValueError):
    """An environment variable the aws environment needs is not set."""


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def aws_resources(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The resources of ``GEOFM_ENV=aws`` from ``environ`` (default ``os.environ``).

    Required: GEOFM_LAKE_BUCKET, GEOFM_ECS_CLUSTER, GEOFM_ECS_WORKER_TASK_DEFINITION,
    GEOFM_OPENSEARCH_URL. Optional: GEOFM_LAKE_PREFIX (default ``geofm/lake``),
    GEOFM_STAC_API (default Earth Search), GEOFM_S3_ENDPOINT_URL (an S3-compatible server),
    GEOFM_S3_MAX_ATTEMPTS (retries of a throttled or failed S3 request, default 8),
    GEOFM_ECS_SUBNETS / GEOFM_ECS_SECURITY_GROUPS (comma-separated), GEOFM_ECS_CAPACITY_PROVIDER
    (a GPU capacity provider; else EC2 launch), GEOFM_ECS_WORKER_CONTAINER (default
    ``embed-worker``), AWS_REGION, GEOFM_ENCODER / GEOFM_CHECKPOINT / GEOFM_EMBED_BATCH_SIZE,
    GEOFM_OPENSEARCH_AWS_REGION (SigV4 signing; default AWS_REGION) or
    GEOFM_OPENSEARCH_USERNAME + GEOFM_OPENSEARCH_PASSWORD (basic auth, read at run time).
    """
    env = os.environ if environ is None else environ
    missing = [f"{name} ({what})" for name, what in REQUIRED if not env.get(name, "").strip()]
    if missing:
        raise MissingSettingError(
            "GEOFM_ENV=aws needs these environment variables: " + "; ".join(missing)
            + ". See deploy/README.md"
        )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    try:
        max_attempts = int(env.get("GEOFM_S3_MAX_ATTEMPTS", "8"))
        batch_size = int(env.get("GEOFM_EMBED_BATCH_SIZE", "32"))
    except ValueError as exc:
        raise MissingSettingError(
            f"GEOFM_S3_MAX_ATTEMPTS and GEOFM_EMBED_BATCH_SIZE must be whole numbers: {exc}"
        ) from None
    return {
        "stac": StacResource(catalog=env.get("GEOFM_STAC_API") or EARTH_SEARCH),
        "lake": S3LakeResource(
            s3=S3Resource(
                region_name=region, endpoint_url=env.get("GEOFM_S3_ENDPOINT_URL") or None,
                max_attempts=max_attempts,
            ),
            bucket=env["GEOFM_LAKE_BUCKET"].strip(),
            prefix=env.get("GEOFM_LAKE_PREFIX", "geofm/lake").strip("/"),
        ),
        "encoder": EncoderResource(
            model=env.get("GEOFM_ENCODER", "rcf"),
            checkpoint=env.get("GEOFM_CHECKPOINT") or None,
            device="auto",
            batch_size=batch_size,
        ),
        "embedding_launcher": EcsEmbeddingLauncher(
            cluster=env["GEOFM_ECS_CLUSTER"].strip(),
            task_definition=env["GEOFM_ECS_WORKER_TASK_DEFINITION"].strip(),
            container_name=env.get("GEOFM_ECS_WORKER_CONTAINER", "embed-worker"),
            subnets=_split(env.get("GEOFM_ECS_SUBNETS")),
            security_groups=_split(env.get("GEOFM_ECS_SECURITY_GROUPS")),
            capacity_provider=env.get("GEOFM_ECS_CAPACITY_PROVIDER") or None,
            region_name=region,
        ),
        "vector_store": opensearch_from_env(env, region),
    }


def opensearch_from_env(env: Mapping[str, str], region: str | None) -> VectorStoreResource:
    """OpenSearch k-NN: basic auth when GEOFM_OPENSEARCH_USERNAME is set (both values as
    EnvVars, read at run time), else AWS SigV4 signing with the task role."""
    if env.get("GEOFM_OPENSEARCH_USERNAME"):
        if not env.get("GEOFM_OPENSEARCH_PASSWORD"):
            raise MissingSettingError(
                "GEOFM_OPENSEARCH_USERNAME is set but GEOFM_OPENSEARCH_PASSWORD is not: set both for "
                "basic auth, or neither for AWS SigV4 signing"
            )
        return VectorStoreResource(
            kind="opensearch", url=env["GEOFM_OPENSEARCH_URL"],
            username=EnvVar("GEOFM_OPENSEARCH_USERNAME"), password=EnvVar("GEOFM_OPENSEARCH_PASSWORD"),
        )
    signing_region = env.get("GEOFM_OPENSEARCH_AWS_REGION") or region
    if not signing_region:
        raise MissingSettingError(
            "OpenSearch without basic auth is signed with AWS SigV4, which needs a region: set "
            "GEOFM_OPENSEARCH_AWS_REGION or AWS_REGION (or GEOFM_OPENSEARCH_USERNAME/PASSWORD)"
        )
    # OpenSearch Serverless collections (*.aoss.amazonaws.com) sign as "aoss", domains as "es"
    serverless = ".aoss." in env["GEOFM_OPENSEARCH_URL"]
    return VectorStoreResource(
        kind="opensearch", url=env["GEOFM_OPENSEARCH_URL"], aws_region=signing_region,
        aws_service="aoss" if serverless else "es",
    )
