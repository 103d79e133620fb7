# Stage `evaluate`: part quality against the (evaluation-only) part ground truth.
evaluate = dict(
    split='val',
    ar_max_dets=[1, 10, 50, 100, 200],
)
