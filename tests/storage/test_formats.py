import numpy as np
import pytest
from pycocotools import mask as mask_utils

from partdistill.storage import (
    ShardedArrayWriter,
    mask_to_rle,
    open_array,
    read_parquet,
    rle_area,
    rle_to_mask,
    write_parquet,
)


def test_rle_round_trip_non_square():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = mask_to_rle(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), mask)
    assert rle_area(rle) == mask.sum()
    # the uncompressed COCO form decodes to the same mask
    uncompressed = {"size": [37, 53], "counts": _uncompressed_counts(mask)}
    assert np.array_equal(rle_to_mask(uncompressed), mask)
    # pycocotools agrees on IoU with itself after our round trip
    other = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert mask_utils.iou([other], [other], [0])[0, 0] == pytest.approx(1.0)


def _uncompressed_counts(mask):
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


def test_rle_rejects_3d():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 3, 4), bool))


def test_parquet_round_trip_is_byte_deterministic(tmp_path):
    data = {"instance_id": [1, 2, 3], "rle": ["a", "b", "c"], "score": [0.5, 0.25, 1.0]}
    write_parquet(tmp_path / "a.parquet", data)
    write_parquet(tmp_path / "b.parquet", data)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    table = read_parquet(tmp_path / "a.parquet")
    assert table.column("score").to_pylist() == [0.5, 0.25, 1.0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_sharded_zarr_writes_whole_shards_only(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((1000, 24)).astype(np.float16)
    z = ShardedArrayWriter(tmp_path / "f.zarr", rows=1000, channels=24, shard_rows=256, chunk_rows=64)
    assert z.num_shards == 4 and z.shard_range(3) == (768, 1000)
    for i in range(z.num_shards):
        a, b = z.shard_range(i)
        z.write_shard(i, data[a:b])
        assert (tmp_path / "f.zarr" / z.shard_file(i)).is_file()
    with pytest.raises(ValueError, match="covers rows 256:512"):
        z.write_shard(1, data[:100])
    back = open_array(tmp_path / "f.zarr")
    assert back.dtype == np.float16 and back.shape == (1000, 24)
    assert np.array_equal(back[:], data)
    meta = (tmp_path / "f.zarr" / "zarr.json").read_text()
    assert "sharding_indexed" in meta and "blosc" in meta and '"zarr_format": 3' in meta


def test_sharded_zarr_small_array_and_reopen(tmp_path):
    z = ShardedArrayWriter(tmp_path / "s.zarr", rows=10, channels=3, shard_rows=256, chunk_rows=64)
    assert z.num_shards == 1 and z.shard_rows == 10
    z.write_shard(0, np.ones((10, 3), np.float16))
    again = ShardedArrayWriter(tmp_path / "s.zarr", rows=10, channels=3)
    assert np.array_equal(again.array[:], np.ones((10, 3)))
    with pytest.raises(ValueError, match="exists with shape"):
        ShardedArrayWriter(tmp_path / "s.zarr", rows=11, channels=3)


def test_rle_treats_any_nonzero_as_inside():
    labels = np.array([[0, 1, 2], [2, 0, 1]], np.int32)
    assert np.array_equal(rle_to_mask(mask_to_rle(labels)), labels != 0)
