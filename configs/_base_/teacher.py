# Stage `teacher`: the instance-segmentation model whose object masks and pixel features the pipeline uses.
teacher = dict(
    source='train',           # 'train' (on the data's object JSON) | 'checkpoint' | 'detectron2' | 'random'
    mmdet_config='configs/teachers/demo_mask2former_effnet-lite0_partsworld.py',
    checkpoint=None,          # an mmdet .pth ('checkpoint') or detectron2 .pkl ('detectron2')
    checkpoint_sha256=None,   # when set, the checkpoint must have this sha256, and the version names it by content
    resize_long_side=None,    # inference resize; the paper uses a long side of 640
    train=dict(
        max_iters=500,
        batch_size=4,
        lr=2e-4,
        seed=0,
        image_size=[192, 256],  # training crop (height, width) after large-scale jitter
        checkpoint_interval=100,  # iterations between the checkpoints a killed run resumes from
    ),
)
