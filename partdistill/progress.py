"""Progress reporting that stages use without knowing who is watching.

Stages call ``ctx.progress(description, total)`` and ``advance``; the CLI shows a rich bar, a
Prefect run also reports to the UI, tests and notebooks pass nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Bar(Protocol):
    def advance(self, n: int = 1) -> None: ...


class _NullBar:
    def advance(self, n: int = 1) -> None:
        pass


class ProgressSink(Protocol):
    """Something that displays progress; ``task`` is a context manager yielding a Bar."""

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Bar]: ...


class NullProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Bar]:
        yield _NullBar()


class RichProgress:
    """Rich progress bars on the terminal (stderr), one line per stage task."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Bar]:
        # One live display for the whole run (see __enter__): restarting it per task would
        # reprint every earlier bar.
        self._progress.start()
        tid = self._progress.add_task(description, total=total)

        class _Bar:
            def advance(_self, n: int = 1) -> None:
                self._progress.advance(tid, n)

        yield _Bar()


class CallbackProgress:
    """Forwards every advance to ``callback(description, done, total)`` (e.g. Prefect's UI)."""

    def __init__(self, callback: Callable[[str, int, int | None], None], inner: ProgressSink | None = None):
        self.callback, self.inner = callback, inner or NullProgress()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Bar]:
        done = 0
        with self.inner.task(description, total) as bar:
            outer = self

            class _Bar:
                def advance(_self, n: int = 1) -> None:
                    nonlocal done
                    done += n
                    bar.advance(n)
                    outer.callback(description, done, total)

            yield _Bar()


class TeeProgress:
    """Shows one progress task on several sinks at once, e.g. the terminal and Prefect's UI."""

    def __init__(self, *sinks: ProgressSink | None):
        self.sinks = [s for s in sinks if s is not None]

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Bar]:
        with contextlib.ExitStack() as stack:
            bars = [stack.enter_context(s.task(description, total)) for s in self.sinks]

            class _Bar:
                def advance(_self, n: int = 1) -> None:
                    for bar in bars:
                        bar.advance(n)

            yield _Bar()
