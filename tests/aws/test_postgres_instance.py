"""The production instance (deploy/dagster.yaml) on a real PostgreSQL server, started by the
test on a free loopback port; only the run launcher is swapped (ECS cannot run here)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, materialize

from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.partitions import DATE_PARTITIONS_NAME, partition_key
from geofm_assets.paths import REPO_ROOT
from geofm_assets.resources.lake import LocalLakeResource
from geofm_assets.resources.stac import StacResource

DEPLOY_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
PG_PASSWORD = "geofm-pg-secret-2c7e"


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    db: str

    def connect(self):  # -> psycopg2 connection
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=self.db,
                                password=PG_PASSWORD)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster (Debian's postgresql package: initdb + pg_ctl). As root,
    the server runs as the `postgres` system user, since PostgreSQL refuses to run as root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): `apt-get install postgresql`")
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if owner is None or runuser is None:
            pytest.skip("running as root without a `postgres` user and runuser to start PostgreSQL as")
        prefix = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="geofm-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    if owner is not None:
        for path in (base, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    server = Postgres(port=port, user="geofm", db="dagster")
    password_file = base / "pwfile"
    password_file.write_text(PG_PASSWORD + "\n")
    if owner is not None:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    run = lambda *args: subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-U", server.user, "--auth=scram-sha-256",
            f"--pwfile={password_file}", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not be started: {exc.stderr or exc.stdout}")
    try:
        admin = Postgres(port=port, user=server.user, db="postgres").connect()
        admin.autocommit = True
        admin.cursor().execute(f"CREATE DATABASE {server.db}")
        admin.close()
        yield server
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, check=False)
        deadline = time.monotonic() + 10
        while (data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def local_instance_config(home: Path) -> Path:
    """deploy/dagster.yaml with the default run launcher and local compute logs."""
    config = yaml.safe_load(DEPLOY_YAML.read_text())
    assert config["run_launcher"]["class"] == "EcsRunLauncher"
    config["run_launcher"] = {"module": "dagster.core.launcher", "class": "DefaultRunLauncher"}
    config["compute_logs"] = {
        "module": "dagster.core.storage.local_compute_log_manager",
        "class": "LocalComputeLogManager",
        "config": {"base_dir": str(home / "compute_logs")},
    }
    path = home / "dagster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_the_deploy_instance_runs_on_postgres(postgres, tiny_sample, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    local_instance_config(home)
    for name, value in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres.port),
                        "DAGSTER_PG_DB": postgres.db, "DAGSTER_PG_USERNAME": postgres.user,
                        "DAGSTER_PG_PASSWORD": PG_PASSWORD, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)

    with DagsterInstance.from_config(str(home)) as instance:
        instance.upgrade()
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1  # the `gpu` pool: one at a time
        assert concurrency.run_queue_config is not None
        assert concurrency.run_queue_config.max_concurrent_runs == 12

        date = tiny_sample.dates[0].isoformat()
        instance.add_dynamic_partitions(DATE_PARTITIONS_NAME, [date])
        key = str(partition_key(date, "candeias"))
        result = materialize(
            [sentinel2_tiles], instance=instance, partition_key=key,
            resources={"stac": StacResource(catalog=str(tiny_sample.catalog_path)),
                       "lake": LocalLakeResource(root=str(tmp_path / "lake"))},
        )
        assert result.success
        event = instance.get_latest_materialization_event(AssetKey("sentinel2_tiles"))
        assert event is not None and event.run_id == result.run_id

    # straight from PostgreSQL: the run and its materialization are in Dagster's tables
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s "
            "AND dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = %s AND partition = %s",
            (result.run_id, AssetKey("sentinel2_tiles").to_string(), key),
        )
        assert cur.fetchone() == (1,)
        cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s",
                    (DATE_PARTITIONS_NAME,))
        assert cur.fetchall() == [(date,)]
