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


def chip_first_clear_date(sample, instance, resources) -> tuple[dt.date, Path]:
    """Tiles and chips of candeias on the sample's first clear date; (that date, the lake root)."""
    date = first_clear_date(sample)
    assert materialize([sentinel2_tiles, chips], instance=instance, resources=resources,
                       partition_key=str(partition_key(date, "candeias"))).success
    return date, Path(resources["lake"].root)


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
    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
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

    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
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


@pytest.mark.slow  # ~12 s: rcf feature maps and a tiny Clay over a partition
def test_worker_writes_spatial_features_and_clear_fractions_for_rcf_and_clay(
    tiny_sample, instance, resources
):
    import torch

    from geofm_assets.models import build_encoder
    from geofm_assets.models.clay import ClayConfig, ClayEncoder, ClayEncoderModel
    from geofm_assets.workers.embed import cell_clear_fraction, read_datacube_and_scl

    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
    out = lake / f"embeddings/region=candeias/date={date}"
    rcf = build_encoder("rcf")
    stats = embed_partition(lake, "candeias", date.isoformat(), rcf, batch_size=4, spatial_grid=16)
    spatial, clear = np.load(out / "spatial.npy"), np.load(out / "spatial_valid.npy")
    assert spatial.shape == (stats.count, 16, 16, rcf.dim) and spatial.dtype == np.float16
    assert clear.shape == (stats.count, 16, 16) and ((clear >= 0) & (clear <= 1)).all()
    assert stats.spatial_grid == 16 and 0 < stats.spatial_seconds <= stats.model_seconds
    emb = read_json_metadata(out / "embeddings.parquet", "emb")
    assert emb["spatial"]["grid"] == 16 and emb["spatial"]["file"] == "spatial.npy"
    # rows follow the table; the cells' mean is close to the chip's embedding
    table = pq.read_table(out / "embeddings.parquet")
    vectors = embedding_matrix(table)
    mean = spatial.astype(np.float32).mean(axis=(1, 2))
    cosine = (mean * vectors).sum(1) / np.linalg.norm(mean, axis=1) / np.linalg.norm(vectors, axis=1)
    assert (cosine > 0.99).all()
    kept = pq.read_table(lake / f"chips/region=candeias/date={date}/chips.parquet").to_pylist()
    dn, scl = read_datacube_and_scl(lake / kept[0]["datacube_path"])
    np.testing.assert_allclose(clear[0], cell_clear_fraction(dn[None], scl[None], 16)[0], atol=1e-3)

    torch.manual_seed(0)
    config = ClayConfig(name="clay-tiny", dim=32, depth=1, heads=2, dim_head=16)
    clay = ClayEncoder(ClayEncoderModel(config), checkpoint_digest="test")
    embed_partition(lake, "candeias", date.isoformat(), clay, batch_size=4, spatial_grid=8,
                    patch_embeddings=True)
    spatial, patches = np.load(out / "spatial.npy"), np.load(out / "patches.npy")
    assert spatial.shape == (stats.count, 8, 8, 32) and np.load(out / "spatial_valid.npy").shape[1:] == (8, 8)
    # 32 x 32 patch tokens pooled 4 x 4: cell (0, 0) is the mean of the first 4 tokens of 4 rows
    tokens = patches.astype(np.float32).reshape(stats.count, 32, 32, 32)
    np.testing.assert_allclose(spatial[:, 0, 0], tokens[:, :4, :4].mean(axis=(1, 2)), atol=2e-2)

    embed_partition(lake, "candeias", date.isoformat(), rcf, batch_size=4, spatial_grid=0)
    assert not (out / "spatial.npy").exists()
    assert read_json_metadata(out / "embeddings.parquet", "emb")["spatial"] is None
    with pytest.raises(EmbeddingError, match="does not divide"):
        embed_partition(lake, "candeias", date.isoformat(), rcf, batch_size=4, spatial_grid=7)


def test_encoder_resource_passes_the_spatial_grid_to_the_worker():
    extras = EncoderResource(spatial_grid=8).worker_extras("/lake", [("jamari", "2021-06-01")])
    assert extras["spatial_grid"] == 8
    defaults = EncoderResource().worker_extras("/lake", [("jamari", "2021-06-01")])
    assert (defaults["spatial_grid"], defaults["readers"], defaults["compile"]) == (16, -1, False)
    extras = EncoderResource(readers=3, compile=True).worker_extras("/lake", [("jamari", "2021-06-01")])
    assert (extras["readers"], extras["compile"]) == (3, True)
    assert extras["partitions"] == [{"region": "jamari", "date": "2021-06-01"}]


@pytest.mark.slow  # ~15 s: a tiny Clay over one partition four ways, two reader processes
def test_reader_processes_device_pooling_and_padding_give_the_same_outputs(
    tiny_sample, instance, resources
):
    """The worker's paths agree: one reader thread vs reader processes, tokens pooled by the
    encoder vs from the full token tensor, and a compiled encoder's padded last batch."""
    import torch

    from geofm_assets.models.clay import ClayConfig, ClayEncoder, ClayEncoderModel

    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
    out = lake / f"embeddings/region=candeias/date={date}"
    torch.manual_seed(0)
    clay = ClayEncoder(ClayEncoderModel(ClayConfig(name="clay-tiny", dim=32, depth=1, heads=2, dim_head=16)),
                       checkpoint_digest="test")

    def run(**kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stats = embed_partition(lake, "candeias", date.isoformat(), clay, batch_size=3, spatial_grid=8,
                                log=lambda _m: None, **kwargs)
        assert stats.count >= 4, "the partition must span a partial last batch"
        return (embedding_matrix(pq.read_table(out / "embeddings.parquet")),
                np.load(out / "spatial.npy").astype(np.float32), np.load(out / "spatial_valid.npy"))

    reference = run(readers=0, patch_embeddings=True)  # pooled on the CPU from all tokens
    processes = run(readers=2)
    clay.compiled = True  # as if compiled: batches padded to batch_size, rows sliced back
    padded = run(readers=0)
    clay.compiled = False
    for got in (processes, padded):
        np.testing.assert_allclose(got[0], reference[0], atol=1e-5)
        np.testing.assert_allclose(got[1], reference[1], atol=2e-3)
        np.testing.assert_array_equal(got[2], reference[2])


def test_a_corrupt_datacube_in_a_reader_process_names_the_chip_and_writes_nothing(
    tiny_sample, instance, resources
):
    from geofm_assets.models import build_encoder

    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
    row = pq.read_table(lake / f"chips/region=candeias/date={date}/chips.parquet").to_pylist()[-1]
    path = lake / row["datacube_path"]
    path.write_bytes(path.read_bytes()[:2000])  # truncated
    with pytest.raises(EmbeddingError, match=re.escape(row["chip_id"])):
        embed_partition(lake, "candeias", date.isoformat(), build_encoder("rcf"), batch_size=2,
                        readers=2, log=lambda _m: None)
    assert not (lake / f"embeddings/region=candeias/date={date}").exists()


def test_a_clay_encoder_giving_nan_fails_the_batch_naming_its_chips(tiny_sample, instance, resources):
    import torch

    from geofm_assets.models.clay import ClayConfig, ClayEncoder, ClayEncoderModel

    date, lake = chip_first_clear_date(tiny_sample, instance, resources)
    model = ClayEncoderModel(ClayConfig(name="clay-tiny", dim=32, depth=1, heads=2, dim_head=16))
    with torch.no_grad():
        model.cls_token.fill_(float("nan"))
    clay = ClayEncoder(model, checkpoint_digest="test")
    first = pq.read_table(lake / f"chips/region=candeias/date={date}/chips.parquet")["chip_id"][0].as_py()
    for grid in (8, 0):  # the pooled path and the embeddings-only path
        with pytest.raises(EmbeddingError, match=re.escape(first)):
            embed_partition(lake, "candeias", date.isoformat(), clay, batch_size=3, spatial_grid=grid,
                            log=lambda _m: None)
    assert not (lake / f"embeddings/region=candeias/date={date}").exists()
