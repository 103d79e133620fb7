# Stage `evaluate`: part quality against the (evaluation-only) part ground truth.
evaluate = dict(
    split='val',
    ar_max_dets=[1, 10, 50, 100, 200],
    # Where the part ground truth comes from: 'data' (the data artifact's parts_{split}.json: Parts
    # World, or a COCO source with a part JSON), or a data set on disk read by its loader:
    # 'partimagenet' (root/{split}.json + root/{split}/...), 'pascal_part' (VOC2010 + Annotations_Part/*.mat)
    # or 'cityscapes_parts' (Cityscapes-Panoptic-Parts). An external data set is evaluated with its
    # GT object masks only: the pipeline's own instances cover the data artifact's images.
    gt=dict(source='data', root=None),
    max_objects=None,          # evaluate at most this many objects (None: all)
)
