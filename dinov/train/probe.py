"""Online linear probe: frozen CLS features of labelled synthetic scenes -> linear heads.

Used during training (logged every ``probe.every`` steps) and at the start and end of a
run. The metric itself is :func:`dinov.metrics.train_linear_probes`; this module only
renders the labelled images, extracts features and keeps its randomness to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov.config import Config
from dinov.metrics import train_linear_probes
from dinov.models import Backbone


@torch.no_grad()
def extract_cls_features(backbone: Backbone, images: Tensor, batch_size: int = 128,
                         mean: list[float] | None = None, std: list[float] | None = None) -> Tensor:
    """CLS features of ``images`` in [0, 1], normalised like the training crops."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        if mean is not None and std is not None:
            chunk = (chunk - chunk.new_tensor(mean)[:, None, None]) / chunk.new_tensor(std)[:, None, None]
        feats.append(backbone.forward_intermediates(chunk, 1)[0].cls.float().cpu())
    backbone.train(was_training)
    return torch.cat(feats)


class OnlineProbe:
    """Linear-probe accuracy of a backbone on held-out synthetic scenes (image-level classes)."""

    def __init__(self, cfg: Config) -> None:
        from dinov.data.synthetic import NUM_IMAGE_CLASSES, render_scenes

        probe, size = cfg.probe, cfg.crops.global_crops_size
        # indices far from the pretraining scenes, so probe images are never trained on
        offset = 10_000_000
        train = render_scenes(probe.num_train, size, probe.seed, start_index=offset)
        val = render_scenes(probe.num_val, size, probe.seed, start_index=offset + probe.num_train)
        self.cfg = cfg
        self.num_classes = NUM_IMAGE_CLASSES
        self.train_images, self.train_labels = train.images, train.image_class
        self.val_images, self.val_labels = val.images, val.image_class

    def evaluate(self, backbone: Backbone) -> dict[str, float]:
        crops, probe = self.cfg.crops, self.cfg.probe
        with torch.random.fork_rng(devices=[]):
            train = extract_cls_features(backbone, self.train_images, mean=crops.normalize_mean,
                                         std=crops.normalize_std)
            val = extract_cls_features(backbone, self.val_images, mean=crops.normalize_mean,
                                       std=crops.normalize_std)
            result = train_linear_probes(
                F.normalize(train, dim=1), self.train_labels, F.normalize(val, dim=1),
                self.val_labels, self.num_classes, epochs=probe.epochs,
                weight_decay=probe.weight_decay, seed=probe.seed)
        return {"probe_top1": result.top1, "probe_best_lr": result.best_lr}
