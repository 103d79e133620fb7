"""File formats of the store: Parquet tables, COCO RLE masks and sharded Zarr v3 arrays.

Everything here is readable from a notebook with pyarrow / pycocotools / zarr alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from partdistill.storage.atomic import atomic_path

# --- Parquet ---------------------------------------------------------------------------------


def write_parquet(
    path: Path | str,
    table: pa.Table | Mapping[str, Sequence[Any]],
    schema: pa.Schema | None = None,
) -> Path:
    """Write a table atomically. Output bytes depend only on the data (no timestamps)."""
    if not isinstance(table, pa.Table):
        table = pa.table(dict(table), schema=schema)
    elif schema is not None:
        table = table.cast(schema)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_parquet(path: Path | str) -> pa.Table:
    return pq.read_table(path)


# --- COCO RLE --------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool/uint8 (H, W) → COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    # any nonzero value is inside: pycocotools would treat 2 as a run break, not as "inside"
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) → bool (H, W)."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


def rle_area(rle: Mapping[str, Any]) -> int:
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return int(mask_utils.area(encoded))


# --- Zarr v3, sharded ------------------------------------------------------------------------


class ShardedArrayWriter:
    """A 2-D (rows, channels) Zarr v3 array with the sharding codec, written one whole shard at
    a time.

    Zarr's docs warn that concurrent partial writes to one shard lose data: a shard is one file
    and each partial write rewrites it. So every write here must cover exactly one whole shard
    (the last may be short), which makes shards the unit of work, resume and parallelism.
    """

    def __init__(
        self,
        path: Path | str,
        rows: int,
        channels: int,
        shard_rows: int = 65536,
        chunk_rows: int = 4096,
        dtype: str = "float16",
        clevel: int = 3,
    ):
        import zarr
        from zarr.codecs import BloscCodec

        if shard_rows % chunk_rows:
            raise ValueError(f"shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
        self.path, self.rows = Path(path), rows
        # A small array gets one shard of its own size; shards stay whole multiples of chunks.
        chunk = min(chunk_rows, max(rows, 1))
        self.shard_rows = min(shard_rows, -(-max(rows, 1) // chunk) * chunk)
        if (self.path / "zarr.json").exists():
            self.array = zarr.open_array(str(self.path), mode="r+")
            if self.array.shape != (rows, channels):
                raise ValueError(f"{self.path} exists with shape {self.array.shape}, expected {(rows, channels)}")
        else:
            self.array = zarr.create_array(
                store=str(self.path),
                shape=(rows, channels),
                chunks=(chunk, channels),
                shards=(self.shard_rows, channels),
                dtype=dtype,
                compressors=BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle"),
                zarr_format=3,
                fill_value=0,
            )

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.shard_rows))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def shard_file(self, index: int) -> str:
        """The shard's file, relative to the array folder (what a completion marker lists)."""
        return f"c/{index}/0"

    def write_shard(self, index: int, data: np.ndarray) -> None:
        start, stop = self.shard_range(index)
        if data.shape != (stop - start, self.array.shape[1]):
            raise ValueError(
                f"shard {index} of {self.path} covers rows {start}:{stop}; got data of shape {data.shape}"
            )
        self.array[start:stop] = data


def open_array(path: Path | str):
    """Open a stored Zarr array read-only."""
    import zarr

    return zarr.open_array(str(path), mode="r")
