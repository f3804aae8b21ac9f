"""The data lake in an S3 bucket (or any S3-compatible server), with no Dagster imports: the
embedding worker can use it too.

The layout is ``geofm_assets.lake``'s, under ``s3://{bucket}/{prefix}/``:
``{asset}/region={r}/date={d}/...`` and ``{asset}/region={r}/...``, so DuckDB and pyarrow read
the same hive globs (``SQL_VIEWS``) there as on disk.

How a partition folder ``D`` is published (``S3Lake.commit``):

1. Every file of the local staging folder is uploaded, with one PUT each, under
   ``_staging/{token}/D/`` — outside every asset's folder, so no reader ever sees it. A PUT that
   is throttled (``SlowDown``, 503) or fails (5xx, a dropped connection) is retried by botocore
   with exponential backoff (the client's retry configuration: dagster-aws builds its S3 client
   with ``mode="standard"`` and ``max_attempts``). If a file still cannot be uploaded, the staged
   objects are deleted and the partition is exactly as it was: nothing of the new version shows.
2. The partition's ``_SUCCESS`` marker is deleted, each staged object is copied server-side to
   its final key (CopyObject: each object appears whole, never partly written), the new
   ``_SUCCESS`` — a JSON manifest of the version's files, sizes and ETags — is written last,
   then the previous version's objects that the new one does not have, and the staged copies,
   are deleted.

A partition is complete when its ``_SUCCESS`` exists, and readers take only the files it lists
(``S3Lake.fetch`` into a local cache, ``S3Lake.fetch_committed`` for every partition of an asset,
``s3_lake_connection`` for DuckDB).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from geofm_assets.lake import SQL_VIEWS, swap_directory

MARKER = "_SUCCESS"
STAGING_FOLDER = "_staging"
# The copy of a partition's manifest kept in its local cache folder.
CACHE_MANIFEST = ".s3-manifest.json"
# S3's limit for one PUT (and one CopyObject).
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
MANIFEST_FORMAT = "geofm-s3-partition/1"
# The cached manifest's list of the files a partial fetch downloaded (absent: all of them).
CACHED_FILES = "cached_files"
# Partitions fetched at once by ``fetch_committed`` (S3 latency, not bandwidth, bounds small files).
FETCH_THREADS = 8


class S3LakeError(RuntimeError):
    """A partition that could not be published to, or read from, the S3 lake."""


def describe_error(exc: BaseException) -> str:
    """The S3 error code, HTTP status and message of ``exc`` (never request headers or keys)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
        tried = f", {attempts + 1} attempts" if attempts is not None else ""
        return f"{err.get('Code', 'unknown error')} (HTTP {status}{tried}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def checked_relative(rel: str) -> str:
    """A lake-relative folder such as ``chips/region=jamari/date=2021-06-01``."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or path.parts[0] == STAGING_FOLDER:
        raise S3LakeError(f"{rel!r} is not a lake folder: give {{asset}}/region={{r}}[/date={{d}}]")
    return path.as_posix()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise S3LakeError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


class S3Lake:
    """Partitions of the lake at ``s3://{bucket}/{prefix}`` through a boto3 S3 ``client``;
    ``cache_root`` holds local copies of the partitions read or written (same layout)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        cache_root: str | Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise S3LakeError(f"S3 bucket name {bucket!r} is not valid: give the bare bucket name")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_root = Path(cache_root)
        self.endpoint_url = endpoint_url
        self.region = region
        self.log = log or (lambda _message: None)

    @classmethod
    def from_uri(cls, uri: str, client: Any, *, cache_root: str | Path, **kwargs: Any) -> S3Lake:
        bucket, prefix = parse_s3_uri(uri)
        return cls(client, bucket, prefix, cache_root=cache_root, **kwargs)

    # -- names ---------------------------------------------------------------------------------

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri(self, *parts: str) -> str:
        base = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return "/".join([base.rstrip("/"), *parts]) if parts else base

    def local_path(self, *parts: str) -> Path:
        """Where the local cache keeps lake path ``parts`` (valid once its partition was fetched)."""
        return self.cache_root.joinpath(*parts)

    # -- reading -------------------------------------------------------------------------------

    def manifest(self, rel: str) -> dict[str, Any] | None:
        """The ``_SUCCESS`` manifest of the committed folder ``rel``, or None when there is none."""
        rel = checked_relative(rel)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(f"{rel}/{MARKER}"))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise S3LakeError(f"cannot read {self.uri(rel, MARKER)}: {describe_error(exc)}") from exc
        except BotoCoreError as exc:
            raise S3LakeError(f"cannot read {self.uri(rel, MARKER)}: {describe_error(exc)}") from exc
        try:
            doc = json.loads(body)
        except json.JSONDecodeError as exc:
            raise S3LakeError(f"{self.uri(rel, MARKER)} is not a partition manifest: {exc}") from exc
        if doc.get("format") != MANIFEST_FORMAT:
            raise S3LakeError(f"{self.uri(rel, MARKER)} is not a {MANIFEST_FORMAT} manifest")
        return doc

    def fetch(self, rel: str, files: Sequence[str] | None = None) -> Path:
        """A local folder holding the committed version of ``rel`` (downloaded when the cache
        holds another version); a path that does not exist when ``rel`` was never committed.

        ``files``: ``fnmatch`` patterns of the file names (paths inside the partition, e.g.
        ``chips.parquet`` or ``datacubes/*``) to download; the other files of the version are
        left out (a later fetch that needs them adds them). Default: every file."""
        rel = checked_relative(rel)
        local = self.local_path(rel)
        remote = self.manifest(rel)
        if remote is None:
            if local.exists():
                shutil.rmtree(local)
            return local
        wanted = sorted(n for n in remote["files"] if files is None or matches_any(n, files))
        cached = read_cached_manifest(local)
        if cached is not None and cached.get("version") == remote["version"]:
            missing = [n for n in wanted if n not in cached_file_names(cached)]
            if missing:
                self._add_files(rel, local, remote, cached, missing)
            return local
        with swap_directory(local) as staging:
            for name in wanted:
                self._download(rel, name, remote["files"][name], staging / name)
            partial = len(wanted) < len(remote["files"])
            write_cached_manifest(staging, {**remote, CACHED_FILES: wanted} if partial else remote)
        self.log(f"fetched {self.uri(rel)} version {remote['version']} "
                 f"({len(wanted)} of {len(remote['files'])} files)")
        return local

    def _add_files(
        self, rel: str, local: Path, remote: dict[str, Any], cached: dict[str, Any], names: list[str]
    ) -> None:
        """Download ``names`` of the version already cached (partly) in ``local``: each file
        appears whole (written beside it, then renamed), the cached manifest is updated last."""
        token = uuid.uuid4().hex[:12]
        for name in names:
            dest = local / name
            part = dest.with_name(f".{dest.name}.part-{token}")
            try:
                self._download(rel, name, remote["files"][name], part)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
        have = sorted(cached_file_names(cached) | set(names))
        complete = set(have) >= set(remote["files"])
        doc = remote if complete else {**remote, CACHED_FILES: have}
        tmp = local / f".{CACHE_MANIFEST}.{token}"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, local / CACHE_MANIFEST)
        self.log(f"fetched {len(names)} more files of {self.uri(rel)} version {remote['version']}")

    def committed(self, rel: str) -> list[str]:
        """The committed partitions at or under the lake folder ``rel`` (lake-relative, sorted):
        the folders with a ``_SUCCESS`` marker, less those inside another such folder (a file of
        that partition may be named ``_SUCCESS``). A partition being written (its marker is
        deleted first and written last) or abandoned mid-write is not listed."""
        rel = checked_relative(rel)
        base = self.key(rel)
        try:
            keys = self._list(base + "/")
        except (ClientError, BotoCoreError) as exc:
            raise S3LakeError(f"cannot list {self.uri(rel)}: {describe_error(exc)}") from exc
        if f"{base}/{MARKER}" in keys:
            return [rel]  # rel is one partition: markers below it are files of it
        start = len(self.prefix) + 1 if self.prefix else 0
        return outermost(key[start : -len(MARKER) - 1] for key in keys if PurePosixPath(key).name == MARKER)

    def fetch_committed(
        self, rel: str, files: Sequence[str] | None = None, threads: int = FETCH_THREADS
    ) -> list[str]:
        """Fetch every committed partition at or under the lake folder ``rel`` (``committed``)
        into the cache (``files`` as for ``fetch``), and drop the cached copies of partitions
        under it that are no longer committed, so that the cache under ``local_path(rel)`` holds
        committed versions only. The partitions fetched, lake-relative and sorted."""
        rel = checked_relative(rel)
        listed = self.committed(rel)
        stale = [c for c in self.cached(rel) if c not in listed and not inside_any(c, listed)]
        todo = listed + stale  # a stale copy is fetched again: dropped unless committed since
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            present = list(pool.map(lambda r: self.fetch(r, files).exists(), todo))
        return sorted(r for r, ok in zip(todo, present, strict=True) if ok)

    def cached(self, rel: str) -> list[str]:
        """The partitions at or under ``rel`` that the local cache holds a copy of (folders
        with the cached manifest; never the hidden staging folders of writes in progress)."""
        rel = checked_relative(rel)
        root = self.local_path(rel)
        if not root.is_dir():
            return []
        found = []
        for manifest in root.rglob(CACHE_MANIFEST):
            folder = manifest.parent.relative_to(self.cache_root)
            if not any(part.startswith(".") for part in folder.parts):
                found.append(folder.as_posix())
        return outermost(found)

    def _download(self, rel: str, name: str, info: dict[str, Any], dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        key = self.key(f"{rel}/{name}")
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            if response["ETag"] != info["etag"]:
                raise S3LakeError(
                    f"{self.uri(rel, name)} changed while it was read (another write of {rel} is "
                    "in progress?): read the partition again"
                )
            with dest.open("wb") as out:
                shutil.copyfileobj(response["Body"], out, length=1 << 20)
        except (ClientError, BotoCoreError) as exc:
            raise S3LakeError(f"cannot download {self.uri(rel, name)}: {describe_error(exc)}") from exc
        if dest.stat().st_size != info["size"]:
            raise S3LakeError(
                f"{self.uri(rel, name)} has {dest.stat().st_size} bytes, its manifest says {info['size']}"
            )

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def write(self, rel: str) -> Iterator[Path]:
        """Yield an empty local staging folder; on success its files are published as the new
        version of ``rel`` (see the module docstring) and become the cached copy, on error
        nothing is uploaded and the previous version stays as it was."""
        rel = checked_relative(rel)
        with swap_directory(self.local_path(rel)) as staging:
            yield staging
            manifest = self.commit(staging, rel)
            write_cached_manifest(staging, manifest)

    def commit(self, local_dir: Path, rel: str) -> dict[str, Any]:
        """Publish the files under ``local_dir`` as the new version of the lake folder ``rel``;
        the new ``_SUCCESS`` manifest."""
        rel = checked_relative(rel)
        files = publishable_files(Path(local_dir))
        version = uuid.uuid4().hex
        stage = f"{STAGING_FOLDER}/{version}/{rel}"
        staged: list[str] = []
        for name, path in files:
            try:
                self._put_file(path, self.key(f"{stage}/{name}"))
            except (ClientError, BotoCoreError) as exc:
                self._delete_keys(self.key(f"{stage}/{n}") for n in staged)
                raise S3LakeError(
                    f"uploading {name} to {self.uri(rel)} failed after the S3 client's retries "
                    f"({describe_error(exc)}); nothing of this version was published and the "
                    "previous version of the partition is unchanged"
                ) from exc
            staged.append(name)

        marker = self.key(f"{rel}/{MARKER}")
        previous = self._list(self.key(rel) + "/")
        entries: dict[str, dict[str, Any]] = {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=marker)
            for name, path in files:
                copied = self.client.copy_object(
                    Bucket=self.bucket, Key=self.key(f"{rel}/{name}"),
                    CopySource={"Bucket": self.bucket, "Key": self.key(f"{stage}/{name}")},
                )
                entries[name] = {"size": path.stat().st_size, "etag": copied["CopyObjectResult"]["ETag"]}
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": version,
                "written_at": dt.datetime.now(dt.UTC).isoformat(),
                "files": entries,
            }
            self.client.put_object(
                Bucket=self.bucket, Key=marker, Body=json.dumps(manifest, indent=1).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            self._delete_keys(self.key(f"{stage}/{n}") for n in staged)
            raise S3LakeError(
                f"publishing {self.uri(rel)} failed after all its files were uploaded "
                f"({describe_error(exc)}): the partition has no {MARKER} marker now, so readers "
                "treat it as missing; materialize it again"
            ) from exc

        published = {self.key(f"{rel}/{name}") for name in entries} | {marker}
        stale = [k for k in previous if k not in published]
        try:
            self._delete_keys([*stale, *(self.key(f"{stage}/{n}") for n in staged)], strict=True)
        except (ClientError, BotoCoreError, S3LakeError) as exc:
            raise S3LakeError(
                f"{self.uri(rel)} was published (version {version}) but objects of its previous "
                f"version could not be deleted ({exc}); its {MARKER} manifest lists the current files"
            ) from exc
        size = sum(e["size"] for e in entries.values())
        self.log(
            f"published {self.uri(rel)} version {version}: {len(entries)} files, {size / 1e6:.2f} MB"
            + (f", {len(stale)} stale objects deleted" if stale else "")
        )
        return manifest

    def _put_file(self, path: Path, key: str) -> None:
        size = path.stat().st_size
        if size > MAX_SINGLE_PUT_BYTES:
            raise S3LakeError(
                f"{path.name} has {size} bytes, over S3's {MAX_SINGLE_PUT_BYTES} byte single-PUT limit: "
                "write it as several files"
            )
        with path.open("rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size)

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def _delete_keys(self, keys: Iterable[str], *, strict: bool = False) -> None:
        """Delete ``keys`` (1000 a request). ``strict``: raise on any failure; otherwise this is
        the clean-up of a failed write, whose own error is the one that matters, and a failure
        here leaves only objects under ``_staging/``, which no reader looks at."""
        todo = list(keys)
        for start in range(0, len(todo), 1000):
            batch = [{"Key": k} for k in todo[start : start + 1000]]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError):
                if strict:
                    raise
                self.log(f"could not delete {len(batch)} staged objects under {self.uri(STAGING_FOLDER)}")
                continue
            errors = response.get("Errors", [])
            if errors and strict:
                raise S3LakeError(f"{len(errors)} objects not deleted, first: {errors[0]}")


def publishable_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(lake-relative name, path) of every file under ``local_dir``, sorted."""
    if not local_dir.is_dir():
        raise S3LakeError(f"{local_dir} is not a folder: nothing to publish")
    out: list[tuple[str, Path]] = []
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(local_dir).as_posix()
        if name == CACHE_MANIFEST:
            continue
        if name == MARKER:
            raise S3LakeError(f"{path}: {MARKER} is the lake's own completion marker; rename that file")
        out.append((name, path))
    return out


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inside_any(folder: str, parents: Iterable[str]) -> bool:
    return any(folder.startswith(p + "/") for p in parents)


def outermost(folders: Iterable[str]) -> list[str]:
    """The ``folders`` that are not inside another of them, sorted."""
    given = set(folders)
    return sorted(
        f for f in given
        if not any(PurePosixPath(*PurePosixPath(f).parts[:n]).as_posix() in given
                   for n in range(1, len(PurePosixPath(f).parts)))
    )


def cached_file_names(cached: dict[str, Any]) -> set[str]:
    """The files of a cached partition's version present in the cache."""
    names = cached.get(CACHED_FILES)
    return set(cached.get("files", {}) if names is None else names)


def read_cached_manifest(local: Path) -> dict[str, Any] | None:
    path = local / CACHE_MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_cached_manifest(local: Path, manifest: dict[str, Any]) -> None:
    (local / CACHE_MANIFEST).write_text(json.dumps(manifest))


def s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5) -> Any:
    """A boto3 S3 client with the retry behaviour of dagster-aws's ``S3Resource`` (botocore's
    "standard" mode: exponential backoff with jitter on throttling, 5xx and connection errors,
    ``max_attempts`` retries), for code outside Dagster such as the embedding worker.
    Credentials come from the AWS default chain (environment, profile, ECS task role)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None,
        config=Config(retries={"mode": "standard", "max_attempts": max_attempts}),
    )


# -- reading the lake with pyarrow and DuckDB ------------------------------------------------------


def arrow_filesystem(
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
):  # -> pyarrow.fs.S3FileSystem
    """A pyarrow S3 filesystem for the lake's server. Credentials: the arguments when given,
    else the AWS default chain (environment, profile, ECS task role)."""
    from pyarrow import fs

    kwargs: dict[str, Any] = {}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if not parsed.scheme or not parsed.netloc:
            raise S3LakeError(f"S3 endpoint {endpoint_url!r} is not a URL such as http://127.0.0.1:9000")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if region:
        kwargs["region"] = region
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    return fs.S3FileSystem(**kwargs)


def committed_table_files(filesystem: Any, bucket: str, prefix: str) -> dict[str, list[str]]:
    """For each view of ``SQL_VIEWS``: the Parquet files (``bucket/key`` paths) of committed
    partitions (those whose folder has a ``_SUCCESS`` marker) under ``s3://bucket/prefix``."""
    from pyarrow import fs

    base = f"{bucket}/{prefix}".rstrip("/")
    out: dict[str, list[str]] = {}
    for view, pattern in SQL_VIEWS:
        asset = pattern.split("/", 1)[0]
        selector = fs.FileSelector(f"{base}/{asset}", recursive=True, allow_not_found=True)
        infos = filesystem.get_file_info(selector)
        paths = {i.path for i in infos if i.type == fs.FileType.File}
        files = sorted(
            p for p in paths
            if PurePosixPath(p[len(base) + 1 :]).match(pattern)
            and f"{PurePosixPath(p).parent}/{MARKER}" in paths
        )
        if files:
            out[view] = files
    return out


def s3_lake_connection(filesystem: Any, bucket: str, prefix: str = ""):  # -> duckdb.DuckDBPyConnection
    """An in-memory DuckDB with a view per materialized asset table of the S3 lake, read through
    pyarrow's S3 filesystem (DuckDB's httpfs extension is not bundled with the duckdb wheel and
    is downloaded at run time, which a machine without internet cannot do)."""
    import duckdb
    import pyarrow.dataset as ds

    con = duckdb.connect()
    for view, files in committed_table_files(filesystem, bucket, prefix.strip("/")).items():
        con.register(view, ds.dataset(files, filesystem=filesystem, format="parquet"))
    return con
