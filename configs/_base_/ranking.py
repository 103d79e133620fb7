# Stage `ranking`: per object class, prototype clustering of part-query features (paper §4.3, Eq. 2).
ranking = dict(
    k=8,                       # part clusters per object class (the paper: 8)
    part_features='query',     # what a part is clustered by: 'query' (the paper: its decoded query feature),
                               # 'teacher' (the mean teacher pixel feature under its mask), 'both'
    score_threshold=0.3,       # candidates score above this...
    min_part_fraction=0.05,    # ...and cover at least this fraction of their object
    fit_splits=['train'],      # the prototypes are fitted on these splits' candidates; every split is labelled
    seed=0,
)
