"""Atomic file writes and hashing.

A reader must never see half a file: every write goes to a temporary name in the same folder
and is renamed over the target, which POSIX makes atomic within one file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from partdistill.faults import kill_point

_CHUNK = 1 << 20


class StoreWriteError(OSError):
    """Writing into the store failed (disk full, read-only, permissions); names the path."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On error the temporary file is removed and ``path`` keeps its old content (or stays absent).
    ``durable`` fsyncs the file before the rename, for files whose loss on power failure matters
    (manifests, shard markers).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        kill_point("atomic-write")
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text, hence equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_to_jsonable)


def write_json_atomic(path: Path | str, obj: Any, durable: bool = False) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_to_jsonable) + "\n"
    write_bytes_atomic(path, text.encode(), durable=durable)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    # numpy scalars and arrays, without importing numpy here
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):  # mmengine ConfigDict
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")
