import pytest

from geofm_assets.lake import PartitionKeyError
from geofm_assets.resources.lake import LocalLakeResource


def test_partition_is_replaced_whole_or_not_at_all(tmp_path):
    lake = LocalLakeResource(root=str(tmp_path))
    with lake.write_partition("chips", "jamari", "2021-06-01") as staging:
        (staging / "a.txt").write_text("first")
    final = lake.partition_dir("chips", "jamari", "2021-06-01")
    assert (final / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), lake.write_partition("chips", "jamari", "2021-06-01") as st:
        (st / "a.txt").write_text("half-written")
        raise RuntimeError("worker died")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["date=2021-06-01"]

    with lake.write_partition("chips", "jamari", "2021-06-01") as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


@pytest.mark.parametrize(
    ("region", "date", "message"),
    [
        ("../../etc", "2021-06-01", "not a valid partition key segment"),
        ("jamari/x", "2021-06-01", "not a valid partition key segment"),
        ("jamari", "2021-13-01", "not a YYYY-MM-DD"),
        ("jamari", "2021-06-01/../x", "not a YYYY-MM-DD"),
    ],
)
def test_partition_keys_with_path_characters_are_refused(tmp_path, region, date, message):
    lake = LocalLakeResource(root=str(tmp_path))
    with pytest.raises(PartitionKeyError, match=message):
        lake.partition_dir("chips", region, date)
