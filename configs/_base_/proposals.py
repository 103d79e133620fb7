# Stage `proposals`: the class-agnostic part decoder and its self-training rounds.
proposals = dict(
    num_queries=50,
    rounds=2,
    score_threshold=0.3,
    min_object_fraction=0.05,
    min_part_fraction=0.05,
    loss_weights=dict(cls=2.0, mask=5.0, dice=5.0, no_object=0.1),
    optimizer=dict(lr=1e-4, weight_decay=0.05, clip_grad=0.01),
    max_iters=300,
    batch_size=4,
    seed=0,
)
