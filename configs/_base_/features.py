# Stage `features`: the teacher's pixel features around each kept instance.
features = dict(
    extractor='teacher',       # 'teacher' | 'efficientnet_lite0' (an ImageNet classification backbone, Table 5)
    layers=['res3', 'res4'],   # the paper's default; also 'res2', 'res5', 'pixel_decoder', 'mask_features'
    stride=8,                  # every layer is resampled to this stride
    normalize=False,           # L2-normalise each layer over channels before concatenating
    dtype='float16',
    # a fixed random projection to `dim` channels shrinks the store (type=None: off)
    reduction=dict(type=None, dim=64, seed=0),   # type: None | 'random_projection'
    batch_size=4,
    shard_images=32,           # images per resumable shard (one Zarr array each)
)
