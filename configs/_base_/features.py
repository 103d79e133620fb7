# Stage `features`: the teacher's pixel features inside each kept instance.
features = dict(
    layers=['res3', 'res4'],   # also 'pixel_decoder', 'mask_features'
    stride=8,
    dtype='float16',
    reduction=None,            # None | dict(type='random_projection' | 'pca', dim=...)
)
