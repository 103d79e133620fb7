"""The versioned artifact store.

Layout::

    <root>/<stage>/<version>/manifest.json     what made it, and a sha256 + size per file
    <root>/<stage>/<version>/...               the stage's files
    <root>/<stage>/.partial-<version>/         a stage being written (never read by consumers)
    <root>/<stage>/.partial-<version>/_shards/ one completion marker per finished shard
    <root>/<stage>/.locks/<version>.lock       held (flock) by the one process writing that version

A version is a content hash of the stage name, the stage's own config section, the versions of
its inputs and the stage's code version, so equal inputs give an equal version and the stage is
skipped. The partial folder is kept across crashes on purpose: its shard markers let a killed
run resume at its first unfinished shard. Committing renames it to the final folder in one step,
so a reader sees either no artifact or a whole one.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partdistill.faults import kill_point
from partdistill.storage.atomic import (
    StoreWriteError,
    canonical_json,
    fsync_dir,
    sha256_file,
    write_json_atomic,
)

MANIFEST = "manifest.json"
SHARDS_DIR = "_shards"
PLAN = "_plan"  # in SHARDS_DIR (not *.json, which are the markers): the names of every shard the stage will write
PARTIAL_PREFIX = ".partial-"
VERSION_CHARS = 16


def content_version(
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    code_version: str,
) -> str:
    """The artifact version: a short sha256 of everything that determines the stage's output."""
    payload = canonical_json(
        {"stage": stage, "config": config, "inputs": dict(inputs), "code_version": code_version}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:VERSION_CHARS]


class ArtifactNotFound(FileNotFoundError):
    pass


class EvaluationOnlyFile(PermissionError):
    """A training stage asked for a file that only evaluation may read (part ground truth)."""


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`ArtifactStore.verify`."""

    stage: str
    version: str
    kind: str  # "changed" | "missing" | "extra" | "manifest"
    path: str
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.stage}/{self.version}: {self.kind} {self.path}{extra}"


@dataclass(frozen=True)
class Artifact:
    """A complete, committed artifact: read-only from here on."""

    stage: str
    version: str
    path: Path
    manifest: dict[str, Any]
    # Files this view refuses to hand out (part ground truth, for every stage but evaluation).
    hidden: frozenset[str] = frozenset()

    def file(self, name: str) -> Path:
        if name in self.hidden:
            raise EvaluationOnlyFile(
                f"{name} in {self.stage}/{self.version} is evaluation-only (part ground truth); "
                "training stages may not read it"
            )
        path = self.path / name
        if not path.exists():
            raise ArtifactNotFound(f"{self.stage}/{self.version} has no file {name!r} ({path})")
        return path

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def restricted(self, hidden: Iterable[str]) -> Artifact:
        return Artifact(self.stage, self.version, self.path, self.manifest, frozenset(hidden))


class LockTimeout(TimeoutError):
    pass


class _FileLock:
    """An exclusive flock; the kernel drops it when the holder dies, even by SIGKILL."""

    def __init__(self, path: Path, timeout: float | None, poll: float = 0.2):
        self.path, self.timeout, self.poll = path, timeout, poll
        self._fd: int | None = None

    def acquire(self, on_wait=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if not told and on_wait is not None:
                    on_wait(holder)
                    told = True
                if self.timeout is not None and time.monotonic() - start > self.timeout:
                    os.close(fd)
                    raise LockTimeout(f"{self.path} is held by another run (pid {holder})") from None
                time.sleep(self.poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class ArtifactWriter:
    """Writes one stage version into its partial folder, shard by shard, then commits it.

    Use through :meth:`ArtifactStore.writer`, which holds the version's lock for the writer's life.
    """

    store: ArtifactStore
    stage: str
    version: str
    config: dict[str, Any]
    inputs: dict[str, str]
    code_version: str
    extra_manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The partial folder: stage code writes its files here."""
        return self.store.partial_path(self.stage, self.version)

    def _marker(self, shard: str) -> Path:
        return self.path / SHARDS_DIR / f"{shard}.json"

    def shard_done(self, shard: str) -> bool:
        """True when the shard's marker exists and every file it lists is intact."""
        marker = self._marker(shard)
        if not marker.exists():
            return False
        record = json.loads(marker.read_text())
        for name, meta in record["files"].items():
            p = self.path / name
            if not p.exists() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                return False
        return True

    def shard_meta(self, shard: str) -> Any:
        """What :meth:`complete_shard` stored with the shard (e.g. its annotation fragment)."""
        return json.loads(self._marker(shard).read_text())["meta"]

    def complete_shard(self, shard: str, files: Iterable[str] = (), meta: Any = None) -> None:
        """Mark a shard finished; ``files`` are its outputs relative to :attr:`path`."""
        kill_point("shard-marker")
        record = {"files": {}, "meta": meta}
        for name in sorted(files):
            p = self.path / name
            record["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._marker(shard), record, durable=True)

    def plan_shards(self, names: Iterable[str]) -> None:
        """Record the shards this stage will write, so that a status view can say "3/5 done"."""
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / SHARDS_DIR / PLAN, sorted(names))

    def done_shards(self) -> list[str]:
        d = self.path / SHARDS_DIR
        return sorted(p.stem for p in d.glob("*.json") if p.name != PLAN) if d.exists() else []

    def commit(
        self, full_config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Checksum every file, write the manifest, rename partial → final, atomically."""
        root = self.path
        shutil.rmtree(root / SHARDS_DIR, ignore_errors=True)
        for leftover in root.rglob(".*.tmp"):
            leftover.unlink()
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[p.relative_to(root).as_posix()] = {
                    "sha256": sha256_file(p),
                    "bytes": p.stat().st_size,
                }
        manifest = {
            "stage": self.stage,
            "version": self.version,
            "status": "complete",
            "config": self.config,
            "merged_config": dict(full_config) if full_config is not None else None,
            "inputs": self.inputs,
            "code_version": self.code_version,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": files,
            **self.extra_manifest,
            **dict(extra or {}),
        }
        write_json_atomic(root / MANIFEST, manifest, durable=True)
        kill_point("commit")
        final = self.store.path(self.stage, self.version)
        try:
            os.rename(root, final)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise StoreWriteError(err.errno, f"{final} already exists; refusing to overwrite") from err
            raise StoreWriteError(err.errno, f"could not commit {root} → {final}: {err.strerror}") from err
        fsync_dir(final.parent)
        return self.store.open(self.stage, self.version)


class ArtifactStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # --- paths -----------------------------------------------------------------------------
    def path(self, stage: str, version: str) -> Path:
        return self.root / stage / version

    def partial_path(self, stage: str, version: str) -> Path:
        return self.root / stage / f"{PARTIAL_PREFIX}{version}"

    def lock_path(self, stage: str, version: str) -> Path:
        return self.root / stage / ".locks" / f"{version}.lock"

    # --- reading ---------------------------------------------------------------------------
    def is_complete(self, stage: str, version: str) -> bool:
        m = self.path(stage, version) / MANIFEST
        if not m.exists():
            return False
        try:
            return json.loads(m.read_text()).get("status") == "complete"
        except json.JSONDecodeError:
            return False

    def open(self, stage: str, version: str) -> Artifact:
        if not self.is_complete(stage, version):
            raise ArtifactNotFound(
                f"no complete artifact {stage}/{version} in {self.root}"
                + (" (a partial one exists: run the stage to resume it)"
                   if self.partial_path(stage, version).exists() else "")
            )
        manifest = json.loads((self.path(stage, version) / MANIFEST).read_text())
        return Artifact(stage, version, self.path(stage, version), manifest)

    def stages(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, stage: str) -> list[str]:
        """Complete versions of a stage, oldest first."""
        d = self.root / stage
        if not d.exists():
            return []
        found = [p.name for p in d.iterdir() if not p.name.startswith(".") and self.is_complete(stage, p.name)]
        return sorted(found, key=lambda v: self.open(stage, v).manifest["created"])

    def partial_progress(self, stage: str, version: str) -> tuple[int, int | None]:
        """(shards done, shards planned or None) of a partial artifact."""
        d = self.partial_path(stage, version) / SHARDS_DIR
        if not d.exists():
            return 0, None
        done = sum(1 for p in d.glob("*.json") if p.name != PLAN)
        try:
            planned = len(json.loads((d / PLAN).read_text()))
        except (OSError, json.JSONDecodeError):
            planned = None
        return done, planned

    def partial_versions(self, stage: str) -> list[str]:
        d = self.root / stage
        if not d.exists():
            return []
        return sorted(p.name[len(PARTIAL_PREFIX):] for p in d.glob(f"{PARTIAL_PREFIX}*"))

    # --- writing ---------------------------------------------------------------------------
    def writer(
        self,
        stage: str,
        version: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        code_version: str,
        extra_manifest: Mapping[str, Any] | None = None,
        lock_timeout: float | None = None,
        on_wait=None,
    ) -> _WriterSession:
        """A context manager yielding an :class:`ArtifactWriter`, or ``None`` when another run
        completed this version while we waited for its lock (then just read it)."""
        return _WriterSession(
            self,
            ArtifactWriter(self, stage, version, json.loads(canonical_json(config)), dict(inputs),
                           code_version, dict(extra_manifest or {})),
            lock_timeout,
            on_wait,
        )

    # --- garbage collection -----------------------------------------------------------------
    def gc(self, older_than: float = 0.0, keep: set[tuple[str, str]] | None = None,
           dry_run: bool = False) -> list[GcItem]:
        """Remove partial folders that no run is writing (their lock is free) and that are at
        least ``older_than`` seconds old; with ``keep`` (a set of (stage, version)), also remove
        complete versions not in it. A partial folder is what a killed run resumes from, so it
        is only garbage once you will not rerun that version."""
        items: list[GcItem] = []
        now = time.time()
        for stage in self.stages():
            for version in self.partial_versions(stage):
                path = self.partial_path(stage, version)
                lock = _FileLock(self.lock_path(stage, version), timeout=0)
                try:
                    lock.acquire()
                except LockTimeout as err:
                    items.append(GcItem(path, _tree_bytes(path), "kept", f"in use: {err}"))
                    continue
                try:
                    age = now - max((p.stat().st_mtime for p in [path, *path.rglob("*")]), default=now)
                    if age < older_than:
                        items.append(GcItem(path, _tree_bytes(path), "kept",
                                            f"modified {age / 3600:.1f} h ago (< --older-than)"))
                        continue
                    size = _tree_bytes(path)
                    if not dry_run:
                        shutil.rmtree(path)
                    items.append(GcItem(path, size, "would remove" if dry_run else "removed",
                                        "partial artifact no run is writing"))
                finally:
                    lock.release()
            if keep is not None:
                for version in self.versions(stage):
                    if (stage, version) in keep:
                        continue
                    path = self.path(stage, version)
                    size = _tree_bytes(path)
                    if not dry_run:
                        # rename first: a reader sees the whole artifact or none of it
                        doomed = path.with_name(f".gc-{version}")
                        os.rename(path, doomed)
                        shutil.rmtree(doomed)
                    items.append(GcItem(path, size, "would remove" if dry_run else "removed",
                                        "complete version no given config uses"))
        return items

    # --- integrity -------------------------------------------------------------------------
    def verify(self, stage: str | None = None, version: str | None = None) -> list[Problem]:
        """Compare every complete artifact (or the one named) with its manifest.

        Finds files whose bytes changed, files that are missing and files the manifest does
        not list."""
        problems: list[Problem] = []
        targets = (
            [(stage, version)] if stage and version
            else [(s, v) for s in ([stage] if stage else self.stages()) for v in self.versions(s)]
        )
        for s, v in targets:
            root = self.path(s, v)
            try:
                manifest = json.loads((root / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError) as err:
                problems.append(Problem(s, v, "manifest", MANIFEST, str(err)))
                continue
            listed = manifest.get("files", {})
            for name, meta in sorted(listed.items()):
                p = root / name
                if not p.is_file():
                    problems.append(Problem(s, v, "missing", name))
                elif p.stat().st_size != meta["bytes"]:
                    problems.append(Problem(s, v, "changed", name,
                                            f"{p.stat().st_size} bytes, manifest says {meta['bytes']}"))
                elif sha256_file(p) != meta["sha256"]:
                    problems.append(Problem(s, v, "changed", name, "sha256 differs"))
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_file() and rel != MANIFEST and rel not in listed:
                    problems.append(Problem(s, v, "extra", rel))
        return problems


@dataclass(frozen=True)
class GcItem:
    """One thing :meth:`ArtifactStore.gc` removed (or would remove, in a dry run) or kept."""

    path: Path
    bytes: int
    action: str  # "removed" | "would remove" | "kept"
    reason: str


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class _WriterSession:
    def __init__(self, store: ArtifactStore, writer: ArtifactWriter, lock_timeout, on_wait):
        self.store, self.writer = store, writer
        self.lock = _FileLock(store.lock_path(writer.stage, writer.version), lock_timeout)
        self.on_wait = on_wait

    def __enter__(self) -> ArtifactWriter | None:
        self.lock.acquire(self.on_wait)
        if self.store.is_complete(self.writer.stage, self.writer.version):
            return None
        try:
            self.writer.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self.lock.release()
            raise StoreWriteError(err.errno, f"could not create {self.writer.path}: {err.strerror}") from err
        return self.writer

    def __exit__(self, exc_type, exc, tb) -> None:
        # On failure the partial folder stays: its finished shards are what a rerun resumes from.
        # An empty one (the stage failed before writing anything) is just clutter.
        partial = self.writer.path
        if exc_type is not None and partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
        self.lock.release()
