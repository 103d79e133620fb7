# Stage `instances`: object masks from the teacher (or ground truth), as RLE in Parquet.
instances = dict(
    source='teacher',          # 'teacher' | 'gt' (ground-truth object masks: the paper's "GT object" setting)
    splits=['train', 'val'],   # which of the data's splits to process
    score_threshold=0.5,
    topk_per_image=10,         # the reference keeps the top 10 detections
    min_object_fraction=0.05,  # objects under 5% of the image are dropped, as the reference does
    image_class_first=False,   # ImageNet-style folders: keep detections of the folder's class first (Detic fallback)
    batch_size=4,
    shard_images=32,           # images per resumable shard
)
