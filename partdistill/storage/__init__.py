"""The versioned artifact store and its file formats. Knows nothing of stages or models."""

from partdistill.storage.atomic import (
    StoreWriteError,
    atomic_path,
    canonical_json,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from partdistill.storage.formats import (
    ShardedArrayWriter,
    mask_to_rle,
    open_array,
    read_parquet,
    rle_area,
    rle_to_mask,
    write_parquet,
)
from partdistill.storage.store import (
    Artifact,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactWriter,
    EvaluationOnlyFile,
    LockTimeout,
    Problem,
    content_version,
)

__all__ = [
    "Artifact",
    "ArtifactNotFound",
    "ArtifactStore",
    "ArtifactWriter",
    "EvaluationOnlyFile",
    "LockTimeout",
    "Problem",
    "ShardedArrayWriter",
    "StoreWriteError",
    "atomic_path",
    "canonical_json",
    "content_version",
    "mask_to_rle",
    "open_array",
    "read_parquet",
    "rle_area",
    "rle_to_mask",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet",
]
