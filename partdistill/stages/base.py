"""What a stage is: a plain function of (config section, input artifacts, output writer).

Stages import no Prefect, so they run the same from the CLI, from flows, notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from partdistill.parallel import LocalMapper, ShardMapper, torch_threads
from partdistill.progress import NullProgress, ProgressSink
from partdistill.storage import Artifact, ArtifactWriter


@dataclass
class StageContext:
    stage: str                      # the stage's name (a round's stage name, without ``_r{n}``)
    version: str
    config: dict[str, Any]          # the stage's own config section (what its version hashes)
    full_config: dict[str, Any]     # the whole merged config, for runtime settings
    inputs: dict[str, Artifact]     # upstream stage name → its committed artifact
    writer: ArtifactWriter          # write files under writer.path; mark shards as they finish
    progress: ProgressSink = field(default_factory=NullProgress)
    round: int | None = None        # 1, 2, ... for a stage run in rounds; None otherwise
    # where shards run (partdistill.parallel): None runs them here, in order
    mapper: ShardMapper | None = None

    @property
    def runtime(self) -> dict[str, Any]:
        return self.full_config.get("runtime", {})

    @property
    def shards_in_process(self) -> bool:
        """Whether :meth:`map_shards` runs shards in this process (not on a cluster)."""
        return self.mapper is None or bool(getattr(self.mapper, "in_process", False))

    def map_shards(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                   names: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """``fn(job)`` for every job, in this process or on the cluster ``runtime.task_runner``
        names; yields (index into ``jobs``, result) as shards finish, in any order. ``fn`` must be
        a module-level function and the jobs picklable; ``fn`` writes its files under
        ``writer.path`` and returns what the caller needs to ``writer.complete_shard`` them.
        ``names`` label the shards (task run names on a cluster). Torch runs with
        ``runtime.shard_threads`` threads in either place, so the bytes are the same."""
        mapper = self.mapper or LocalMapper(self.runtime.get("shard_threads", 1))
        return mapper.map(fn, list(jobs), list(names) if names is not None else None)

    def training_threads(self):
        """A context in which training runs with ``runtime.train_threads`` torch threads (0, the
        default: torch's own count, the core count). A gradient summed over another number of
        threads is rounded differently, so pin it to get the same bytes on machines with other
        core counts (see BENCHMARKS.md, "Determinism")."""
        return torch_threads(self.runtime.get("train_threads", 0))

    @property
    def max_pixels(self) -> int:
        """``data.max_pixels``: pass it to every ``load_rgb`` of the stage."""
        from partdistill.config import max_pixels

        return max_pixels(self.full_config)


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    # Bump when a change to the stage's code changes what it writes: it is part of the version.
    code_version: str
    run: Callable[[StageContext], dict[str, Any] | None]
    # Files of upstream artifacts this stage may read although they are evaluation-only.
    reads_evaluation_only: bool = False
    # Files this stage writes that only evaluation may read (part ground truth).
    evaluation_only_outputs: tuple[str, ...] = ()
    # When the inputs depend on the config (ground-truth instances need no teacher): the subset of
    # ``upstream`` this section uses.
    # Called with (section, whole config).
    upstream_for: Callable[[dict[str, Any], Any], tuple[str, ...]] | None = None
    # The part of the config section that determines the output (default: all of it), so that
    # settings for an unused option (another data source, say) don't change the version.
    # Called with (section, whole config): a stage may depend on another stage's settings.
    relevant: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    # Inputs outside the config that the version must cover (a referenced file's hash, say).
    fingerprint: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    summary: str = ""
    # A stage run in rounds (self-training): the number of rounds its section asks for. Each
    # round is its own artifact, stored as ``{name}_r{n}``; round n > 1 reads round n - 1 as
    # ``inputs[name]``, and downstream stages read the last round under the stage's name.
    rounds: Callable[[dict[str, Any]], int] | None = None
    # Keys of the section that only say how many rounds to run (kept out of each round's version,
    # so that asking for more rounds reuses the finished ones).
    round_keys: tuple[str, ...] = ()
    # Keys that only say how round n > 1 builds on round n - 1 (kept out of round 1's version, so
    # that changing them reuses a finished round 1).
    later_round_keys: tuple[str, ...] = ()

    @property
    def built(self) -> bool:
        return not getattr(self.run, "not_built", False)


def not_built(stage: str, missing: str) -> Callable[[StageContext], None]:
    """The ``run`` of a stage that a later issue builds: it fails, clearly, and writes nothing."""

    def run(ctx: StageContext) -> None:
        raise NotImplementedError(f"stage '{stage}' is not built yet: {missing}")

    run.__doc__ = f"Not built yet: {missing}"
    run.not_built = True  # type: ignore[attr-defined]
    return run
