# Stage `teacher`: the instance-segmentation model whose masks and features the pipeline uses.
teacher = dict(
    type='demo_mask2former',  # 'demo_mask2former' | 'mmdet' | 'detectron2_mask2former' | 'gt'
    mmdet_config=None,        # path to an mmdet config (type='mmdet')
    checkpoint=None,          # path to its checkpoint
    train=dict(max_iters=600, batch_size=4, lr=1e-4, seed=0),
)
