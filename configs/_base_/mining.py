# Stage `mining`: instance-level K-means part proposals refined by a dense CRF.
# The CRF's worker processes are runtime.num_workers: they change no output byte, so no version.
mining = dict(
    fused=False,               # compute features from the teacher here instead of reading the `features` store
    k=4,
    metric='cosine',           # 'cosine' | 'l2' | 'dot'
    backend='torch',           # 'torch' | 'faiss'
    iters=20,
    seed=0,
    min_part_area=16,          # pixels; smaller mined parts are dropped (and smaller objects skipped)
    shard_instances=128,       # instances per resumable shard (one K-means batch, one Parquet file)
    # Colour-aware mining (issue 14 §3): K-means on the teacher's features fused with each cell's
    # colour and position. With color_weight and position_weight both 0 nothing is fused (mining is
    # the features-only K-means above, byte for byte, same version; feature_weight is then unused).
    # Otherwise every stride-8 cell is the concatenation of three blocks, each normalised so that
    # the weights compare, and K-means uses Euclidean distance (`metric` does not apply; on the
    # unit-norm feature block it is the cosine distance, |a-b|^2 = 2 - 2 cos):
    fusion=dict(
        feature_weight=1.0,    # x the teacher's features, L2-normalised per cell (0: colour/position only)
        color_weight=0.0,      # x the cell's colour: the mean of the object's pixels in it, in color_space
        color_space='lab',     # 'lab': CIELAB (sRGB, D65) minus the object's mean, / 100 (fixed: L* spans
                               #   0..100; per object would blow a uniform object's noise up to a colour
                               #   edge) | 'rgb_direction': sRGB / its L2 norm (unit norm like the features;
                               #   brightness-invariant, what the raw-RGB floor's cosine K-means sees)
        position_weight=0.0,   # x the cell's (y, x) centre minus the object's centroid, / the object's
                               #   RMS radius (relative to its size)
    ),                         # pixels are then assigned with their own colour and position
    crf=dict(
        enabled=True,
        gt_prob=0.7,
        gaussian=dict(sxy=3, compat=3),
        bilateral=dict(sxy=20, srgb=13, compat=10),
        iterations=10,
        margin=16,             # pixels of context around the object's box that the CRF sees
    ),
)
