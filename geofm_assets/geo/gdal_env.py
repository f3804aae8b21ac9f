"""GDAL settings for reading scene COGs, locally or over the network (HTTP(S), S3).

A Cloud-Optimized GeoTIFF is read with a handful of HTTP range requests: the header, then the
internal tiles a window needs. GDAL's defaults suit neither that nor a flaky network: on open it
lists the "directory" a URL sits in (one useless request per file, thousands of keys for an S3
prefix), it fetches each tile with its own request, and it does not retry a 503. The options
below are the ones the COG and GDAL network guides recommend, in one place:

``REMOTE_COG_OPTIONS`` (every key is a GDAL configuration option):

* ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` - no directory listing on open: a scene's band
  COGs carry no sidecar files (.aux.xml, .ovr, .msk) worth looking for.
* ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS=.tif,.tiff`` - /vsicurl/ touches nothing but GeoTIFFs
  (no probing for sidecars by name either).
* ``GDAL_INGESTED_BYTES_AT_OPEN=32768`` - the first request reads 32 KiB, enough for the
  header and tile index of a 10980 px Sentinel-2 COG, so opening costs one request, not three.
* ``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES=YES`` - adjacent tiles of one window come in one
  request.
* ``GDAL_HTTP_MULTIPLEX=YES`` - requests to one host share an HTTP/2 connection.
* ``GDAL_CACHEMAX`` (MB) - the decoded-block cache, shared by all datasets (see
  ``GDAL_CACHE_MB``).
* ``VSI_CACHE=TRUE``, ``VSI_CACHE_SIZE`` (bytes, per open file) and
  ``CPL_VSIL_CURL_CACHE_SIZE`` (bytes, all files) - raw bytes already fetched are kept, so
  neighbouring windows that share a tile do not fetch it again.
* ``GDAL_HTTP_MAX_RETRY``, ``GDAL_HTTP_RETRY_DELAY`` (s), ``GDAL_HTTP_RETRY_CODES`` - a
  request answered 429/500/502/503/504, or timed out or reset, is retried up to 5 times;
  GDAL doubles the delay (with jitter) at each retry: about 0.5, 1, 2, 4, 8 s.
* ``GDAL_HTTP_TIMEOUT`` / ``GDAL_HTTP_CONNECTTIMEOUT`` (s) - a stalled request fails (and is
  retried) instead of hanging the partition.
* ``AWS_REGION=us-west-2`` - the region of Earth Search's ``sentinel-cogs`` bucket, so s3://
  hrefs read as /vsis3/ need no redirect.
* ``AWS_NO_SIGN_REQUEST=YES`` - added by ``remote_cog_options`` when no AWS credentials are
  configured: the public bucket is read with unsigned requests.

Any of these already set in the process environment wins over the value here, so an operator
tunes them the usual GDAL way (``GDAL_HTTP_MAX_RETRY=10 geofm ...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import rasterio

# GDAL's block cache: enough for a row of source tiles of a full MGRS tile (11 bands), far
# below GDAL's default of 5% of RAM, so memory stays flat whatever the region's size.
GDAL_CACHE_MB = 256

REMOTE_PREFIXES = ("http://", "https://", "s3://", "/vsicurl/", "/vsis3/")

REMOTE_COG_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_CACHEMAX": str(GDAL_CACHE_MB),
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(8 * 2**20),  # per open file: 22 band COGs of two scenes, 176 MiB
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 2**20),
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "AWS_REGION": "us-west-2",
}

LOCAL_COG_OPTIONS: dict[str, str] = {"GDAL_CACHEMAX": str(GDAL_CACHE_MB)}

# Environment variables by which boto3 and GDAL find AWS credentials.
_AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def is_remote(href: str) -> bool:
    """Whether ``href`` is read over the network (http(s)://, s3:// or their GDAL paths)."""
    return href.startswith(REMOTE_PREFIXES)


def aws_credentials_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names AWS credentials (keys, a profile, a web identity or an
    ECS task role)."""
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in _AWS_CREDENTIAL_VARIABLES)


def _environment_wins(options: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
    return {key: env.get(key, value) for key, value in options.items()}


def remote_cog_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``REMOTE_COG_OPTIONS``, with ``AWS_NO_SIGN_REQUEST=YES`` when no AWS credentials are
    configured, and with any option set in the environment taking the environment's value."""
    env = os.environ if environ is None else environ
    options = dict(REMOTE_COG_OPTIONS)
    if not aws_credentials_configured(env):
        options["AWS_NO_SIGN_REQUEST"] = "YES"
    return _environment_wins(options, env)


def cog_options_for(hrefs: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL options for reading ``hrefs``: the remote set when any of them is remote, else just
    the block cache size."""
    env = os.environ if environ is None else environ
    if any(is_remote(h) for h in hrefs):
        return remote_cog_options(env)
    return _environment_wins(LOCAL_COG_OPTIONS, env)


def gdal_cache_bytes(value: str) -> int:
    """``GDAL_CACHEMAX`` as GDAL reads the configuration option, in bytes: a number below
    100000 is megabytes, a larger one bytes, ``N%`` a share of physical memory."""
    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * share / 100)
        number = int(text)
        if number <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"GDAL_CACHEMAX={value!r} is not a cache size: set it to megabytes (e.g. 256), "
            "bytes (>= 100000) or a share of memory (e.g. 5%), or unset it"
        ) from None
    return number * 2**20 if number < 100_000 else number


def cog_env(hrefs: Iterable[str]) -> rasterio.Env:
    """A ``rasterio.Env`` to open and read ``hrefs`` in. GDAL configuration options are
    process-wide, so reads in worker threads started inside it see them too.

    rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, which takes bytes:
    the option's megabytes are converted here (passing 256 meant a 256-byte cache, so every
    internal tile was decoded again for each window that touched it)."""
    options: dict[str, str | int] = dict(cog_options_for(hrefs))
    options["GDAL_CACHEMAX"] = gdal_cache_bytes(str(options["GDAL_CACHEMAX"]))
    return rasterio.Env(**options)
