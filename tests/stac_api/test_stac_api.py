"""Scenes from a real STAC API (stac-fastapi-geoparquet over the tiny sample, started locally)
with the COGs read over HTTP: the same pipeline code as against Earth Search, checked against
the static-catalog run, and its faults: an API that is down or silent, 5xx answers from the
API and from the COG server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from conftest import StacApiSample
from dagster import DagsterInstance, materialize
from stac_servers import flaky_proxy, free_port, silent_server

from geofm_assets.assets.chips import CHIPS_TABLE, chips
from geofm_assets.assets.tiles import MOSAIC_FILE, sentinel2_tiles
from geofm_assets.geo.catalog import ApiCatalog, CatalogUnavailableError, StaticCatalog
from geofm_assets.geo.gdal_env import cog_options_for, remote_cog_options
from geofm_assets.geo.mosaic import write_region_mosaic
from geofm_assets.geo.regions import ChipGrid, load_regions
from geofm_assets.geo.scenes import Scene, scenes_on_date
from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource

REGIONS = load_regions()
DATE = dt.date(2022, 5, 22)  # clear, baseline 04.00 (the +1000 offset), both MGRS tiles
REGION = "jamari"


def ids(items: list) -> list[str]:
    return [i.id for i in items]


def fast_api(url: str, **kw: float) -> ApiCatalog:
    return ApiCatalog(url, timeout_s=kw.get("timeout_s", 5.0), max_retries=int(kw.get("max_retries", 2)),
                      backoff_s=kw.get("backoff_s", 0.1))


# --- the search ----------------------------------------------------------------------------------


def test_api_search_returns_what_the_static_catalog_does(stac_api: StacApiSample) -> None:
    static = StaticCatalog(stac_api.sample.catalog_path)
    api = fast_api(stac_api.url)
    period = (dt.date(2020, 1, 1), dt.date(2022, 12, 31))
    for region in ("jamari", "candeias"):
        bounds = REGIONS[region].bounds
        for start, end in (period, (DATE, DATE), (dt.date(2021, 6, 1), dt.date(2022, 2, 11))):
            for cloud in (100.0, 50.0, 5.0):
                want = ids(static.search(bounds, start, end, cloud))
                assert ids(api.search(bounds, start, end, cloud)) == want, (region, start, end, cloud)
        # the cloud-cover filter goes to the server as CQL2 (this server has no query extension)
        assert 0 < len(static.search(bounds, *period, 50.0)) < len(static.search(bounds, *period))
        newest = api.newest(bounds, 50.0)
        assert newest is not None and newest.id == static.newest(bounds, 50.0).id
        assert ids(api.published_since(bounds, None)) == ids(static.published_since(bounds, None))
    assert len(api.search(REGIONS["jamari"].bounds, *period)) == stac_api.n_items


def test_api_items_give_the_same_scenes_with_http_hrefs(stac_api: StacApiSample) -> None:
    bounds = REGIONS[REGION].bounds
    from_api = scenes_on_date(fast_api(stac_api.url).search(bounds, DATE, DATE), DATE)
    from_disk = scenes_on_date(StaticCatalog(stac_api.sample.catalog_path).search(bounds, DATE, DATE), DATE)
    assert [s.item_id for s in from_api] == [s.item_id for s in from_disk] and len(from_api) == 2

    def without_hrefs(s: Scene) -> Scene:
        return dataclasses.replace(
            s, assets={k: dataclasses.replace(a, href="") for k, a in s.assets.items()})

    assert [without_hrefs(s) for s in from_api] == [without_hrefs(s) for s in from_disk]
    assert all(a.href.startswith(stac_api.cog_base_url + "/") for s in from_api for a in s.assets.values())
    assert {a.dn_offset for s in from_api for a in s.assets.values() if a.name != "scl"} == {1000}


# --- the pipeline over the network ---------------------------------------------------------------


def materialize_partition(catalog: str, lake_root: Path) -> None:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, [DATE.isoformat()])
    result = materialize(
        [sentinel2_tiles, chips], instance=instance,
        resources={"stac": StacResource(catalog=catalog, api_max_retries=2, api_backoff_s=0.1),
                   "lake": LocalLakeResource(root=str(lake_root))},
        partition_key=str(partition_key(DATE.isoformat(), REGION)),
    )
    assert result.success


def partition(root: Path, asset: str) -> Path:
    return root / asset / f"region={REGION}" / f"date={DATE.isoformat()}"


@pytest.mark.slow
def test_partition_from_the_api_over_http_equals_the_static_run(
    stac_api: StacApiSample, tmp_path: Path, file_log_mark: int
) -> None:
    materialize_partition(str(stac_api.sample.catalog_path), tmp_path / "static")
    materialize_partition(stac_api.url, tmp_path / "api")

    with (rasterio.open(partition(tmp_path / "static", "sentinel2_tiles") / MOSAIC_FILE) as a,
          rasterio.open(partition(tmp_path / "api", "sentinel2_tiles") / MOSAIC_FILE) as b):
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
        want = a.read()  # [11 H W]
        assert (want > 0).any()
        np.testing.assert_array_equal(b.read(), want)
    tables = [pq.read_table(partition(tmp_path / lake, "chips") / CHIPS_TABLE)
              for lake in ("static", "api")]
    kept = tables[0].column("chip_id").to_pylist()
    assert kept and tables[1].column("chip_id").to_pylist() == kept
    for col in ("cloud_fraction", "nodata_fraction"):
        assert tables[1].column(col).to_pylist() == tables[0].column(col).to_pylist()

    with stac_api.files.lock:
        requests = stac_api.files.log[file_log_mark:]
    # the COGs came over HTTP, as range requests, and GDAL never listed a directory or probed
    # for a sidecar (.aux.xml, .ovr, .msk)
    assert requests
    assert all(r.path.endswith(".tif") for r in requests), {r.path for r in requests}
    gets = [r for r in requests if r.method == "GET"]
    assert gets and all(r.range is not None and r.status == 206 for r in gets)
    assert len({r.path for r in gets}) == 22  # 2 scenes x 11 band COGs


def test_cog_5xx_then_ok_is_retried_by_gdal(stac_api: StacApiSample, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")  # the environment wins over the default
    assert remote_cog_options()["GDAL_HTTP_RETRY_DELAY"] == "0.05"
    grid = ChipGrid.for_region(REGIONS[REGION])
    bounds = REGIONS[REGION].bounds
    scenes = scenes_on_date(fast_api(stac_api.url).search(bounds, DATE, DATE), DATE)
    # the same files under fresh URLs, which GDAL has not cached from an earlier test
    fresh = f"{stac_api.cog_base_url}/_n/{uuid.uuid4().hex}"
    scenes = [dataclasses.replace(s, assets={
        k: dataclasses.replace(a, href=a.href.replace(stac_api.cog_base_url, fresh))
        for k, a in s.assets.items()}) for s in scenes]
    flaky = scenes[0].assets["red"].href.removeprefix(stac_api.cog_base_url)
    stac_api.files.faults[flaky] = [503, 502]

    summary = write_region_mosaic(scenes, grid, tmp_path / "mosaic.tif")

    statuses = [r.status for r in stac_api.files.requests_for(flaky)]
    assert statuses[:2] == [503, 502] and set(statuses[2:]) <= {200, 206} and len(statuses) > 2
    static = scenes_on_date(StaticCatalog(stac_api.sample.catalog_path).search(bounds, DATE, DATE), DATE)
    write_region_mosaic(static, grid, tmp_path / "local.tif")
    with rasterio.open(summary.path) as got, rasterio.open(tmp_path / "local.tif") as want:
        np.testing.assert_array_equal(got.read(), want.read())


def test_cog_options_for_remote_and_local_hrefs() -> None:
    remote = cog_options_for(["/data/B04.tif", "https://example.com/B04.tif"], environ={})
    assert remote["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert remote["GDAL_HTTP_MAX_RETRY"] == "5" and remote["AWS_NO_SIGN_REQUEST"] == "YES"
    signed = cog_options_for(["s3://sentinel-cogs/B04.tif"], environ={"AWS_PROFILE": "prod"})
    assert "AWS_NO_SIGN_REQUEST" not in signed
    assert cog_options_for(["/data/B04.tif"], environ={}) == {"GDAL_CACHEMAX": "256"}


# --- the API's faults ----------------------------------------------------------------------------


def test_api_down_fails_clearly_after_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(CatalogUnavailableError) as err:
        fast_api(url, max_retries=2, backoff_s=0.2).search(REGIONS[REGION].bounds, DATE, DATE)
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert url in message and "3 attempts" in message and "could not be reached" in message
    reported = float(re.search(r"over ([0-9.]+) s", message).group(1))
    assert 0.4 <= reported <= elapsed + 0.05  # retry 2 waited 0.2 x 2 s


@pytest.mark.timeout(60)
def test_api_timeouts_are_retried_then_fail_clearly() -> None:
    with silent_server() as (url, accepted):
        with pytest.raises(CatalogUnavailableError) as err:
            fast_api(url, timeout_s=0.3, max_retries=2, backoff_s=0.05).search(
                REGIONS[REGION].bounds, DATE, DATE)
        assert len(accepted) == 3  # one request, two retries, each timed out
    message = str(err.value)
    assert url in message and "3 attempts" in message and "timeout 0.3 s" in message


def test_api_5xx_then_ok_is_retried(stac_api: StacApiSample) -> None:
    bounds = REGIONS[REGION].bounds
    with flaky_proxy(stac_api.url, failures=2) as (url, proxy):
        items = fast_api(url).search(bounds, DATE, DATE)
    assert ids(items) == ids(StaticCatalog(stac_api.sample.catalog_path).search(bounds, DATE, DATE))
    assert proxy.answered[:3] == [503, 503, 200]


def test_partition_fails_clearly_and_writes_nothing_when_the_api_is_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, [DATE.isoformat()])
    lake = tmp_path / "lake"
    result = materialize(
        [sentinel2_tiles], instance=instance, raise_on_error=False,
        resources={"stac": StacResource(catalog=url, api_max_retries=1, api_backoff_s=0.05),
                   "lake": LocalLakeResource(root=str(lake))},
        partition_key=str(partition_key(DATE.isoformat(), REGION)),
    )
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    text = []
    while error is not None:
        text.append(error.message)
        error = error.cause
    assert any("CatalogUnavailableError" in t and url in t for t in text), text
    # nothing half-written: no partition folder, no staging leftovers
    assert not (lake / "sentinel2_tiles").exists() or not any((lake / "sentinel2_tiles").rglob("*"))
