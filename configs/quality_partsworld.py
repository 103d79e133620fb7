# The quality profile: the demo's pipeline with more images and longer training, up to ~45 minutes
# on 2 CPU cores. It produces README's headline results table:
#
#     partdistill run configs/quality_partsworld.py
#
# Everything else (the shipped teacher, object-centric crops, the schedule) is the demo's.
_base_ = ['./demo_partsworld.py']

data = dict(partsworld=dict(images=480, seed=0))
proposals = dict(max_iters=1000, optimizer=dict(warmup_iters=50))
distill = dict(max_iters=1000, optimizer=dict(warmup_iters=50))
