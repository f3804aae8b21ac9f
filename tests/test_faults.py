"""Faults: a worker killed in the middle of writing a partition leaves no partial output where
readers look, the previous version stays, and the partition re-runs cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from geofm_assets.lake import CHIPS_TABLE, EMBEDDINGS_TABLE, lake_connection, partition_dir
from geofm_assets.models import build_encoder
from geofm_assets.workers.embed import embed_partition

REGION = "candeias"

KILLED_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import geofm_assets.workers.embed as worker
    from geofm_assets.models import build_encoder

    real_write = worker.write_geoparquet

    def write_then_hang(table, path, *args, **kwargs):
        real_write(table, path, *args, **kwargs)
        print("WRITING", flush=True)  # the table is in the staging directory; now die here
        time.sleep(120)

    worker.write_geoparquet = write_then_hang
    worker.embed_partition(Path(sys.argv[1]), sys.argv[2], sys.argv[3], build_encoder("rcf"),
                           batch_size=4, log=lambda _m: None)
""")


@pytest.fixture
def lake(tiny_lake, tmp_path) -> Path:
    root = tmp_path / "lake"
    for asset in ("chips", "embeddings"):
        shutil.copytree(tiny_lake.root / asset / f"region={REGION}", root / asset / f"region={REGION}")
    return root


def visible_embeddings(root: Path) -> int:
    con = lake_connection(root)
    return int(con.execute("SELECT count(*) FROM embeddings").fetchall()[0][0])


@pytest.mark.slow
def test_worker_killed_while_writing_leaves_the_previous_version_and_reruns_cleanly(tiny_lake, lake):
    date = tiny_lake.dates[1]
    final = partition_dir(lake, "embeddings", REGION, date)
    before = (final / EMBEDDINGS_TABLE).read_bytes()
    kept = pq.read_table(partition_dir(lake, "chips", REGION, date) / CHIPS_TABLE).num_rows
    total_before = visible_embeddings(lake)

    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(lake), REGION, date],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        line = b""
        while time.monotonic() < deadline and b"WRITING" not in line:
            line = proc.stdout.readline() if proc.stdout else b""
            if not line and proc.poll() is not None:
                pytest.fail(f"worker exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        os.killpg(proc.pid, signal.SIGKILL)  # as the OOM killer or a lost spot instance would
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # readers see exactly the previous version; the killed writer's staging is hidden beside it
    assert (final / EMBEDDINGS_TABLE).read_bytes() == before
    leftovers = sorted(p.name for p in final.parent.iterdir() if p.name.startswith("."))
    assert leftovers and all(n.startswith(f".staging-date={date}-") for n in leftovers)
    assert visible_embeddings(lake) == total_before

    # the partition re-runs cleanly: complete table, leftovers gone, nothing duplicated
    stats = embed_partition(lake, REGION, date, build_encoder("rcf"), batch_size=4, log=lambda _m: None)
    assert stats.count == kept == pq.read_table(final / EMBEDDINGS_TABLE).num_rows
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]
    assert visible_embeddings(lake) == total_before
