# ADE20K linear segmentation probe (mmsegmentation 1.x config): DINOv2's protocol.
#
# Frozen backbone (eval/mmseg_backbone.py:VPretrainViT), patch tokens of the last block
# after the final norm, a BatchNorm + 1x1 conv head (BNHead), 512x512 crops, 40k iters
# at batch 16 (8 GPUs x 2), AdamW lr 1e-3, linear warmup then poly decay; sliding-window
# evaluation, mIoU over the 150 classes.
#
# Run:  python -m eval.mmseg_backbone configs/mmseg/linear_ade20k.py --work-dir runs/seg \
#         --cfg-options model.backbone.weights=runs/x/checkpoints/checkpoint_00010000.pt
# (or mmseg's tools/train.py / `mim train mmseg` with this file).
#
# Data: ADE20K_ROOT=/path/to/ADEChallengeData2016 in the environment, or --cfg-options
# train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
#
# Backbone: any source the eval CLIs take. Our checkpoints carry their architecture
# (arch/embed_dim/... here are then ignored); official files need `weights_format`
# (dinov2|dinov3) and the matching `arch`. `embed_dim` below must equal the backbone's
# width (ViT-S 384, B 768, L 1024): it sizes the head.
custom_imports = dict(imports=['eval.mmseg_backbone'], allow_failed_imports=False)

embed_dim = 1024
crop_size = (512, 512)
num_classes = 150
dataset_type = 'ADE20KDataset'
data_root = '{{$ADE20K_ROOT:data/ade/ADEChallengeData2016}}'

norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics, as the backbones were trained
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='VPretrainViT',
        arch='vit_large_patch16_dinov3',
        img_size=crop_size[0],
        weights=None,  # set: a checkpoint of ours, or an official DINOv2/DINOv3 file
        weights_format='auto',
        weights_key='teacher',
        out_indices=(-1, ),
        norm=True,
        frozen=True),
    decode_head=dict(
        type='BNHead',
        in_channels=[embed_dim],
        in_index=[0],
        input_transform='resize_concat',
        channels=embed_dim,
        dropout_ratio=0.0,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# ------------------------------------------------------------------ data (mmseg's ADE20K)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),  # 0 -> 255 (ignore), 1..150 -> 0..149
    dict(
        type='RandomResize',
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ---------------------------------------------------------------------------- schedule
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=40000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# ----------------------------------------------------------------------------- runtime
default_scope = 'mmseg'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
