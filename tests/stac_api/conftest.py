"""A real STAC API (stac-fastapi-geoparquet under uvicorn) over the tiny sample's items, whose
COG hrefs point at a range-capable HTTP file server serving the sample's files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from stac_servers import FileServerState, range_file_server, stac_api_server, write_items_geoparquet

from geofm_assets.geo.sample_data import SampleCatalog


@dataclass(frozen=True)
class StacApiSample:
    url: str  # the STAC API
    cog_base_url: str  # where the items' COG hrefs point
    files: FileServerState  # the file server's request log and fault table
    sample: SampleCatalog
    n_items: int


@pytest.fixture(scope="session")
def stac_api(tiny_sample: SampleCatalog, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[StacApiSample]:
    work = tmp_path_factory.mktemp("stac_api")
    with range_file_server(tiny_sample.root) as (cog_base_url, files):
        geoparquet = work / "items.parquet"
        n_items = write_items_geoparquet(tiny_sample.root, cog_base_url, geoparquet)
        with stac_api_server(geoparquet, work / "server.log") as url:
            yield StacApiSample(url, cog_base_url, files, tiny_sample, n_items)


@pytest.fixture
def file_log_mark(stac_api: StacApiSample) -> int:
    """Index of the file server's next request, to look at one test's requests only."""
    with stac_api.files.lock:
        return len(stac_api.files.log)
