from dagster import AssetKey, Definitions

from geofm_assets.definitions import defs, resources_for
from geofm_assets.partitions import region_date_partitions, region_partitions

TRAINED_HEADS = {AssetKey("landcover_classifier"), AssetKey("landcover_segmentation")}
REGION_LEVEL = {AssetKey("embedding_projections"), AssetKey("similarity_metrics"), AssetKey("change_maps")}


def test_defs_load_and_validate():
    Definitions.validate_loadable(defs)
    keys = set(defs.resolve_all_asset_keys())
    assert {AssetKey("sentinel2_tiles"), AssetKey("chips")} <= keys
    graph = defs.resolve_asset_graph()
    assert AssetKey("sentinel2_tiles") in graph.get(AssetKey("chips")).parent_keys
    for key in keys:
        expected = (region_partitions if key in REGION_LEVEL else None if key in TRAINED_HEADS
                    else region_date_partitions)
        assert graph.get(key).partitions_def == expected, key
        # ingest is started by the sensor or a backfill, training heads by a person; the rest follows
        assert graph.get(key).automation_condition is not None or key.path[0] in (
            "sentinel2_tiles", "chips", *(k.path[0] for k in TRAINED_HEADS)), (
            f"{key} does not follow its upstream declaratively")
        assert graph.get(key).check_keys, f"{key} has no asset check"


def test_partition_keys_are_date_then_region():
    assert region_date_partitions.partitions_defs[0].name == "date"
    assert region_date_partitions.partitions_defs[1].name == "region"


def test_unknown_environment_is_refused():
    import pytest

    with pytest.raises(ValueError, match=r"GEOFM_ENV='moon'.*local"):
        resources_for("moon")


def test_automation_is_declared_and_on_by_default():
    from dagster import DefaultSensorStatus

    sensors = {s.name: s for s in defs.sensors}
    assert sensors["geofm_automation"].default_status == DefaultSensorStatus.RUNNING
    assert sensors["scene_sensor"].default_status == DefaultSensorStatus.STOPPED


def test_backfills_batch_the_gpu_step_and_the_index_and_run_cpu_steps_one_partition_each():
    from geofm_assets.partitions import INDEX_BATCHES, ONE_PARTITION_PER_RUN, PARTITIONS_TOGETHER

    graph = defs.resolve_asset_graph()
    policies = {key.to_user_string(): graph.get(key).backfill_policy
                for key in defs.resolve_all_asset_keys()
                if graph.get(key).partitions_def == region_date_partitions}
    assert policies.pop("embeddings") == PARTITIONS_TOGETHER
    assert policies.pop("vector_index") == INDEX_BATCHES
    # distinct policies: a backfill of both makes separate runs (assets/batched.py says why)
    assert PARTITIONS_TOGETHER != INDEX_BATCHES
    assert policies and all(p == ONE_PARTITION_PER_RUN for p in policies.values()), policies
