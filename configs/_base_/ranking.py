# Stage `ranking`: per object class, prototype clustering of part-query features (paper Eq. 2).
ranking = dict(
    k=8,
    score_threshold=0.3,
    min_part_fraction=0.05,
    seed=0,
)
