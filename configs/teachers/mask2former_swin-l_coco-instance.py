# Teacher: Mask2Former Swin-L (ImageNet-21K pretrained, window 12) for COCO *instance*
# segmentation, 200 queries: the paper's teacher. mmdet ships Swin-L only as a panoptic config,
# so this one turns it into the instance model the Mask2Former authors released (as a
# detectron2 checkpoint: use teacher.source='detectron2' to convert it on load).
_base_ = ['mmdet::mask2former/mask2former_swin-l-p4-w12-384-in21k_16xb1-lsj-100e_coco-panoptic.py']

num_things_classes = 80
num_stuff_classes = 0
load_from = None
model = dict(
    backbone=dict(init_cfg=None),
    data_preprocessor=dict(batch_augments=None, pad_seg=False),
    panoptic_head=dict(
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        num_queries=200,
        loss_cls=dict(class_weight=[1.0] * num_things_classes + [0.1])),
    panoptic_fusion_head=dict(num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes),
    test_cfg=dict(panoptic_on=False, semantic_on=False, instance_on=True, max_per_image=100),
)
