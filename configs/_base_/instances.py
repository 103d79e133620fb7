# Stage `instances`: object masks from the teacher (or ground truth), as RLE in Parquet.
instances = dict(
    source='teacher',          # 'teacher' | 'gt'
    score_threshold=0.5,
    topk_per_image=10,         # the reference keeps the top 10 detections
    min_object_fraction=0.05,  # objects under 5% of the image are dropped, as the reference does
    batch_size=4,
)
