"""The uvicorn app factory of the test STAC API: stac-fastapi-geoparquet over the file named
by ``STAC_FASTAPI_GEOPARQUET_HREF``, its DuckDB loading the spatial extension bundled by
rustac-duckdb-extensions (nothing is downloaded). rustac 0.9.9 exports its Rust
``DuckdbClient`` without the wrapper that finds the bundled extensions, so they are named
here."""

from __future__ import annotations

import rustac_duckdb_extensions
from fastapi import FastAPI
from rustac import DuckdbClient
from stac_fastapi.geoparquet.api import create


def create_app() -> FastAPI:
    client = DuckdbClient(
        extension_directory=rustac_duckdb_extensions.extension_directory(),
        install_extensions=False,
    )
    return create(duckdb_client=client).app
