"""Named kill points for the fault-injection suite (``tests/faults``).

The store's writes pass through a few points where a crash is most dangerous: a file written
but not yet renamed into place, a shard's files written but not yet marked done, a manifest
written but the artifact not yet committed, a training checkpoint half saved. With the
environment variable ``PARTDISTILL_KILL_AT`` set, the process SIGKILLs itself at one of them::

    PARTDISTILL_KILL_AT=atomic-write:3     at the 3rd atomic file write, before its rename
    PARTDISTILL_KILL_AT=shard-marker:2     after the 2nd shard's files, before its marker
    PARTDISTILL_KILL_AT=commit:1           after the manifest is written, before the rename
    PARTDISTILL_KILL_AT=checkpoint-save:2  half-way through writing the 2nd training checkpoint

With ``PARTDISTILL_KILL_ONCE=FILE`` as well, the kill happens once across processes: the first
process to reach the point creates FILE and dies, and later ones (a rerun in a new process, as a
deployment started again from the UI is) pass. Unset (always, outside the suite) a kill point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PARTDISTILL_KILL_AT"
ONCE_ENV = "PARTDISTILL_KILL_ONCE"
POINTS = ("atomic-write", "shard-marker", "commit", "checkpoint-save")

_hits: dict[str, int] = {}


def armed(point: str) -> int | None:
    """The hit count at which ``point`` kills this process, or None when it is not armed."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown kill point {name!r}; known: {', '.join(POINTS)}")
    return int(n or 1) if name == point else None


def hit(point: str) -> bool:
    """Count one pass through ``point``; True when this pass is the one to die at."""
    at = armed(point)
    if at is None:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != at:
        return False
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first process to get here
        except FileExistsError:
            return False
    return True


def kill_point(point: str) -> None:
    """SIGKILL this process if ``point`` is armed for this pass (no cleanup, no flush: a crash)."""
    if hit(point):
        die()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_checkpoint_fault() -> None:
    """When ``checkpoint-save`` is armed, make torch.save write half of the armed checkpoint
    and die, as a power cut mid-save would."""
    if armed("checkpoint-save") is None:
        return
    import io

    import torch

    real = torch.save
    if getattr(real, "_partdistill_fault", False):
        return

    def save(obj, f, *args, **kwargs):
        if not hit("checkpoint-save"):
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(data)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(data)
        die()

    save._partdistill_fault = True  # type: ignore[attr-defined]
    torch.save = save
