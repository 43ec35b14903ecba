# ADE20K UPerNet on our backbone (mmsegmentation 1.x config): mmseg's ViT + UPerNet recipe.
#
# Fine-tuned backbone (eval/mmseg_backbone.py:VPretrainViT) with four block outputs,
# turned into a 4-level pyramid (strides 4/8/16/32 for patch 16) by mmseg's
# MultiLevelNeck (bilinear resize x4, x2, x1, x0.5 + 3x3 convs), UPerHead plus an
# auxiliary FCNHead (loss weight 0.4); 512x512 crops, 80k iters at batch 16 (8 GPUs x 2),
# AdamW lr 6e-5 / wd 0.01 without decay on position embeddings, tokens and norms,
# linear warmup then poly decay. Data pipeline, evaluation and runtime come from
# linear_ade20k.py (same directory), including the ADE20K_ROOT environment variable.
#
# Run:  python -m eval.mmseg_backbone configs/mmseg/upernet_ade20k.py --work-dir runs/upernet \
#         --cfg-options model.backbone.weights=runs/x/checkpoints/checkpoint_00010000.pt
# Frozen-backbone variant: --cfg-options model.backbone.frozen=True
#
# `embed_dim` must equal the backbone's width and `out_indices` fit its depth:
# ViT-L (24 blocks, 1024) -> (5, 11, 17, 23); ViT-B/S (12 blocks) -> (2, 5, 8, 11).
_base_ = ['./linear_ade20k.py']

embed_dim = 1024
out_indices = (5, 11, 17, 23)
num_classes = 150
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    backbone=dict(out_indices=out_indices, norm=True, frozen=False),
    neck=dict(
        type='MultiLevelNeck',
        in_channels=[embed_dim] * 4,
        out_channels=embed_dim,
        scales=[4, 2, 1, 0.5]),
    decode_head=dict(
        _delete_=True,  # replaces the base's BNHead rather than merging into it
        type='UPerHead',
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=embed_dim,
        in_index=3,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    test_cfg=dict(mode='whole'))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            # substrings of parameter names (backbone.backbone.model.pos_embed, ...norm1.weight)
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0),
            'reg_token': dict(decay_mult=0.0),
            'mask_token': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=80000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=8000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000, max_keep_ckpts=2))
