# Stage `distill`: the final self-training with the part-cluster ids as labels.
distill = dict(
    rounds=1,
    max_iters=300,
    batch_size=4,
    seed=0,
)
