# Stage `distill`: the final self-training with the part-cluster ids as labels (paper §4.3).
# The model is the proposals' decoder with a class-conditioned head (k part logits per object
# class + no-object); round 1 starts from the last proposals round. Same training keys as `proposals`.
distill = dict(
    rounds=1,
    num_queries=20,            # keep equal to proposals.num_queries: the queries start from the proposals model
    num_points=2048,
    importance_sample_ratio=0.75,
    freeze_pixel_decoder=False,  # as proposals.freeze_pixel_decoder
    # round 1's class head: 'random', or 'prototypes': from the ranking's prototypes (nearest prototype
    # as a linear layer on the query feature, temperature × cosine-like scores), so that the model
    # starts where "proposals + ranking" is and training refines it
    head_init=dict(mode='random', temperature=10.0),
    round_init='previous',     # round n > 1 starts from: 'previous' (round n-1) | 'proposals'
    train_splits=['train'],
    min_object_fraction=0.05,
    min_part_fraction=0.05,
    image_size=[192, 256],
    scale_range=[0.5, 1.5],
    # as proposals.crop
    crop=dict(enabled=True, size=128, margin=0.15, scale_range=[0.8, 1.25], box='largest_component'),
    flip=True,
    loss_weights=dict(cls=2.0, mask=5.0, dice=5.0, no_object=0.1),
    optimizer=dict(lr=1e-3, weight_decay=0.05, clip_grad=0.01, warmup_iters=50, milestones=[0.8, 0.9]),
    max_iters=500,
    batch_size=4,
    accumulate=1,
    checkpoint_interval=50,
    seed=0,
    label=dict(
        # a query's score: 'class', the summed probability of its object class's k part logits (P(a part
        # of this class)), or 'cluster', the best single one; an object with no query above the
        # threshold keeps all its queries (the reference falls back to every part)
        score='class',
        score_threshold=0.3,
        mask_threshold=0.5,
        min_fraction=0.05,
        shard_images=32,
    ),
)
