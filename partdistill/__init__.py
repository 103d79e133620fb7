"""partdistill: PartDistillation (Cho et al., CVPR 2023) as a staged, resumable pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from partdistill.predict import Predictor

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import partdistill` stays cheap (no torch, no mmdet)
    if name == "Predictor":
        from partdistill.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'partdistill' has no attribute {name!r}")
