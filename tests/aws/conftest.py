"""An S3-compatible server (moto's server mode) on a free loopback port, and fault injection
for its client: the production S3 code paths, run against a real HTTP server."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.retries import standard
from s3_helpers import PutFaults

from geofm_assets.lake_s3 import S3Lake

# A secret that must never show up in a log, an event or metadata.
SECRET_ACCESS_KEY = "geofm-test-secret-9f3c1a7e5b"
ACCESS_KEY_ID = "GEOFMTESTKEYID"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Credentials only in the environment (as an ECS task gets them), no config files, no
    instance-metadata lookups."""
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the server."""
    import boto3

    name = f"geofm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture
def backoff_delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff ceilings botocore's standard retry mode computes (its jitter fixed at its
    maximum, 1.0); the test sleeps a hundredth of each so it stays quick."""
    delays: list[float] = []
    original: Callable[..., float] = standard.ExponentialBackoff.delay_amount

    def recorded(self: standard.ExponentialBackoff, context: Any) -> float:
        jitter = self._random
        self._random = lambda: 1.0
        try:
            delay = original(self, context)
        finally:
            self._random = jitter
        delays.append(delay)
        return delay / 100

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", recorded)
    return delays


@pytest.fixture
def make_lake(
    s3_endpoint: str, bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., S3Lake]:
    """S3Lakes on ``bucket`` with dagster-aws's S3 client (its retry configuration)."""
    from dagster_aws.s3 import S3Resource

    def make(
        faults: PutFaults | None = None, cache_root: Path | None = None, max_attempts: int = 5
    ) -> S3Lake:
        s3 = S3Resource(endpoint_url=s3_endpoint, region_name=REGION, max_attempts=max_attempts)
        client = s3.get_client()
        if faults is not None:
            faults.install(client)
        return S3Lake(client, bucket, "geofm/lake", cache_root=cache_root or tmp_path_factory.mktemp("cache"),
                      endpoint_url=s3_endpoint, region=REGION)

    return make
