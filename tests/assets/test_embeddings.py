"""embeddings: the Pipes worker end to end, and the worker's failure modes."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import materialize

from geofm_assets.assets.chips import chips
from geofm_assets.assets.embeddings import embeddings
from geofm_assets.assets.tiles import sentinel2_tiles
from geofm_assets.geo.geoparquet import read_json_metadata
from geofm_assets.models.base import Encoder
from geofm_assets.models.quality import embedding_matrix
from geofm_assets.partitions import partition_key
from geofm_assets.resources.encoder import (
    EcsEmbeddingLauncher,
    EncoderResource,
    SubprocessEmbeddingLauncher,
)
from geofm_assets.workers.embed import EmbeddingError, embed_partition


@pytest.fixture
def embed_resources(resources):
    return {
        **resources,
        "encoder": EncoderResource(model="rcf", batch_size=4, device="cpu"),
        "embedding_launcher": SubprocessEmbeddingLauncher(),
    }


def first_clear_date(sample) -> dt.date:
    return sample.dates[1]  # 2021-06-01 in the tiny preset: mostly clear


def test_pipes_worker_embeds_every_kept_chip_and_rerun_replaces(tiny_sample, instance, embed_resources):
    date = first_clear_date(tiny_sample)
    key = str(partition_key(date, "jamari"))
    result = materialize([sentinel2_tiles, chips, embeddings], instance=instance,
                         resources=embed_resources, partition_key=key)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["one_vector_per_kept_chip"] and checks["vectors_finite"]
    assert checks["vectors_nonzero"] and checks["dimension_matches_model"]
    md = {
        k: getattr(v, "value", v)
        for e in result.get_asset_materialization_events()
        if e.step_materialization_data.materialization.asset_key.to_user_string() == "embeddings"
        for k, v in e.step_materialization_data.materialization.metadata.items()
    }
    assert md["model"] == "rcf" and md["device"] == "cpu" and md["chips_per_s"] > 0

    lake = Path(embed_resources["lake"].root)
    out = lake / f"embeddings/region=jamari/date={date}/embeddings.parquet"
    table = pq.read_table(out)
    kept = pq.read_table(lake / f"chips/region=jamari/date={date}/chips.parquet")
    assert table.column("chip_id").to_pylist() == kept.column("chip_id").to_pylist()
    matrix = embedding_matrix(table)
    assert matrix.shape == (kept.num_rows, md["dims"]) and np.isfinite(matrix).all()
    emb = read_json_metadata(out, "emb")
    assert emb["model"] == "rcf" and emb["dim"] == md["dims"]
    assert b"geo" in pq.read_schema(out).metadata

    again = materialize([embeddings], instance=instance, resources=embed_resources, partition_key=key)
    assert again.success
    assert pq.read_table(out).num_rows == kept.num_rows
    assert sorted(p.name for p in out.parent.parent.iterdir()) == [f"date={date}"]


class NaNEncoder(Encoder):
    name, dim, checkpoint_digest = "nan-test", 8, "none"

    def embed_datacube(self, datacube):
        out = np.ones((datacube["pixels"].shape[0], self.dim), np.float32)
        out[0, 3] = np.nan
        return out


def test_a_nan_vector_fails_naming_the_chips_and_writes_nothing(tiny_sample, instance, resources):
    date = first_clear_date(tiny_sample)
    assert materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                       partition_key=str(partition_key(date, "candeias"))).success
    lake = Path(resources["lake"].root)
    with pytest.raises(EmbeddingError, match=r"non-finite vectors for chips \['candeias_r"):
        embed_partition(lake, "candeias", date.isoformat(), NaNEncoder(), batch_size=4)
    assert not (lake / "embeddings/region=candeias").exists() or not list(
        (lake / "embeddings/region=candeias").iterdir()
    )


def test_missing_chips_table_is_explained(tmp_path):
    with pytest.raises(EmbeddingError, match=re.escape("materialize chips for 2021-06-01|jamari first")):
        embed_partition(tmp_path, "jamari", "2021-06-01", NaNEncoder())


def test_ecs_launcher_configuration_builds():
    launcher = EcsEmbeddingLauncher(
        cluster="geofm", task_definition="geofm-embed-gpu:3", subnets=["subnet-1"],
        security_groups=["sg-1"], capacity_provider="gpu-asg", region_name="us-east-1",
    )
    params = launcher.run_task_params()
    assert params["capacityProviderStrategy"][0]["capacityProvider"] == "gpu-asg"
    override = params["overrides"]["containerOverrides"][0]
    assert override["name"] == "embed-worker"
    assert override["command"] == ["python", "-m", "geofm_assets.workers.embed"]
    assert params["networkConfiguration"]["awsvpcConfiguration"]["subnets"] == ["subnet-1"]
    assert type(launcher.client()).__name__ == "PipesECSClient"


def test_patch_embeddings_come_from_the_same_forward_pass(tiny_sample, instance, resources, tmp_path):
    import torch

    from geofm_assets.models.clay import ClayConfig, ClayEncoder, ClayEncoderModel

    date = first_clear_date(tiny_sample)
    assert materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                       partition_key=str(partition_key(date, "candeias"))).success
    lake = Path(resources["lake"].root)
    torch.manual_seed(0)
    config = ClayConfig(name="clay-tiny", dim=32, depth=1, heads=2, dim_head=16)
    encoder = ClayEncoder(ClayEncoderModel(config), checkpoint_digest="test")
    stats = embed_partition(lake, "candeias", date.isoformat(), encoder, batch_size=4,
                            patch_embeddings=True)
    out = lake / f"embeddings/region=candeias/date={date}"
    patches = np.load(out / "patches.npy")
    assert patches.shape == (stats.count, (256 // 8) ** 2, 32)
    assert read_json_metadata(out / "embeddings.parquet", "emb")["patches"] == "patches.npy"
    with pytest.raises(EmbeddingError, match="no patch tokens"):
        embed_partition(lake, "candeias", date.isoformat(), NaNEncoder(), patch_embeddings=True)
