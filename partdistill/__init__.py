"""partdistill: PartDistillation (Cho et al., CVPR 2023) as a staged, resumable pipeline."""

__version__ = "0.1.0"
