# Teacher: mmdet's Mask2Former Swin-T instance segmentation on COCO (80 thing classes).
# Use: teacher = dict(type='mmdet', mmdet_config='configs/teachers/mask2former_swin-t_coco-instance.py',
#                     checkpoint='/path/to/the mmdet checkpoint .pth')
_base_ = ['mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py']

load_from = None  # the checkpoint path; the pipeline's teacher.checkpoint overrides it
# Weights come from the checkpoint: nothing may be downloaded, so no ImageNet init.
model = dict(
    backbone=dict(init_cfg=None),
    # Training pads every batch to 1024x1024; inference needs no such padding.
    data_preprocessor=dict(batch_augments=None),
    test_cfg=dict(max_per_image=100),
)
