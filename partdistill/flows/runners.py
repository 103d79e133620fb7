"""Shards on a Dask or Ray cluster, as Prefect tasks (``runtime.task_runner`` 'dask' or 'ray').

:class:`PrefectShardMapper` is the cluster side of :mod:`partdistill.parallel`: it starts (or
connects to) the cluster through Prefect's task runner (prefect-dask ``DaskTaskRunner``,
prefect-ray ``RayTaskRunner``) the first time a stage maps shards, keeps it for the next stages
(each worker keeps its loaded teacher in its process cache), and stops it on exit.

Each shard is one Prefect task run (``{stage}-{shard}``), retried ``runtime.shard_retries`` times
with the delays ``runtime.shard_retry_delay_seconds``. At most ``4 × runtime.workers`` shards are
in flight at once, so that a huge stage neither floods the scheduler nor keeps thousands of
queued shards running after one fails.

Task runs report to the Prefect API of the driver. With no server configured the driver's
ephemeral API is used and its address handed to the local cluster's workers (otherwise every
worker would start its own ephemeral server on the same SQLite database). Workers of an existing
cluster must reach the API themselves: run a Prefect server and set ``PREFECT_API_URL`` on the
driver and the workers.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Mapping
from typing import Any

from partdistill.flows.settings import apply_prefect_defaults

apply_prefect_defaults()

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from partdistill.parallel import RAY_MISSING, check_runtime, run_shard  # noqa: E402


@task(cache_policy=NO_CACHE, task_run_name="{label}", persist_result=False)
def shard_task(fn, job, threads, label: str):
    """One shard of a stage, on a worker."""
    return run_shard(fn, job, threads)


def api_url() -> str:
    """The Prefect API the driver reports to; with none configured, its ephemeral server
    (started here if the driver has not started it yet)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def make_task_runner(runtime: Mapping[str, Any]):
    """The Prefect task runner that ``runtime`` asks for (not started)."""
    kind = check_runtime(runtime)
    address = runtime.get("cluster_address")
    workers = int(runtime.get("workers", 2) or 2)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        kwargs = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
                  **dict(runtime.get("cluster_kwargs") or {})}
        # the workers report their task runs to the driver's API (see the module docstring)
        kwargs["env"] = {"PREFECT_API_URL": api_url(), **dict(kwargs.get("env") or {})}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise RuntimeError(RAY_MISSING) from err
        if address:
            return RayTaskRunner(address=address)
        return RayTaskRunner(init_kwargs={"num_cpus": workers, "runtime_env": {
            "env_vars": {"PREFECT_API_URL": api_url(), "OMP_NUM_THREADS": "1"}}})
    raise ValueError(f"runtime.task_runner={kind!r} runs shards in this process: use partdistill.parallel.LocalMapper")


class PrefectShardMapper:
    """Maps shard functions over jobs as Prefect tasks on a Dask or Ray task runner."""

    in_process = False

    def __init__(self, runtime: Mapping[str, Any]):
        self.runtime = dict(runtime)
        self.kind = check_runtime(self.runtime)  # fails before any work: a bad setting, no prefect-ray
        self.threads = self.runtime.get("shard_threads", 1)
        self.retries = int(self.runtime.get("shard_retries", 2) or 0)
        delays = self.runtime.get("shard_retry_delay_seconds", [10, 60])
        self.delays = [float(d) for d in (delays if isinstance(delays, (list, tuple)) else [delays])] or [0.0]
        self.in_flight = 4 * int(self.runtime.get("workers", 2) or 2)
        self._runner = None
        self._environ: dict[str, str | None] = {}

    def __enter__(self) -> PrefectShardMapper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.__exit__(None, None, None)
            _restore_environ(self._environ)

    def runner(self):
        """The started task runner (the cluster starts, or is connected to, on first use)."""
        if self._runner is None:
            runner = make_task_runner(self.runtime)
            # what a Dask nanny will overwrite here when the (lazily started) cluster spawns workers
            self._environ = {k: os.environ.get(k) for k in _spawn_environ_keys(self.kind)}
            runner.__enter__()
            self._runner = runner
        return self._runner

    def map(self, fn, jobs, names=None):
        jobs = list(jobs)
        if not jobs:
            return
        names = list(names) if names is not None else [f"{getattr(fn, '__name__', 'shard')}-{i}"
                                                       for i in range(len(jobs))]
        runner = self.runner()
        shard = shard_task.with_options(retries=self.retries, retry_delay_seconds=self.delays)
        done: queue.Queue = queue.Queue()
        pending: dict[Any, int] = {}
        todo = iter(range(len(jobs)))

        def submit(i: int) -> None:
            future = runner.submit(shard, parameters={"fn": fn, "job": jobs[i], "threads": self.threads,
                                                      "label": names[i]})
            pending[future] = i
            future.add_done_callback(done.put)

        try:
            for i in todo:
                submit(i)
                if len(pending) >= self.in_flight:
                    break
            # A Dask nanny sets OMP_NUM_THREADS=1 etc. in *this* process's environment before it
            # spawns a worker (the first submit starts the cluster). Undo it, or every later
            # subprocess of the driver (torchrun's training processes, say) would run
            # single-threaded and train other bytes.
            _restore_environ(self._environ)
            while pending:
                future = done.get()
                i = pending.pop(future)
                result = future.result()  # re-raises the shard's error after its retries
                for j in todo:
                    submit(j)
                    break
                yield i, result
        finally:
            for future in pending:  # a failed shard (or a failed driver) stops what is still queued
                _cancel(future)


def _spawn_environ_keys(kind: str) -> list[str]:
    """The variables a local cluster's process spawner writes into the driver's environment."""
    if kind != "dask":
        return []
    import dask

    return list(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})


def _restore_environ(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _cancel(future: Any) -> None:
    wrapped = getattr(future, "wrapped_future", None)
    try:
        if hasattr(wrapped, "cancel"):
            wrapped.cancel()  # dask
        else:
            import ray

            ray.cancel(wrapped)
    except Exception:  # best effort: the shard's files are rewritten when its stage reruns
        pass
