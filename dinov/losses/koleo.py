"""The KoLeo (Kozachenko-Leonenko) entropy regulariser used by DINOv2.

Owns: the nearest-neighbour spreading loss on a batch of features. It is local to the
batch of one rank, as in DINOv2; nothing here is all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised features (B, D).

    Pushes each sample away from its nearest neighbour in the batch, which spreads the
    features over the sphere. ``eps`` (1e-8, as in DINOv2) keeps the loss and its gradient
    finite when two samples coincide; B must be at least 2.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @torch.no_grad()
    def nearest_neighbours(self, features: Tensor) -> Tensor:
        """Index of each row's nearest other row, for L2-normalised rows (max dot product)."""
        dots = features @ features.t()
        # -inf rather than DINOv2's -1: with -1, an antipodal pair ties with the sample
        # itself and argmax may return i as its own neighbour (distance 0).
        self_pairs = torch.eye(dots.shape[0], dtype=torch.bool, device=dots.device)
        return dots.masked_fill(self_pairs, float("-inf")).argmax(dim=1)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                "KoLeoLoss needs features of shape (B, D) with B >= 2, since each sample's "
                f"nearest neighbour is another sample of the batch; got {tuple(features.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            neighbours = x[self.nearest_neighbours(x)]
            # pairwise_distance computes ||a - b + eps||: never the norm of an exact zero
            # vector, whose gradient would be NaN when two samples coincide.
            distances = F.pairwise_distance(x, neighbours, p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
