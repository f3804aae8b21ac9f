from dagster import AssetKey, Definitions

from geofm_assets.definitions import defs, resources_for
from geofm_assets.partitions import region_date_partitions


def test_defs_load_and_validate():
    Definitions.validate_loadable(defs)
    keys = set(defs.resolve_all_asset_keys())
    assert {AssetKey("sentinel2_tiles"), AssetKey("chips")} <= keys
    graph = defs.resolve_asset_graph()
    assert AssetKey("sentinel2_tiles") in graph.get(AssetKey("chips")).parent_keys
    for key in keys:
        assert graph.get(key).partitions_def == region_date_partitions
        assert graph.get(key).check_keys, f"{key} has no asset check"


def test_partition_keys_are_date_then_region():
    assert region_date_partitions.partitions_defs[0].name == "date"
    assert region_date_partitions.partitions_defs[1].name == "region"


def test_unknown_environment_is_refused():
    import pytest

    with pytest.raises(ValueError, match=r"GEOFM_ENV='moon'.*local"):
        resources_for("moon")
