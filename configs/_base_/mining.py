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
    crf=dict(
        enabled=True,
        gt_prob=0.7,
        gaussian=dict(sxy=3, compat=3),
        bilateral=dict(sxy=20, srgb=13, compat=10),
        iterations=10,
        margin=16,             # pixels of context around the object's box that the CRF sees
    ),
)
