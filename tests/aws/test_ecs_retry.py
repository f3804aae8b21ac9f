"""An ECS worker task that dies is started again with backoff, then fails the partition clearly.

ECS cannot run here: the launcher's ECS client is replaced by one whose task dies the way
`PipesECSClient` reports it (a RuntimeError for a non-zero exit code), every other part is real."""

from __future__ import annotations

from typing import Any

from dagster import DagsterEventType, materialize

from geofm_assets.assets.embeddings import embeddings
from geofm_assets.partitions import partition_key
from geofm_assets.resources.encoder import EcsEmbeddingLauncher, EncoderResource
from geofm_assets.resources.lake import LocalLakeResource

STARTED: list[dict[str, Any]] = []


class DyingTaskClient:
    def run(self, *, context, run_task_params, extras, pipes_container_name):
        STARTED.append(run_task_params)
        raise RuntimeError("Some ECS containers finished with non-zero exit code:\n['a1b2c3']")


class LostTaskLauncher(EcsEmbeddingLauncher):
    def client(self):
        return DyingTaskClient()


def test_dead_worker_task_is_retried_with_backoff_then_fails_clearly(tiny_sample, instance, tmp_path):
    STARTED.clear()
    launcher = LostTaskLauncher(cluster="gpu-cluster", task_definition="geofm-embed:3",
                                max_retries=2, retry_delay_s=0.01)
    key = str(partition_key(tiny_sample.dates[1], "candeias"))
    result = materialize(
        [embeddings], instance=instance, partition_key=key, raise_on_error=False,
        resources={"encoder": EncoderResource(model="rcf"), "embedding_launcher": launcher,
                   "lake": LocalLakeResource(root=str(tmp_path / "lake"))},
    )
    assert not result.success
    assert len(STARTED) == 3 and all(p["cluster"] == "gpu-cluster" for p in STARTED)
    events = result.all_events
    retries = [e for e in events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 2
    waits = [e.event_specific_data.seconds_to_wait for e in retries]
    assert waits == [0.01, 0.02]  # doubling
    (failure,) = [e for e in events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = str(failure.event_specific_data.error.cause or failure.event_specific_data.error)
    assert "failed 3 time(s)" in message and "gpu-cluster" in message and "left as they were" in message
    assert not (tmp_path / "lake" / "embeddings").exists()
