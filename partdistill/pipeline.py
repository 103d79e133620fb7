"""Planning and running stages against the store, with no orchestrator in the way.

``plan`` turns a merged config into stage versions; ``run_stage`` runs one stage unless its
version is already complete. The Prefect flow (``partdistill.flows.pipeline``) calls exactly
these, one task per stage; ``run_pipeline`` calls them in a plain loop for notebooks and tests.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import partdistill
from partdistill.parallel import ShardMapper, check_runtime, open_mapper
from partdistill.progress import NullProgress, ProgressSink
from partdistill.stagelog import log_path, stage_log
from partdistill.stages import STAGES, StageContext
from partdistill.storage import ArtifactNotFound, ArtifactStore, content_version


class PipelineError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlannedStage:
    name: str                # where it is stored: the stage's name, or ``{stage}_r{n}`` for a round
    version: str
    inputs: dict[str, str]   # upstream planned name → version
    config: dict[str, Any]   # the stage's config section
    code_version: str
    stage: str = ""          # the registered stage (default: ``name``)
    round: int | None = None
    # upstream planned name → the key the stage finds it under in ``ctx.inputs`` (default: the name)
    input_keys: dict[str, str] = field(default_factory=dict)

    @property
    def stage_name(self) -> str:
        return self.stage or self.name


def round_name(stage: str, n: int) -> str:
    """Where round ``n`` of a stage run in rounds is stored: ``{stage}_r{n}``."""
    return f"{stage}_r{n}"


@dataclass
class StageOutcome:
    stage: str
    version: str
    state: str               # "computed" | "skipped" (already complete) | "reused" (another run made it)
    path: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(cfg: Mapping[str, Any]) -> list[PlannedStage]:
    """Every stage with its version, in run order. Versions chain: a stage's version hashes its
    upstream versions, so a config change reaches everything downstream and nothing upstream."""
    try:  # runtime settings enter no version, but one that cannot work fails here, before any work
        check_runtime(cfg.get("runtime", {}))
    except ValueError as err:
        raise PipelineError(str(err)) from None
    versions: dict[str, str] = {}
    stored_as: dict[str, str] = {}  # stage → the planned name downstream stages read (a stage's last round)
    planned = []
    for name, stage in STAGES.items():
        if name not in cfg:
            raise PipelineError(f"config has no section '{name}' (stage {name})")
        section = dict(cfg[name])
        upstream = stage.upstream_for(section, cfg) if stage.upstream_for else stage.upstream
        inputs = {stored_as[up]: versions[stored_as[up]] for up in upstream}
        keys = {stored_as[up]: up for up in upstream}
        # only a non-empty fingerprint enters the hash, so adding one to a stage keeps old versions
        fingerprint = stage.fingerprint(section) if stage.fingerprint else {}
        hashed = stage.relevant(section, cfg) if stage.relevant else section
        hashed = {**hashed, "_fingerprint": fingerprint} if fingerprint else hashed
        if stage.rounds is None:
            versions[name] = content_version(name, hashed, inputs, stage.code_version)
            stored_as[name] = name
            planned.append(PlannedStage(name, versions[name], inputs, section, stage.code_version, name, None, keys))
            continue
        n_rounds = stage.rounds(section)
        if not isinstance(n_rounds, int) or n_rounds < 1:
            raise PipelineError(f"{name}: the number of rounds must be an integer >= 1, got {n_rounds!r}")
        hashed = {k: v for k, v in hashed.items() if k not in stage.round_keys}
        previous = None
        for n in range(1, n_rounds + 1):
            rname = round_name(name, n)
            rinputs, rkeys = dict(inputs), dict(keys)
            if previous is not None:
                rinputs[previous], rkeys[previous] = versions[previous], name
            rhashed = hashed if n > 1 else {k: v for k, v in hashed.items() if k not in stage.later_round_keys}
            versions[rname] = content_version(name, {**rhashed, "_round": n}, rinputs, stage.code_version)
            planned.append(PlannedStage(rname, versions[rname], rinputs, section, stage.code_version, name, n, rkeys))
            previous = rname
        stored_as[name] = previous
    return planned


def select(planned: list[PlannedStage], until: str | None = None, only: str | None = None) -> list[PlannedStage]:
    """The stages to run. A stage run in rounds is named by its stage name (all its rounds) or by
    a round's name, ``proposals_r2`` say (that round: with ``--only``, it alone)."""
    names = [p.name for p in planned]
    stages = list(dict.fromkeys(p.stage_name for p in planned))
    known = list(dict.fromkeys(stages + names))
    for opt, value in (("--until", until), ("--only", only)):
        if value is not None and value not in known:
            raise PipelineError(f"{opt} {value!r}: no such stage; stages are {', '.join(known)}")
    if until and only:
        raise PipelineError("give --until or --only, not both")
    if only:
        return [p for p in planned if only in (p.name, p.stage_name)]
    if until:
        # the target and what it needs, transitively: a stage the target does not read is not run
        by_name = {p.name: p for p in planned}
        if until not in by_name:  # a stage run in rounds: up to its last round
            until = [p.name for p in planned if p.stage_name == until][-1]
        needed, todo = set(), [until]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(by_name[name].inputs)
        return [p for p in planned if p.name in needed]
    return list(planned)


def store_for(cfg: Mapping[str, Any], store: str | Path | None = None) -> ArtifactStore:
    return ArtifactStore(store if store is not None else cfg.get("runtime", {}).get("store", "store"))


@functools.lru_cache(maxsize=1)
def code_info() -> dict[str, Any]:
    """What code made an artifact: package version, git commit (and whether it was dirty)."""
    info: dict[str, Any] = {"package": partdistill.__version__, "python": platform.python_version()}
    repo = Path(partdistill.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"], info["git_dirty"] = commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def run_stage(
    store: ArtifactStore,
    planned: PlannedStage,
    cfg: Mapping[str, Any],
    progress: ProgressSink | None = None,
    on_wait: Callable[[str], None] | None = None,
    mapper: ShardMapper | None = None,
) -> StageOutcome:
    """Run one stage unless its version is complete. Upstream artifacts must exist. ``mapper``
    runs the stage's shards (:func:`partdistill.parallel.open_mapper`); None: in this process."""
    stage = STAGES[planned.stage_name]
    path = str(store.path(planned.name, planned.version))
    if store.is_complete(planned.name, planned.version):
        return StageOutcome(planned.name, planned.version, "skipped", path,
                            summary=store.open(planned.name, planned.version).manifest.get("summary", {}))
    inputs = {}
    for up, version in planned.inputs.items():
        try:
            artifact = store.open(up, version)
        except ArtifactNotFound as err:
            raise PipelineError(
                f"stage '{planned.name}' needs {up}/{version}, which is not in {store.root}; "
                f"run the pipeline up to '{up}' first (without --only)"
            ) from err
        hidden = () if stage.reads_evaluation_only else artifact.manifest.get("evaluation_only", ())
        inputs[planned.input_keys.get(up, up)] = artifact.restricted(hidden)

    runtime = cfg.get("runtime", {})
    start = time.monotonic()
    try:
        return _write_stage(store, planned, cfg, stage, inputs, runtime, progress, on_wait, path, start,
                            mapper)
    except Exception as err:
        code = _store_errno(err)
        if code is None or isinstance(err, PipelineError):
            raise
        raise StoreWriteFailed(store, planned, err, code) from err


# Write failures that are the store's (its disk or its permissions), not the stage's.
_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _store_errno(err: BaseException) -> int | None:
    """The errno of a store write failure in ``err`` or its causes. Libraries that write files
    (torch.save, Arrow, Zarr) often re-raise ENOSPC as their own error with only the message."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _STORE_ERRNOS:
            return err.errno
        text = str(err)
        for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            if os.strerror(code) in text:
                return code
        err = err.__cause__ or err.__context__
    return None


class StoreWriteFailed(PipelineError):
    """A stage could not be written into the store: the disk is full, the store is read-only,
    or a file is over a size limit. Says where, how much space is left, and what was kept."""

    def __init__(self, store: ArtifactStore, planned: PlannedStage, err: BaseException, code: int):
        import shutil

        self.errno = code
        where = getattr(err, "filename", None) or store.root
        try:
            free = f"{shutil.disk_usage(store.root).free / 2**20:.1f} MiB free on that file system"
        except OSError:
            free = "free space unknown"
        partial = store.partial_path(planned.name, planned.version)
        kept = (f"finished shards are kept in {partial} and a rerun resumes from them"
                if partial.exists() else "nothing of it was kept")
        what = {errno.EROFS: "the store is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EFBIG: "a file is over the size limit"}.get(
                    code, "the disk is full")
        super().__init__(
            f"could not write stage '{planned.name}' ({planned.version}) into {store.root}: {what} "
            f"({os.strerror(code)} at {where}; {free}). Complete artifacts are untouched and no partial "
            f"artifact is visible; {kept}. Free space (`partdistill gc` removes stale partial folders) or "
            f"point --store at a writable location, then rerun.")


def _write_stage(store, planned, cfg, stage, inputs, runtime, progress, on_wait, path, start,
                 mapper=None) -> StageOutcome:
    with store.writer(planned.name, planned.version, planned.config, planned.inputs, planned.code_version,
                      lock_timeout=runtime.get("lock_timeout"), on_wait=on_wait) as writer:
        if writer is None:
            return StageOutcome(planned.name, planned.version, "reused", path,
                                summary=store.open(planned.name, planned.version).manifest.get("summary", {}))
        ctx = StageContext(planned.stage_name, planned.version, planned.config, dict(cfg), inputs, writer,
                           progress or NullProgress(), planned.round, mapper)
        # library chatter (pycocotools, mmengine, torch warnings) to store/<stage>/.logs/<version>.log
        with stage_log(log_path(store.root, planned.name, planned.version)):
            summary = stage.run(ctx) or {}
        writer.commit(cfg, extra={
            "summary": summary,
            "evaluation_only": list(stage.evaluation_only_outputs),
            "code": code_info(),
        })
    return StageOutcome(planned.name, planned.version, "computed", path, time.monotonic() - start, summary)


def run_pipeline(
    cfg: Mapping[str, Any],
    store: ArtifactStore | None = None,
    until: str | None = None,
    only: str | None = None,
    progress: ProgressSink | None = None,
) -> list[StageOutcome]:
    """Run the selected stages in order in this process (no Prefect; but with
    ``runtime.task_runner`` 'dask' or 'ray' the shards of sharded stages run on that cluster as
    Prefect tasks)."""
    store = store or store_for(cfg)
    selected = select(plan(cfg), until, only)
    with open_mapper(cfg.get("runtime", {})) as mapper:
        return [run_stage(store, p, cfg, progress, mapper=mapper) for p in selected]


def status(cfg: Mapping[str, Any], store: ArtifactStore) -> list[dict[str, Any]]:
    """One row per planned stage: version, state (complete, partial with its finished shards,
    stale when only other versions exist, missing, not built yet), size, creation time."""
    rows = []
    for p in plan(cfg):
        row: dict[str, Any] = {"stage": p.name, "version": p.version, "state": "missing", "bytes": None,
                               "created": None, "files": None}
        if store.is_complete(p.name, p.version):
            a = store.open(p.name, p.version)
            row.update(state="complete", bytes=a.bytes, created=a.manifest["created"], files=len(a.files))
        elif p.version in store.partial_versions(p.name):
            done, total = store.partial_progress(p.name, p.version)
            row.update(state=f"partial ({done}/{total} shards done)" if total else f"partial ({done} shards done)")
        elif not STAGES[p.stage_name].built:
            row.update(state="not built yet")
        elif store.versions(p.name):
            # another version is complete: this config (or an upstream) changed since it was made
            row.update(state=f"stale (have {', '.join(store.versions(p.name)[-2:])})")
        rows.append(row)
    return rows
