# Stage `proposals`: the class-agnostic part decoder and its self-training rounds (paper §4.2).
# Each round is its own artifact, `proposals_r{n}`; round 1 trains on the mined parts, round n on
# round n-1's pseudo-parts, starting from round n-1's weights.
proposals = dict(
    rounds=2,
    num_queries=50,            # part queries per image (the paper: 200)
    num_points=2048,           # points sampled per mask for matching and the mask losses (the paper: 12,544)
    importance_sample_ratio=0.75,
    freeze_pixel_decoder=True, # the reference freezes the backbone and the deformable encoder
    round_init='previous',     # round n > 1 starts from: 'previous' (round n-1's model) | 'teacher'
    train_splits=['train'],
    min_object_fraction=0.05,  # objects must cover 5% of the image (the reference's filter)
    min_part_fraction=0.05,    # parts must cover 5% of the image's summed part area, after augmentation
    image_size=[192, 256],     # training crop (height, width) after large-scale jitter
    scale_range=[0.5, 1.5],    # large-scale jitter (the reference: 0.1-2.0 at 640 px)
    flip=True,
    loss_weights=dict(cls=2.0, mask=5.0, dice=5.0, no_object=0.1),
    optimizer=dict(lr=1e-4, weight_decay=0.05, clip_grad=0.01),
    max_iters=150,
    batch_size=4,
    accumulate=1,              # gradient accumulation: an effective batch of batch_size x accumulate x GPUs
    checkpoint_interval=50,    # iterations between the checkpoints a killed run resumes from
    seed=0,
    label=dict(
        score_threshold=0.3,   # pseudo-parts: queries scoring above this...
        mask_threshold=0.5,    # ...whose mask (probability above this) overlaps an object
        min_fraction=0.05,     # segments under this fraction of their object's area are dropped
        shard_images=32,       # images per resumable labelling shard
    ),
)
