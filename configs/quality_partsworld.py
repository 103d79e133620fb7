# The quality profile: the demo's pipeline with more images and longer training, about 20 minutes
# on 2 CPU cores (the budget is 45). It produces README's headline results table:
#
#     partdistill run configs/quality_partsworld.py
#
# Everything else (the shipped teacher, object-centric crops, the schedule) is the demo's. The
# oracle learning curves (benchmarks/part_learning.py) still rise at 1,000 iterations.
_base_ = ['./demo_partsworld.py']

data = dict(partsworld=dict(images=480, seed=0))
proposals = dict(max_iters=1500)
distill = dict(max_iters=1500)
