# Stage `proposals`: the class-agnostic part decoder and its self-training rounds (paper §4.2).
# Each round is its own artifact, `proposals_r{n}`; round 1 trains on the mined parts, round n on
# round n-1's pseudo-parts, starting from round n-1's weights.
proposals = dict(
    rounds=2,
    num_queries=20,            # part queries per object crop (the paper: 200 per image; 20 learns faster than 50)
    num_points=2048,           # points sampled per mask for matching and the mask losses (the paper: 12,544)
    importance_sample_ratio=0.75,
    # what of the teacher's pixel decoder stays fixed: False (none of it), 'encoder' (the reference:
    # input projections + deformable encoder; the stride-4 convs and mask projection learn), True (all).
    # Measured (BENCHMARKS.md, issue 14): val AR@10 after 500 iterations 16.2 (True), 23.6 ('encoder'),
    # 32.7 (False), for 92 / 104 / 135 s of training.
    freeze_pixel_decoder=False,
    round_init='previous',     # round n > 1 starts from: 'previous' (round n-1's model) | 'teacher'
    # round n > 1 trains on round n-1's pseudo-parts plus each part round n-1 trained on that no
    # pseudo-part of its object overlaps at IoU >= this (None: the pseudo-parts alone); 0.5 took
    # round 2 from 24.1 to 28.9 AR@10 on the demo and 28.8 to 32.2 on quality (BENCHMARKS.md)
    carry_over_iou=0.5,
    train_splits=['train'],
    min_object_fraction=0.05,  # objects must cover 5% of the image (the reference's filter)
    min_part_fraction=0.05,    # parts must cover 5% of the image's summed part area, after augmentation
    image_size=[192, 256],     # training crop (height, width) after large-scale jitter (whole-image mode)
    scale_range=[0.5, 1.5],    # large-scale jitter (the reference: 0.1-2.0 at 640 px) (whole-image mode)
    # Object-centric crops: each object is cut out in a square box (its bounding box + margin × its
    # side on every side), resized to size × size, and trained on, labelled and predicted alone;
    # the masks are pasted back into the image. The paper's regime (one large object per ImageNet
    # photo) on scenes of small objects. enabled=False: the whole image is the input. box: around the
    # whole mask ('mask') or its largest component ('largest_component': a predicted mask's stray blobs
    # no longer shrink the object in its crop; BENCHMARKS.md, "Crop boxes from the teacher's masks").
    crop=dict(enabled=True, size=128, margin=0.15, scale_range=[0.8, 1.25], box='largest_component'),
    flip=True,
    loss_weights=dict(cls=2.0, mask=5.0, dice=5.0, no_object=0.1),
    # AdamW; linear warm-up from 0.1 × lr over warmup_iters, then × 0.1 at each milestone (fractions of max_iters)
    optimizer=dict(lr=1e-3, weight_decay=0.05, clip_grad=0.01, warmup_iters=50, milestones=[0.8, 0.9]),
    max_iters=500,
    batch_size=4,
    accumulate=1,              # gradient accumulation: an effective batch of batch_size x accumulate x GPUs
    checkpoint_interval=50,    # iterations between the checkpoints a killed run resumes from
    seed=0,
    label=dict(
        score_threshold=0.3,   # pseudo-parts: queries scoring above this...
        mask_threshold=0.5,    # ...whose mask (probability above this) overlaps an object
        min_fraction=0.05,     # segments under this fraction of their object's area are dropped
        # ...and over this one: a query taking (nearly) the whole object is the object. The paper's
        # 50 % (its ImageNet-21K evaluation) left 63 % of each object unlabelled on Parts World and
        # halved the pseudo-parts' AR@10 (21.9 vs 32.9 at 0.9; BENCHMARKS.md, "the over-half filter")
        max_fraction=0.9,
        # which query a pixel goes to: 'mask_score' (the paper: highest mask probability × score) or
        # 'mask' (highest mask probability among the queries scoring above score_threshold)
        pixel_rule='mask_score',
        shard_images=32,       # images per resumable labelling shard
    ),
)
