"""End to end, as a user: the real webserver and daemon (`dagster dev`), driven through GraphQL.

One `dagster dev` for the module, on a free loopback port with a temporary DAGSTER_HOME and lake,
over a copy of the tiny sample. Stopped at the end whatever happens."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster_dev_server import LOCATION, REPOSITORY, DagsterDev, dagster_dev

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO_SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
REGION = "candeias"
PER_PARTITION = ["sentinel2_tiles", "chips", "embeddings", "vector_index"]
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}
SENSOR_KEYS: set[str] = set()  # what the sensor test's runs materialized


@pytest.fixture(scope="module")
def dev(tiny_sample, tmp_path_factory) -> Iterator[DagsterDev]:
    """dagster dev over a copy of the tiny sample, restricted to one region (candeias, 6 chips)
    so the sensor's runs stay few."""
    root = tmp_path_factory.mktemp("e2e")
    sample = root / "sample"
    shutil.copytree(tiny_sample.root, sample)
    regions = json.loads(tiny_sample.regions_path.read_text())
    regions["features"] = [f for f in regions["features"] if f["properties"]["name"] == REGION]
    (root / "regions.geojson").write_text(json.dumps(regions))
    env = {
        "GEOFM_STAC_CATALOG": str(sample / tiny_sample.catalog_path.relative_to(tiny_sample.root)),
        "GEOFM_REGIONS_FILE": str(root / "regions.geojson"),
        "GEOFM_LAKE_ROOT": str(root / "lake"),
        "GEOFM_ENV": "local",
        # two region x date runs a tick: enough to show the sensor, automation and a re-run
        "GEOFM_SENSOR_MAX_RUNS_PER_TICK": "2",
    }
    with dagster_dev(root / "dagster_home", env) as server:
        yield server


def runs_with_tag(dev: DagsterDev, key: str, value: str) -> list[dict]:
    data = dev.graphql(
        "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status "
        "tags { key value } } } } }", {"f": {"tags": [{"key": key, "value": value}]}})
    return data["runsOrError"]["results"]


def sensor_state(dev: DagsterDev, name: str) -> dict:
    data = dev.graphql(
        "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename ... on Sensor { "
        "sensorState { status ticks(limit: 5) { status skipReason error { message } } } } } }",
        {"s": {**REPO_SELECTOR, "sensorName": name}})
    return data["sensorOrError"]


def start_sensor(dev: DagsterDev, name: str) -> None:
    data = dev.graphql(
        "mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename "
        "... on PythonError { message } } }", {"s": {**REPO_SELECTOR, "sensorName": name}})
    assert data["startSensor"]["__typename"] == "Sensor", data


def stop_sensor(dev: DagsterDev, name: str) -> None:
    state = dev.graphql(
        "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { "
        "sensorState { id selectorId } } } }", {"s": {**REPO_SELECTOR, "sensorName": name}})
    ids = state["sensorOrError"]["sensorState"]
    dev.graphql("mutation($id: String!, $sid: String!) { stopSensor(id: $id, jobSelectorId: $sid) "
                "{ __typename } }", {"id": ids["id"], "sid": ids["selectorId"]})


def test_scene_sensor_registers_dates_and_runs_them_then_automation_embeds(dev, tiny_sample):
    start_sensor(dev, "scene_sensor")

    def sensor_runs_done() -> list[dict] | None:
        runs = runs_with_tag(dev, "dagster/sensor_name", "scene_sensor")
        return runs if runs and all(r["status"] in RUN_DONE for r in runs) else None

    runs = dev.wait_for("the sensor's runs", sensor_runs_done, 420, every=3)
    stop_sensor(dev, "scene_sensor")
    assert all(r["status"] == "SUCCESS" for r in runs), (runs, dev.log_tail())
    keys = {t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition"}
    # every date of the tiny sample except the overcast one (98.5% cloud > the 80% default limit)
    clear = [d.isoformat() for d, c in zip(tiny_sample.dates, (0.04, 0.06, 0.985, 0.03, 0.08, 0.10),
                                           strict=True) if c < 0.8]
    assert len(keys) == 2 and keys <= {f"{d}|{REGION}" for d in clear}, keys  # 2 runs a tick
    SENSOR_KEYS.update(keys)
    assert keys <= materialized_partitions(dev, "chips")
    ticks = sensor_state(dev, "scene_sensor")["sensorState"]["ticks"]
    assert not any(t["error"] for t in ticks), ticks

    # embeddings and the vector index follow chips declaratively (the daemon's automation sensor)
    dev.wait_for("automation to embed and index the sensor's partitions",
                 lambda: keys <= materialized_partitions(dev, "vector_index"), 420, every=5)
    assert keys <= materialized_partitions(dev, "embeddings")


def backfill_status(dev: DagsterDev, backfill_id: str) -> dict:
    data = dev.graphql(
        "query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename "
        "... on PartitionBackfill { status numPartitions error { message } } "
        "... on PythonError { message } } }", {"id": backfill_id})
    return data["partitionBackfillOrError"]


def materialized_partitions(dev: DagsterDev, asset: str) -> set[str]:
    data = dev.graphql(
        "query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode { "
        "assetMaterializations(limit: 100) { partition } } } }", {"k": {"path": [asset]}})
    return {m["partition"] for m in data["assetNodeOrError"]["assetMaterializations"]}


def add_dates(dev: DagsterDev, dates: list[str]) -> None:
    for date in dates:
        data = dev.graphql(
            "mutation($repo: RepositorySelector!, $d: String!) { addDynamicPartition("
            "repositorySelector: $repo, partitionsDefName: \"s2_date\", partitionKey: $d) "
            "{ __typename ... on PythonError { message } ... on UnauthorizedError { message } } }",
            {"repo": REPO_SELECTOR, "d": date})
        kind = data["addDynamicPartition"]["__typename"]
        assert kind in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), data


def test_backfill_of_a_region_date_range_succeeds_with_lineage_and_checks(dev, tiny_sample):
    # a date the sensor already did (re-running it must duplicate nothing) and the overcast date
    done = sorted(k.split("|")[0] for k in SENSOR_KEYS) or [tiny_sample.dates[1].isoformat()]
    dates = [done[-1], tiny_sample.dates[2].isoformat()]
    add_dates(dev, dates)
    keys = [f"{d}|{REGION}" for d in dates]
    data = dev.graphql(
        "mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { "
        "__typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } "
        "... on PartitionKeysNotFoundError { message } ... on UnauthorizedError { message } } }",
        {"p": {"partitionNames": keys, "assetSelection": [{"path": [a]} for a in PER_PARTITION],
               "title": "e2e backfill"}})
    launched = data["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    status = dev.wait_for(
        "the backfill to finish",
        lambda: (s := backfill_status(dev, backfill_id)) and s.get("status") in DONE and s, 420, every=3)
    assert status["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), (status, dev.log_tail())

    for asset in PER_PARTITION:
        assert set(keys) <= materialized_partitions(dev, asset), asset

    # lineage: the graph as the UI draws it
    nodes = dev.graphql("{ assetNodes { assetKey { path } dependencyKeys { path } } }")["assetNodes"]
    upstream = {n["assetKey"]["path"][0]: {k["path"][0] for k in n["dependencyKeys"]} for n in nodes}
    assert upstream["chips"] == {"sentinel2_tiles"}
    assert upstream["embeddings"] == {"chips"}
    assert upstream["vector_index"] == {"embeddings"}

    # checks: every check of the backfilled assets ran in the backfill's runs and passed
    run_ids = {r["runId"] for r in runs_with_tag(dev, "dagster/backfill", backfill_id)}
    assert run_ids
    for asset in PER_PARTITION:
        data = dev.graphql(
            "query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode { "
            "assetChecksOrError { ... on AssetChecks { checks { name } } } } } }", {"k": {"path": [asset]}})
        checks = [c["name"] for c in data["assetNodeOrError"]["assetChecksOrError"]["checks"]]
        assert checks, f"{asset} has no asset checks"
        for check in checks:
            if check == "chips_up_to_date":  # region-wide freshness, not run per partition
                continue
            executions = dev.graphql(
                "query($k: AssetKeyInput!, $c: String!) { assetCheckExecutions("
                "assetKey: $k, checkName: $c, limit: 50) { status runId } }",
                {"k": {"path": [asset]}, "c": check})["assetCheckExecutions"]
            ours = [e["status"] for e in executions if e["runId"] in run_ids]
            assert len(ours) == len(keys) and set(ours) == {"SUCCEEDED"}, (asset, check, ours)

    # dates[0] was already done by the sensor's run: doing it again duplicated nothing
    import duckdb

    from geofm_assets.search.faiss_store import FaissStore

    lake = Path(dev.home).parent / "lake"
    day = dates[0]
    counts = {t: duckdb.sql(
        f"SELECT count(*), count(DISTINCT chip_id) FROM '{lake}/{t}/region={REGION}/date={day}/*.parquet'"
    ).fetchall()[0] for t in ("chips", "embeddings")}
    assert counts["chips"][0] == counts["chips"][1] == counts["embeddings"][0] == counts["embeddings"][1] > 0
    store = FaissStore(lake / "vector_index")
    assert store.count("rcf", REGION, dt.date.fromisoformat(day)) == counts["chips"][0]

    for d in dates:
        assert (lake / f"chips/region={REGION}/date={d}/chips.parquet").exists()
        assert (lake / f"embeddings/region={REGION}/date={d}/embeddings.parquet").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them "
                    "with apt-get when it runs as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1000", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text_when(driver, dev: DagsterDev, path: str, wanted: list[str], timeout: float = 90,
                   ready=lambda _text: True) -> str:
    """Open ``path`` and wait until the page shows every string in ``wanted`` (dismissing the
    webserver's first-visit newsletter dialog)."""
    from selenium.webdriver.common.by import By

    driver.get(dev.url + path)

    def shown() -> str | None:
        for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            button.click()
        text = driver.find_element(By.TAG_NAME, "body").text
        return text if all(w in text for w in wanted) and ready(text) else None

    return dev.wait_for(f"{path} to show {wanted}", shown, timeout, every=1.0)


def test_browser_shows_asset_graph_and_partition_health(dev, browser, tiny_sample, tmp_path_factory):
    import re

    shots = Path(tmp_path_factory.mktemp("screenshots"))
    page_text_when(browser, dev, "/asset-groups", ["Global asset lineage", "ingest", "embed", "search"])
    browser.save_screenshot(str(shots / "asset_graph.png"))

    # the group's asset cards once their health has loaded: checks passed, partitions filled
    page_text_when(browser, dev, f"/locations/{LOCATION}/asset-groups/ingest",
                   ["sentinel2_tiles", "chips", "Passed", "filled"])
    browser.save_screenshot(str(shots / "ingest_group.png"))

    text = page_text_when(browser, dev, "/assets/chips?view=partitions", ["Materialized (", REGION],
                          ready=lambda t: re.search(r"Materialized \(([1-9]\d*)\)", t) is not None)
    materialized = int(re.search(r"Materialized \((\d+)\)", text).group(1))
    failed = int(re.search(r"Failed \((\d+)\)", text).group(1))
    assert materialized >= 2 and failed == 0, text[:2000]
    assert REGION in text
    browser.save_screenshot(str(shots / "chips_partitions.png"))
    for name in ("asset_graph.png", "ingest_group.png", "chips_partitions.png"):
        assert (shots / name).stat().st_size > 10_000, name


def test_backfill_of_an_unknown_region_is_refused_naming_it(dev, tiny_sample):
    date = tiny_sample.dates[1].isoformat()
    data = dev.graphql(
        "mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { "
        "__typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } "
        "... on PartitionKeysNotFoundError { message partitionKeys } "
        "} }",
        {"p": {"partitionNames": [f"{date}|atlantis", f"1999-01-01|{REGION}"],
               "assetSelection": [{"path": ["chips"]}]}})
    refused = data["launchPartitionBackfill"]
    assert refused["__typename"] != "LaunchBackfillSuccess", refused
    assert "atlantis" in str(refused), refused
