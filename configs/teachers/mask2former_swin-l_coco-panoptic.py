# Teacher: mmdet's Mask2Former Swin-L (ImageNet-21K pretrained) panoptic model on COCO.
# Its "thing" masks serve as instances: panoptic output is off, instance output on.
# Use: teacher = dict(type='mmdet', mmdet_config='configs/teachers/mask2former_swin-l_coco-panoptic.py',
#                     checkpoint='/path/to/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.pth')
_base_ = ['mmdet::mask2former/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.py']

load_from = None
model = dict(
    backbone=dict(init_cfg=None),
    data_preprocessor=dict(batch_augments=None),
    test_cfg=dict(panoptic_on=False, semantic_on=False, instance_on=True, max_per_image=100),
)
