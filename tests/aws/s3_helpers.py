"""Fault injection for S3 clients: S3 error responses answered by botocore's ``before-send``
event, before a request reaches the server (so retries run through botocore's real retry code)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.awsrequest import AWSResponse, HeadersDict


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(keys)


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_kwargs: Any) -> Iterator[bytes]:
        yield self.data


def s3_error_response(url: str, status: int, code: str, message: str) -> AWSResponse:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    return AWSResponse(url, status, HeadersDict({"Content-Type": "application/xml"}), _Body(body))


@dataclass
class PutFaults:
    """Answers the first ``times`` PutObject requests whose URL contains ``match`` with an S3
    error, before they reach the server (botocore's ``before-send`` event)."""

    match: str
    times: int
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    failed: list[str] = field(default_factory=list)
    operation: str = "PutObject"

    def __call__(self, request: Any, **_kwargs: Any) -> AWSResponse | None:
        if self.match in request.url and len(self.failed) < self.times:
            self.failed.append(request.url)
            return s3_error_response(request.url, self.status, self.code, self.message)
        return None

    def install(self, client: Any) -> Any:
        client.meta.events.register(f"before-send.s3.{self.operation}", self)
        return client
