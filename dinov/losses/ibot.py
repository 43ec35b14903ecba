"""The iBOT masked-patch loss.

Owns: teacher targets for the masked patch tokens (softmax with a running center, or
Sinkhorn-Knopp over all masked patches of the global batch), their center's EMA update,
and the weighted per-patch cross-entropy the student is trained with. Inputs are the flat
(M, K) logits of the masked patches only; which patches are masked, and how each patch is
weighted, is the caller's business.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dinov.losses.dino import (
    CenteredCrossEntropy,
    _all_reduce,
    _check_centering,
    _sinkhorn_knopp,
    softmax_center_teacher,
)


class IBOTPatchLoss(CenteredCrossEntropy):
    """Weighted cross-entropy between teacher and student distributions of masked patches."""

    def teacher_probs(
        self,
        teacher_patch_logits: Tensor,
        teacher_temp: float,
        centering: str,
        n_masked_patches: Tensor | None = None,
        n_iterations: int = 3,
    ) -> Tensor:
        """Targets (M, K) for the teacher logits of the M masked patches of this rank.

        For "sinkhorn_knopp", the sample marginal is 1 / (masked patches on all ranks):
        ``n_masked_patches`` is this rank's count as a tensor (M when omitted) and is summed
        over ranks here, since ranks mask different numbers of patches.
        """
        _check_centering(centering)
        if centering == "softmax":
            return softmax_center_teacher(teacher_patch_logits, self.center, teacher_temp)
        if n_masked_patches is None:
            n_masked_patches = torch.tensor(
                teacher_patch_logits.shape[0], device=teacher_patch_logits.device
            )
        total = _all_reduce(n_masked_patches.detach().clone().float())
        return _sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations, n_samples=total)

    def forward(
        self, student_patch_logits: Tensor, teacher_probs: Tensor, sample_weights: Tensor
    ) -> Tensor:
        """``sum_i w_i * H(t_i, s_i)`` over the M masked patches, all three inputs aligned.

        ``H(t, s) = -sum_k t_k log softmax(s / student_temp)_k``. The normalisation lives in
        the weights. To make every image count equally, as DINOv2 does, give patch i of image
        n the weight ``1 / (masked patches in image n * N)``: each image's patches then sum to
        1/N. DINOv2 takes N as the number of global-crop images in the batch, those without
        any masked patch included; taking N as the number of images with masks instead
        gives the mean over masked images.
        """
        aligned = student_patch_logits.shape == teacher_probs.shape
        if not aligned or sample_weights.shape != teacher_probs.shape[:1]:
            raise ValueError(
                "expected student and teacher (M, K) and weights (M,), got "
                f"{tuple(student_patch_logits.shape)}, {tuple(teacher_probs.shape)}, "
                f"{tuple(sample_weights.shape)}"
            )
        log_probs = self.student_log_probs(student_patch_logits)
        ce = -(teacher_probs.float() * log_probs).sum(dim=-1)
        return (sample_weights.float() * ce).sum()
