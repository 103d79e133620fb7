# The embedded default: every stage on CPU, on a generated Parts World, in minutes.
_base_ = [
    './_base_/default_runtime.py',
    './_base_/data.py',
    './_base_/teacher.py',
    './_base_/instances.py',
    './_base_/features.py',
    './_base_/mining.py',
    './_base_/proposals.py',
    './_base_/ranking.py',
    './_base_/distill.py',
    './_base_/evaluate.py',
]

data = dict(source='partsworld', partsworld=dict(images=96, seed=0))
