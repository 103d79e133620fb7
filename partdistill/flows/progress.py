"""Stage progress in the Prefect UI, as progress artifacts.

Each progress task of a stage (``ctx.progress.task(description, total)``) becomes one progress
artifact under the stage's key (``teacher-progress``, ``proposals-r1-progress``, ...), created at
0 % in the running task, updated as the stage advances and set to 100 % when the task ends. A
keyed artifact keeps its history, so the UI's artifact page shows every run's progress.

Updates are rate-limited: at most one per ``min_interval`` seconds, and only once the value has
moved by ``min_step`` percentage points, so a fast loop does not flood the API. The final value is
always sent. Reporting never fails a stage: after an API error this sink logs a warning and
stops reporting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from partdistill.flows.settings import apply_prefect_defaults

apply_prefect_defaults()


class PrefectProgress:
    """A ProgressSink that publishes progress artifacts; use it inside a Prefect task run."""

    def __init__(self, key: str, min_interval: float = 1.0, min_step: float = 1.0,
                 logger: logging.Logger | Any | None = None, clock: Callable[[], float] = time.monotonic):
        self.key, self.min_interval, self.min_step = key, min_interval, min_step
        self.logger, self.clock = logger, clock
        self.updates = 0         # API calls made (created + updated), for tests and benchmarks
        self._broken = False

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self._broken:
            return None
        try:
            result = fn()
            self.updates += 1
            return result
        except Exception as err:  # a UI nicety must not fail a stage
            self._broken = True
            if self.logger is not None:
                self.logger.warning("progress for %s not reported to Prefect any more: %s", self.key, err)
            return None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        sink = self
        done = 0
        last_time = self.clock()
        last_pct = 0.0

        def label(pct: float, finished: bool = False) -> str:
            counted = f"{done} of {total}" if total else f"{done}"
            return f"{description}: done ({counted})" if finished else f"{description}: {counted} ({pct:.0f} %)"

        artifact_id = self._call(lambda: create_progress_artifact(progress=0.0, key=self.key,
                                                                  description=label(0.0)))

        def publish(pct: float, finished: bool = False) -> None:
            nonlocal last_time, last_pct
            if artifact_id is None:
                return
            self._call(lambda: update_progress_artifact(artifact_id, progress=pct, description=label(pct, finished)))
            last_time, last_pct = self.clock(), pct

        def percent() -> float:
            return min(100.0, 100.0 * done / total) if total else 0.0

        class _Bar:
            def advance(_self, n: int = 1) -> None:
                nonlocal done
                done += n
                pct = percent()
                if (sink.clock() - last_time >= sink.min_interval and pct - last_pct >= sink.min_step) \
                        or (pct >= 100.0 > last_pct and total):
                    publish(pct)

        try:
            yield _Bar()
        except BaseException:
            if percent() != last_pct:
                publish(percent())  # where it stopped
            raise
        if last_pct < 100.0:
            publish(100.0, finished=True)  # the task ended, maybe short of its total (e.g. an early stop)
