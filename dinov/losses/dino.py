"""The DINO image-level loss and the teacher targets it distils from.

Owns: the two ways of turning teacher logits into target distributions (softmax with a
running center, and Sinkhorn-Knopp as in DINOv2), the teacher center's EMA update, and the
cross-entropy between the teacher targets of the global crops and every student crop.
All of it works unchanged under ``torch.distributed``: batch statistics are all-reduced,
never gathered, and nothing here forces a host-device sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

CENTERINGS = ("softmax", "sinkhorn_knopp")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def _summed_over_ranks(tensor: Tensor) -> Tensor:
    """Σ over ranks of a tensor that carries a graph: the gradient reaches this rank's term
    only (the other ranks' are constants), with no in-place collective on a graph tensor."""
    if not _distributed():
        return tensor
    total = _all_reduce(tensor.detach().clone())
    return tensor + (total - tensor.detach())


def softmax_center_teacher(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Teacher targets ``softmax((teacher_logits - center) / teacher_temp)`` over the last dim."""
    return F.softmax((teacher_logits.float() - center).mul_(1.0 / teacher_temp), dim=-1)


def _prototype_max(scaled: Tensor) -> Tensor:
    """Per-prototype max over the global batch, shape (1, K); -inf where a rank has no rows."""
    if scaled.shape[0] == 0:
        local = scaled.new_full((1, scaled.shape[1]), float("-inf"))
    else:
        local = scaled.amax(dim=0, keepdim=True)
    return _all_reduce(local, dist.ReduceOp.MAX)


def _sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int,
    n_samples: Tensor | int | None = None,
) -> Tensor:
    """Sinkhorn-Knopp on (B, K) logits; ``n_samples`` is the global B (default B * world size).

    In place (K is up to 65536) unless the logits carry a graph with grad mode on (the
    designer's gradient through the teacher's views): then out of place, so autograd can
    differentiate it. Under a process group the other ranks' sums are constants of that
    gradient.
    """
    differentiable = torch.is_grad_enabled() and teacher_logits.requires_grad
    wide = torch.promote_types(teacher_logits.dtype, torch.float32)
    scaled = teacher_logits.to(wide) * (1.0 / teacher_temp)  # a new tensor: edited in place below
    # DINOv2 exponentiates directly. Subtracting a per-prototype max scales each row of Q
    # by a constant, which the first row normalisation removes exactly, so the result is
    # unchanged while exp can no longer overflow (and the shift needs no gradient). The max
    # must be global across ranks: a per-rank max would scale each rank's columns
    # differently and not cancel.
    shift = _prototype_max(scaled.detach())
    q = (scaled - shift).exp() if differentiable else scaled.sub_(shift).exp_()  # (B, K)
    n_prototypes = q.shape[1]
    if n_samples is None:
        world = dist.get_world_size() if _distributed() else 1
        n_samples = q.shape[0] * world
    q = q / _summed_over_ranks(q.sum()) if differentiable else q.div_(_all_reduce(q.sum()))
    # A sample whose logits underflow for every prototype would give 0/0; tiny keeps it 0.
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        # DINOv2's rows are prototypes; we keep (B, K) and scale columns, then rows, by
        # reciprocals: two passes over Q per iteration instead of four.
        if differentiable:
            q = q / (_summed_over_ranks(q.sum(dim=0, keepdim=True)) * n_prototypes)
            q = q / (q.sum(dim=1, keepdim=True).clamp_min(tiny) * n_samples)
            continue
        per_prototype = _all_reduce(q.sum(dim=0, keepdim=True))
        q.mul_(per_prototype.mul_(n_prototypes).reciprocal_())
        per_sample = q.sum(dim=1, keepdim=True).clamp_min_(tiny)
        q.mul_(per_sample.mul_(n_samples).reciprocal_())
    return q * n_samples if differentiable else q.mul_(n_samples)


def sinkhorn_knopp_teacher(
    teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3
) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets for a (B, K) batch, computed in float32.

    Starting from ``exp(logits / temp)``, alternately rescales so that every prototype gets
    1/K of the mass and every sample 1/B (B is the global batch when distributed; every rank
    must hold the same B). Returns (B, K) with each row summing to 1.
    """
    return _sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)


@torch.no_grad()
def _ema_center_update(center: Tensor, logits: Tensor, momentum: float) -> None:
    """``center <- center * m + mean(logits) * (1 - m)``, the mean over all rows on all ranks."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    # Row count travels with the sums in one all_reduce: ranks may hold different numbers
    # of rows (masked patches), and a tensor count avoids a device sync.
    stats = torch.cat([flat.sum(dim=0), flat.new_full((1,), flat.shape[0])])
    _all_reduce(stats)
    batch_mean = stats[:-1] / stats[-1].clamp_min(1.0)
    center.mul_(momentum).add_(batch_mean.unsqueeze(0), alpha=1.0 - momentum)


def _check_centering(centering: str) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"unknown centering {centering!r}; expected one of {CENTERINGS}")


class CenteredCrossEntropy(nn.Module):
    """What the DINO and iBOT losses share: the student temperature and the teacher center
    (a buffer, updated only by :meth:`update_center`, used by softmax centering)."""

    center: Tensor

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def student_log_probs(self, student_logits: Tensor) -> Tensor:
        return F.log_softmax(student_logits.float() * (1.0 / self.student_temp), dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the teacher's mean logits over all rows on all ranks."""
        _ema_center_update(self.center, teacher_logits, self.center_momentum)


class DINOLoss(CenteredCrossEntropy):
    """Cross-entropy between teacher targets of the global crops and all student crops."""

    def teacher_probs(
        self, teacher_logits: Tensor, teacher_temp: float, centering: str, n_iterations: int = 3
    ) -> Tensor:
        """Targets from teacher logits (..., K) with ``centering`` "softmax" or "sinkhorn_knopp".

        Sinkhorn-Knopp treats all leading dims as one batch, so pass the global crops of one
        step together (n_global * B rows) as DINOv2 does.
        """
        _check_centering(centering)
        if centering == "softmax":
            return softmax_center_teacher(teacher_logits, self.center, teacher_temp)
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        probs = sinkhorn_knopp_teacher(flat, teacher_temp, n_iterations)
        return probs.reshape(teacher_logits.shape)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, n_global: int = 2) -> Tensor:
        """Mean over (teacher crop, student crop) pairs, skipping same-view pairs, of H(t, s).

        ``student_logits`` is (n_student_crops, B, K) with the global crops first, in the
        teacher's order; ``teacher_probs`` is (n_global, B, K). Each pair's cross-entropy is
        averaged over the batch.

        Normalisation: the sum over pairs is divided by the number of pairs,
        ``n_global * (n_global - 1) + n_global * n_local``. facebookresearch/dinov2 divides by
        ``(n_global - 1) * n_global + max(n_local * n_global, 1)``: the same whenever there
        are local crops, but with none it counts a local pair that does not exist (2
        pairs / 3 at two global crops, so its DINO term is 2/3 of the pair mean). We keep
        the true mean: it is what facebookresearch/dinov3 computes (each term weighted by
        its count of pairs), it keeps the DINO weight relative to iBOT and KoLeo the same
        whatever the number of local crops, and DINOv2 runs use local crops (8) anyway.
        To reproduce a DINOv2 run without local crops exactly, scale
        ``loss.dino_loss_weight`` by 2/3.
        """
        n_student, batch, _ = student_logits.shape
        n_pairs = n_global * n_student - n_global
        if teacher_probs.shape[0] != n_global or n_student < n_global or n_pairs == 0:
            raise ValueError(
                f"expected {n_global} teacher crops and at least as many student crops, with "
                f"at least one cross-view pair, got "
                f"teacher {tuple(teacher_probs.shape)} and student {tuple(student_logits.shape)}"
            )
        log_probs = self.student_log_probs(student_logits)
        # (teacher crop, student crop) matrix of batch-mean cross-entropies in one contraction.
        ce = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), log_probs) / batch
        same_view = torch.eye(n_global, n_student, dtype=torch.bool, device=ce.device)
        return ce.masked_fill(same_view, 0.0).sum() / n_pairs
