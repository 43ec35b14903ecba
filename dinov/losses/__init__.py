"""dinov.losses: the self-supervised objectives of the learner (DINO, iBOT, KoLeo)."""

from dinov.losses.dino import DINOLoss, sinkhorn_knopp_teacher, softmax_center_teacher
from dinov.losses.ibot import IBOTPatchLoss
from dinov.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
]
