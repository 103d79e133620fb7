"""Feed every case of the bad-input corpus to the code that meets it, and print the table.

    python benchmarks/bad_inputs.py [--keep DIR] [-v]

The cases are ``tests.data.bad.corpus.CASES``, the list the tests are parametrized from. Each
row: the case, where it was fed, the outcome (``error <ExceptionClass>``, ``skip <reason>`` or
``ok <what loaded>``) and whether the store it ran against lost nothing (``verify()`` clean and
every earlier artifact unchanged; ``–`` where no stage ran). Takes well under a minute on CPU:
three tiny images, ground-truth objects, no training. ``-v`` also prints each error's message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.data.bad import corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each error's message")
    args = ap.parse_args()
    warnings.simplefilter("ignore")   # library warnings about the bad files are not the point here
    logging.disable(logging.WARNING)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        root = args.keep or Path(tmp)

        def progress(case: corpus.Case, outcome: corpus.Outcome) -> None:
            print(f"  {case.name:<30} {outcome}"[:120], file=sys.stderr)
            if args.verbose and outcome.message:
                print("      " + " ".join(outcome.message.split()), file=sys.stderr)

        results = corpus.run_all(root, progress)
    print(corpus.table(results))
    print(f"({time.monotonic() - start:.1f} s)")
    unexpected = [c.name for c, o in results
                  if (o.kind, o.detail[:len(c.expect[1])]) != c.expect or (c.stage and o.lost != [])]
    if unexpected:
        print(f"not as the tests expect: {', '.join(unexpected)}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
