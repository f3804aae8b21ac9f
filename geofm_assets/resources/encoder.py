"""The encoder and where its external (GPU) step runs: a Pipes subprocess on this machine by
default, a GPU task on ECS in production."""

from __future__ import annotations

import os
import sys
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError
from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    PipesSubprocessClient,
    RetryRequested,
)
from pydantic import Field

WORKER_MODULE = "geofm_assets.workers.embed"


class EncoderResource(ConfigurableResource):
    """Which encoder embeds chips (a name from ``geofm_assets.models``) and how."""

    model: str = Field(default="rcf", description="rcf, clay-v1, clay-v1.5 or hf:<local model dir>")
    checkpoint: str | None = Field(
        default=None, description="checkpoint file; clay-* default to GEOFM_CHECKPOINT_DIR's published files"
    )
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda")
    batch_size: int = Field(default=16, ge=1)
    patch_embeddings: bool = Field(
        default=False, description="also write patch tokens (patches.npy) for ViT encoders"
    )
    spatial_grid: int = Field(
        default=16, ge=0,
        description="also write g x g cell features (spatial.npy, [N g g D] float16) and their "
        "clear fractions (spatial_valid.npy) for change_maps' patch-level detection; 0: none",
    )

    readers: int = Field(
        default=-1, ge=-1,
        description="datacube reader processes of the worker; -1: up to 8 on CUDA (cores - 1), "
        "none (one reader thread) on the CPU",
    )
    compile: bool = Field(
        default=False,
        description="run clay-* through torch.compile: ~10% faster on a GPU (bench/README.md), "
        "but each worker pays ~20 s of compilation first, so only for large partitions",
    )

    def worker_extras(self, lake_root: str, partitions: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """The worker's Pipes extras for embedding ``partitions``, (region, date) pairs, in order."""
        return {
            "lake_root": lake_root,
            "partitions": [{"region": region, "date": date} for region, date in partitions],
            "model": self.model,
            "checkpoint": self.checkpoint,
            "device": self.device,
            "batch_size": self.batch_size,
            "patch_embeddings": self.patch_embeddings,
            "spatial_grid": self.spatial_grid,
            "readers": self.readers,
            "compile": self.compile,
        }


class EmbeddingLauncher(ConfigurableResource):
    """Runs ``python -m geofm_assets.workers.embed`` through Dagster Pipes."""

    @abstractmethod
    def launch(self, context: AssetExecutionContext, extras: dict[str, Any]) -> list[dict[str, Any]]:
        """Run the worker for the partitions in ``extras``; its report on each, in order:
        ``{"region", "date", "ok", "metadata"}``, or ``{"region", "date", "ok": False, "error"}``
        (``worker_reports``)."""


class SubprocessEmbeddingLauncher(EmbeddingLauncher):
    """The embedded default: a local subprocess (CPU, or this machine's GPU)."""

    python: str = Field(default_factory=lambda: sys.executable)

    def launch(self, context: AssetExecutionContext, extras: dict[str, Any]) -> list[dict[str, Any]]:
        env = {k: v for k, v in os.environ.items() if k.startswith(("GEOFM_", "CUDA_", "OMP_", "HF_"))}
        env["PATH"] = os.environ.get("PATH", "")
        return worker_reports(
            PipesSubprocessClient()
            .run(context=context, command=[self.python, "-m", WORKER_MODULE], extras=extras, env=env)
            .get_custom_messages(),
            extras,
        )


class EcsEmbeddingLauncher(EmbeddingLauncher):
    """Production: the worker image as an ECS task with a GPU (dagster-aws ``PipesECSClient``).
    The task definition comes from ``deploy/`` (a container named ``container_name`` whose
    entry point is the worker)."""

    cluster: str
    task_definition: str
    container_name: str = "embed-worker"
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
    capacity_provider: str | None = Field(
        default=None, description="a GPU capacity provider; else EC2 launch"
    )
    region_name: str | None = None

    def run_task_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "count": 1,
            "overrides": {
                "containerOverrides": [
                    {"name": self.container_name, "command": ["python", "-m", WORKER_MODULE]}
                ]
            },
        }
        if self.capacity_provider:
            params["capacityProviderStrategy"] = [{"capacityProvider": self.capacity_provider, "weight": 1}]
        else:
            params["launchType"] = "EC2"
        if self.subnets:
            params["networkConfiguration"] = {
                "awsvpcConfiguration": {"subnets": self.subnets, "securityGroups": self.security_groups}
            }
        return params

    def client(self):  # -> PipesECSClient
        import boto3
        from dagster_aws.pipes import PipesCloudWatchMessageReader, PipesECSClient

        return PipesECSClient(
            client=boto3.client("ecs", region_name=self.region_name),
            message_reader=PipesCloudWatchMessageReader(
                client=boto3.client("logs", region_name=self.region_name)
            ),
        )

    max_retries: int = Field(
        default=2, ge=0,
        description="times a failed or lost worker task is started again (spot reclaim, host lost, "
                    "OOM) before the partition fails",
    )
    retry_delay_s: float = Field(default=30.0, ge=0, description="first retry delay; doubles each time")

    def launch(self, context: AssetExecutionContext, extras: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return worker_reports(
                self.client()
                .run(context=context, run_task_params=self.run_task_params(),
                     extras=extras, pipes_container_name=self.container_name)
                .get_custom_messages(),
                extras,
            )
        except (RuntimeError, OSError, ClientError) as exc:
            # The task died or never started: nothing was committed (the worker writes its
            # partition atomically at the end), so starting it again is safe.
            attempt = context.retry_number + 1
            if context.retry_number < self.max_retries:
                wait = self.retry_delay_s * 2 ** context.retry_number
                context.log.warning(
                    f"embedding worker task on ECS cluster {self.cluster} failed (attempt {attempt} of "
                    f"{self.max_retries + 1}): {exc}; starting it again in {wait:.0f} s")
                raise RetryRequested(max_retries=self.max_retries, seconds_to_wait=wait) from exc
            raise EmbeddingWorkerFailed(
                f"the embedding worker task on ECS cluster {self.cluster} (task definition "
                f"{self.task_definition}) failed {attempt} time(s), the last with: {exc}. Partitions "
                "it had not finished were left as they were; check the task's CloudWatch logs and "
                "re-run them."
            ) from exc


class EmbeddingWorkerFailed(RuntimeError):
    """The external embedding step failed for good (after its retries)."""


def worker_reports(messages: Sequence[Any], extras: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker's per-partition reports (Pipes custom messages) for the partitions asked for;
    a partition it said nothing about is reported as failed."""
    got = {(m.get("region"), m.get("date")): m for m in messages
           if isinstance(m, dict) and m.get("kind") == "partition"}
    out = []
    for part in extras["partitions"]:
        key = (part["region"], part["date"])
        out.append(got.get(key) or {**part, "ok": False,
                                    "error": "the embedding worker exited without reporting this partition"})
    return out
