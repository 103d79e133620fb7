"""The child process the fault suite kills: ``python -m tests.faults.child CFG.json STORE STAGE``."""

import json
import sys

from partdistill.pipeline import run_pipeline
from partdistill.stages import STAGES  # noqa: F401  (import every stage before saying ready)
from partdistill.storage import ArtifactStore

if __name__ == "__main__":
    cfg_file, root, stage = sys.argv[1:4]
    import mmdet.models  # noqa: F401  (the heavy imports happen before "ready")
    import torch  # noqa: F401

    print("ready", flush=True)
    run_pipeline(json.load(open(cfg_file)), ArtifactStore(root), only=stage)
