# Stage `mining`: instance-level K-means part proposals refined by a dense CRF.
mining = dict(
    k=4,
    metric='cosine',           # 'cosine' | 'l2' | 'dot'
    backend='torch',           # 'torch' | 'faiss'
    iters=20,
    seed=0,
    min_part_area=16,          # pixels; smaller mined parts are dropped
    crf=dict(
        enabled=True,
        gt_prob=0.7,
        gaussian=dict(sxy=3, compat=3),
        bilateral=dict(sxy=20, srgb=13, compat=10),
        iterations=10,
    ),
)
