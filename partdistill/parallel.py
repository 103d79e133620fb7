"""Where a stage's shards run: in this process, or on a Dask or Ray cluster (scale-out).

A sharded stage (``instances``, ``features``, ``mining``, and the labelling of ``proposals`` and
``distill``) hands its unfinished shards to :meth:`StageContext.map_shards`: ``fn`` is a
module-level function and each job a picklable description of one shard (its input artifacts,
its config, the partial folder to write into). ``fn`` writes the shard's files into the writer's
partial folder with the store's atomic writes (a shared file system when the shard runs on
another machine) and returns a :class:`ShardDone`; the driver, which holds the version's lock,
marks the shard complete (``writer.complete_shard``) as each result comes back, so a killed run
still resumes at its first unfinished shard.

The runtime settings that choose the mapper (none of them enters any version, like every
``runtime`` setting; tests/test_pipeline.py and tests/test_parallel.py check it)::

    runtime.task_runner       'local' (this process) | 'dask' (prefect-dask) | 'ray' (prefect-ray)
    runtime.workers           worker processes of the local cluster started for 'dask' / 'ray'
    runtime.cluster_address   use an existing cluster instead: 'tcp://host:8786' (Dask),
                              'ray://host:10001' or 'auto' (Ray)
    runtime.cluster_kwargs    extra keyword arguments for the local Dask cluster (LocalCluster)
    runtime.shard_threads     torch threads while a shard runs, in this process and in workers
                              alike (float reductions depend on the thread count: 1 everywhere
                              makes a cluster run byte-identical to an in-process one); 0: leave as is
    runtime.shard_retries, runtime.shard_retry_delay_seconds
                              retries of a failed shard task on a cluster, and the delays between
                              them (a list: one delay per retry, the last one repeated)

This module imports no Prefect: the cluster mappers live in :mod:`partdistill.flows.runners`,
imported only when ``task_runner`` is not 'local'.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

TASK_RUNNERS = ("local", "dask", "ray")
RAY_MISSING = ("runtime.task_runner='ray' needs prefect-ray, which is not installed: "
               "pip install prefect-ray (it brings ray), or use runtime.task_runner='dask'")


@dataclass
class ShardDone:
    """What a shard function returns: the shard's marker name, its files (relative to the
    writer's partial folder) and the metadata its marker keeps (``writer.shard_meta``)."""

    name: str
    files: list[str] = field(default_factory=list)
    meta: Any = None


class ShardMapper(Protocol):
    in_process: bool  # whether shards run in this process (a stage may then use a local pool)

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
            names: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """``fn(job)`` for every job; yields (index into ``jobs``, result) as shards finish."""
        ...


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch intra-op threads (0 or None: unchanged): shards
    (``runtime.shard_threads``) and training (``runtime.train_threads``)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_shard(fn: Callable[[Any], Any], job: Any, threads: int | None) -> Any:
    """One shard, as every mapper runs it (same thread setting in this process and in workers)."""
    with torch_threads(threads):
        return fn(job)


class LocalMapper:
    """Shards in this process, one after the other, in order."""

    in_process = True

    def __init__(self, threads: int | None = 1):
        self.threads = threads

    def map(self, fn, jobs, names=None):
        for index, job in enumerate(jobs):
            yield index, run_shard(fn, job, self.threads)

    def __enter__(self) -> LocalMapper:
        return self

    def __exit__(self, *exc) -> None:
        clear_process_cache()  # the run is over: let its teacher go


def check_runtime(runtime: Mapping[str, Any]) -> str:
    """The task runner named by ``runtime``; raises ValueError for a setting that cannot work."""
    kind = runtime.get("task_runner", "local") or "local"
    if kind not in TASK_RUNNERS:
        raise ValueError(f"runtime.task_runner must be one of {', '.join(map(repr, TASK_RUNNERS))}, got {kind!r}")
    if kind == "ray":
        import importlib.util

        if importlib.util.find_spec("prefect_ray") is None:
            raise ValueError(RAY_MISSING)
    workers = runtime.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"runtime.workers must be an int >= 1, got {workers!r}")
    for key in ("shard_threads", "train_threads"):
        threads = runtime.get(key, 0)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
            raise ValueError(f"runtime.{key} must be an int >= 0 (0: leave torch's setting), got {threads!r}")
    return kind


def open_mapper(runtime: Mapping[str, Any]):
    """The shard mapper that ``runtime`` asks for, as a context manager (a cluster it starts is
    stopped on exit). A cluster is started lazily, on the first stage that maps shards."""
    kind = check_runtime(runtime)
    if kind == "local":
        return LocalMapper(runtime.get("shard_threads", 1))
    from partdistill.flows.runners import PrefectShardMapper

    return PrefectShardMapper(runtime)


_REGISTERED: dict[str, Any] = {}


@contextlib.contextmanager
def register_mapper(mapper: Any) -> Iterator[str]:
    """A key under which :func:`registered_mapper` finds ``mapper`` while the block runs: for a
    Prefect task, whose parameters must be plain data (they travel with every task it submits)."""
    import uuid

    key = uuid.uuid4().hex
    _REGISTERED[key] = mapper
    try:
        yield key
    finally:
        del _REGISTERED[key]


def registered_mapper(key: str) -> Any:
    return _REGISTERED[key]


# ------------------------------------------------------------------------------ per-process state
_CACHE: OrderedDict[Any, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 4


def process_cached(key: Any, factory: Callable[[], Any]) -> Any:
    """Heavy state (a teacher model, a feature extractor, a feature index) built once per process
    and kept for the next shards; ``key`` must say everything it depends on (for an artifact:
    its path and version, see :func:`artifact_key`). Least recently used entries beyond
    ``CACHE_SIZE`` are dropped."""
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        value = factory()
        _CACHE[key] = value
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        return value


def clear_process_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def artifact_key(artifact: Any) -> tuple[str, str]:
    """A committed artifact's identity for :func:`process_cached`: its folder and version."""
    return (str(artifact.path), str(artifact.version))


def job_artifact(artifact: Any) -> Any:
    """An artifact as a shard job carries it: path, version and hidden files, and of its manifest
    only the top-level files (a data artifact's manifest may list every image; a job is pickled
    once per shard)."""
    import dataclasses

    files = {k: v for k, v in artifact.manifest.get("files", {}).items() if "/" not in k}
    return dataclasses.replace(artifact, manifest={"stage": artifact.stage, "version": artifact.version,
                                                   "files": files})


def job_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`job_artifact` of every input artifact."""
    return {name: job_artifact(a) for name, a in inputs.items()}
