"""Multicrop on kornia and iBOT block masking."""

from __future__ import annotations

import torch

from dinov.config import CropsConfig, MaskConfig
from dinov.data.masking import PatchMasks, sample_block_masks
from dinov.data.multicrop import MultiCropAugmentation, blur_kernel_size


def test_multicrop_shapes_and_per_image_randomness():
    torch.manual_seed(0)
    cfg = CropsConfig(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    images = torch.rand(1, 3, 48, 48).repeat(4, 1, 1, 1)  # identical images
    crops = MultiCropAugmentation(cfg)(images)
    assert crops.global_crops.shape == (8, 3, 32, 32)
    assert crops.local_crops.shape == (12, 3, 16, 16)
    # parameters are drawn per image: identical inputs give different crops
    first_view = crops.global_crops[:4]
    assert not torch.allclose(first_view[0], first_view[1])


def test_multicrop_normalises_and_is_reproducible():
    cfg = CropsConfig(global_crops_size=24, local_crops_size=12, local_crops_number=2,
                      color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob_global1=0.0,
                      blur_prob_global2=0.0, blur_prob_local=0.0, solarize_prob_global2=0.0,
                      global_crops_scale=[1.0, 1.0], horizontal_flip_prob=0.0)
    images = torch.full((2, 3, 24, 24), 0.5)
    crops = MultiCropAugmentation(cfg)(images)
    mean = torch.tensor(cfg.normalize_mean).view(3, 1, 1)
    std = torch.tensor(cfg.normalize_std).view(3, 1, 1)
    expected = ((0.5 - mean) / std).expand(3, 24, 24)
    torch.testing.assert_close(crops.global_crops[0], expected, atol=1e-5, rtol=0)
    torch.manual_seed(3)
    a = MultiCropAugmentation(CropsConfig(global_crops_size=24, local_crops_size=12))(torch.rand(2, 3, 32, 32))
    torch.manual_seed(3)
    b = MultiCropAugmentation(CropsConfig(global_crops_size=24, local_crops_size=12))(torch.rand(2, 3, 32, 32))
    assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)


def test_blur_kernel_scales_with_crop_and_is_odd():
    assert blur_kernel_size(224) == 9
    assert blur_kernel_size(32) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(8, 600, 7))


def test_block_masks_hit_exact_target_counts():
    gen = torch.Generator().manual_seed(0)
    cfg = MaskConfig(mask_sample_probability=0.5, mask_ratio_min_max=[0.1, 0.5])
    pm = sample_block_masks(40, (14, 14), cfg, gen)
    counts = pm.masks.sum(1)
    assert (counts > 0).sum() == 20  # half the crops are masked
    ratios = counts[counts > 0].float() / 196
    assert ratios.min() >= 0.1 - 1e-6 and ratios.max() <= 0.5 + 1e-6
    # ratios are spread over the range, not all equal
    assert ratios.std() > 0.05


def test_block_masks_are_blocky():
    gen = torch.Generator().manual_seed(1)
    pm = sample_block_masks(16, (16, 16), MaskConfig(mask_sample_probability=1.0), gen)
    grids = pm.masks.view(16, 16, 16).float()
    # fraction of masked patches whose right neighbour is masked too: far above random
    right = (grids[:, :, :-1] * grids[:, :, 1:]).sum() / grids[:, :, :-1].sum()
    density = grids.mean()
    assert right > density + 0.25


def test_patch_mask_weights_follow_dinov2():
    masks = torch.tensor([[True, True, False, False], [False, False, False, False],
                          [True, False, False, False]])
    pm = PatchMasks.from_masks(masks)
    assert pm.indices.tolist() == [0, 1, 8]
    # 1 / (masked patches in its crop * number of crops)
    torch.testing.assert_close(pm.weights, torch.tensor([1 / 6, 1 / 6, 1 / 3]))
