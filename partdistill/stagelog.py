"""Library chatter goes to the stage's log file in the store, not to the terminal.

While a stage runs, :func:`stage_log` sends to ``<store>/<stage>/.logs/<version>.log``:

- what libraries print on stdout: pycocotools' "loading annotations into memory...", mmengine's
  logger, mmdet's dataset messages;
- warnings raised outside this package (torch's and mmcv's UserWarnings, deprecations);
- records that reach the root logger (a library's own ``logging`` calls).

The terminal keeps one progress line per stage (on stderr) and the results. A warning raised by
this package's own code still shows: it is about the user's data or settings. The log lives
beside the artifacts, not in them, so an artifact's bytes do not depend on what was logged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)
LOGS_DIR = ".logs"


def log_path(store_root: Path | str, stage: str, version: str) -> Path:
    """Where the chatter of a stage version goes."""
    return Path(store_root) / stage / LOGS_DIR / f"{version}.log"


class _LogStream:
    """A text stream writing to the log file (a print() target for libraries)."""

    def __init__(self, file):
        self._file = file

    def write(self, text: str) -> int:
        # a library handler made during the stage may outlive it (mmengine's logger keeps the
        # stdout of its creation): after the stage its writes are dropped, never an error
        if self._file.closed:
            return len(text)
        return self._file.write(text)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


@contextlib.contextmanager
def stage_log(path: Path | str) -> Iterator[Path]:
    """Capture library output into ``path`` (appended, one header per run) while the block runs."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    except OSError:
        # a read-only or full store: the stage says so itself; chatter just stays on the terminal
        yield path
        return
    stream = _LogStream(log)
    log.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}\n")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(PACKAGE_DIR):
            shown(message, category, filename, lineno, file, line)  # ours: about the user's data or settings
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stream):
            warnings.showwarning = showwarning
            yield path
    finally:
        root.removeHandler(handler)
        with contextlib.suppress(OSError):
            log.close()
        sys.stdout.flush()
