"""Numbers of dinov.losses against hand computations (math / numpy, not the code under test)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov.losses import (
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sinkhorn(
    logits: np.ndarray, temp: float, n_iter: int, n_samples: float | None = None
) -> np.ndarray:
    """DINOv2's iterations written out plainly, in float64, without any max shift."""
    q = np.exp(logits / temp).T  # (K, B)
    k = q.shape[0]
    b = q.shape[1] if n_samples is None else n_samples
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


# ---------------------------------------------------------------- softmax centering


def test_softmax_center_teacher_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    center = torch.tensor([[0.5, 0.0, -0.5]])
    # (logits - center) / 0.5 = [[1, 4, 7], [-1, 0, 3]]
    row0 = [math.exp(1), math.exp(4), math.exp(7)]
    row1 = [math.exp(-1), math.exp(0), math.exp(3)]
    expected = torch.tensor([[v / sum(row0) for v in row0], [v / sum(row1) for v in row1]])
    got = softmax_center_teacher(logits, center, teacher_temp=0.5)
    torch.testing.assert_close(got, expected)

    loss = DINOLoss(out_dim=3)
    loss.center.copy_(center)
    torch.testing.assert_close(loss.teacher_probs(logits, 0.5, "softmax"), expected)


def test_update_center_momentum_by_hand() -> None:
    loss = DINOLoss(out_dim=3, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    # crops x batch x K: the batch mean over all 4 rows is [2, 2, 2]
    logits = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[2.0, 0.0, 2.0], [2.0, 4.0, 2.0]]])
    loss.update_center(logits)
    # 0.9 * [1, 0, 0] + 0.1 * [2, 2, 2]
    torch.testing.assert_close(loss.center, torch.tensor([[1.1, 0.2, 0.2]]))

    ibot = IBOTPatchLoss(out_dim=2, center_momentum=0.5)
    ibot.update_center(torch.tensor([[1.0, 3.0], [3.0, 5.0], [5.0, 1.0]]))  # mean [3, 3]
    torch.testing.assert_close(ibot.center, torch.tensor([[1.5, 1.5]]))


# ---------------------------------------------------------------- Sinkhorn-Knopp

TINY = np.array([[0.2, -0.4, 1.0], [0.9, 0.1, -0.3]])  # B=2, K=3


@pytest.mark.parametrize("n_iter", [1, 3, 10])
def test_sinkhorn_matches_plain_numpy(n_iter: int) -> None:
    got = sinkhorn_knopp_teacher(torch.tensor(TINY, dtype=torch.float32), 0.5, n_iter)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_sinkhorn(TINY, 0.5, n_iter), rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen)
    few = sinkhorn_knopp_teacher(logits, 0.2, n_iterations=3)
    torch.testing.assert_close(few.sum(dim=1), torch.ones(6))
    many = sinkhorn_knopp_teacher(logits, 0.2, n_iterations=300)
    torch.testing.assert_close(many.sum(dim=1), torch.ones(6))
    # each prototype gets 1/K of the samples' mass: column sums B/K
    torch.testing.assert_close(many.sum(dim=0), torch.full((4,), 6 / 4), rtol=1e-4, atol=1e-4)


def test_sinkhorn_differentiable_path_matches_and_has_the_right_gradient() -> None:
    """With a graph on the logits (designer gradient through the teacher) Sinkhorn runs out
    of place: same targets as the in-place path, and autograd's gradient passes gradcheck."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen)
    plain = sinkhorn_knopp_teacher(logits, 0.3, n_iterations=3)
    tracked = sinkhorn_knopp_teacher(logits.clone().requires_grad_(), 0.3, n_iterations=3)
    assert tracked.grad_fn is not None and plain.grad_fn is None
    torch.testing.assert_close(tracked, plain, rtol=1e-6, atol=1e-7)
    double = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp_teacher(x, 0.3, 3), (double,))


def test_sinkhorn_large_logits_do_not_overflow() -> None:
    logits = torch.tensor(TINY, dtype=torch.float32)
    shifted = sinkhorn_knopp_teacher(logits + 50.0, 0.05)  # exp(1000) overflows unshifted
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, sinkhorn_knopp_teacher(logits, 0.05))


def test_dino_teacher_probs_sinkhorn_keeps_crop_shape() -> None:
    logits = torch.tensor(np.stack([TINY, TINY[::-1]]), dtype=torch.float32)  # (2, 2, 3)
    got = DINOLoss(out_dim=3).teacher_probs(logits, 0.5, "sinkhorn_knopp")
    expected = np_sinkhorn(logits.reshape(4, 3).double().numpy(), 0.5, 3).reshape(2, 2, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DINO loss


def test_dino_loss_matches_double_loop() -> None:
    student = np.array(
        [
            [[0.1, 0.5, -0.2], [1.0, 0.0, 0.3]],
            [[-0.3, 0.2, 0.8], [0.4, 0.4, -1.0]],
            [[0.7, -0.6, 0.0], [0.2, 0.9, 0.1]],
        ]
    )  # 3 crops (2 global, 1 local), B=2, K=3
    teacher = np.array(
        [
            [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
            [[0.1, 0.1, 0.8], [0.3, 0.4, 0.3]],
        ]
    )
    temp = 0.1
    terms = []
    for t in range(2):
        for s in range(3):
            if s == t:
                continue
            log_p = np.log(np_softmax(student[s] / temp))
            terms.append(np.mean([-(teacher[t, b] * log_p[b]).sum() for b in range(2)]))
    expected = sum(terms) / len(terms)
    assert len(terms) == 4

    loss = DINOLoss(out_dim=3, student_temp=temp)
    got = loss(
        torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32)
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_without_local_crops_is_the_mean_over_the_two_cross_view_pairs() -> None:
    """The documented choice (DINOv3's weighting): with 2 global and 0 local crops the
    loss is the mean of H(t0, s1) and H(t1, s0), not DINOv2's sum / 3."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    teacher = teacher.softmax(-1)
    log_p = torch.log_softmax(student / 0.1, dim=-1)
    h01 = -(teacher[0] * log_p[1]).sum(-1).mean()
    h10 = -(teacher[1] * log_p[0]).sum(-1).mean()
    got = DINOLoss(out_dim=5, student_temp=0.1)(student, teacher)
    torch.testing.assert_close(got, (h01 + h10) / 2, atol=1e-6, rtol=0)
    dinov2_normalisation = (h01 + h10) / ((2 - 1) * 2 + max(0 * 2, 1))
    assert not torch.isclose(got, dinov2_normalisation)


def test_dino_loss_rejects_mismatched_crops() -> None:
    loss = DINOLoss(out_dim=3)
    with pytest.raises(ValueError, match="teacher crops"):
        loss(torch.zeros(3, 2, 3), torch.zeros(1, 2, 3), n_global=2)


@pytest.mark.parametrize("module", [DINOLoss(out_dim=3), IBOTPatchLoss(out_dim=3)])
def test_unknown_centering_is_named(module: DINOLoss | IBOTPatchLoss) -> None:
    with pytest.raises(ValueError, match="'centred'"):
        module.teacher_probs(torch.zeros(2, 3), 0.1, "centred")


# ---------------------------------------------------------------- iBOT loss


def test_ibot_loss_weights_by_hand() -> None:
    # 3 images: image 0 has 2 masked patches, image 1 has 1, image 2 none (DINOv2 weighting:
    # 1 / (masked in image * images in batch)).
    student = [[0.5, -0.5], [0.0, 1.0], [2.0, 0.0]]
    teacher = [[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]]
    weights = [1 / (2 * 3), 1 / (2 * 3), 1 / (1 * 3)]
    temp = 0.5
    expected = 0.0
    for s, t, w in zip(student, teacher, weights, strict=True):
        log_z = math.log(sum(math.exp(v / temp) for v in s))
        expected += w * -sum(tk * (sv / temp - log_z) for tk, sv in zip(t, s, strict=True))

    loss = IBOTPatchLoss(out_dim=2, student_temp=temp)
    got = loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(weights))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_teacher_probs_sinkhorn_uses_masked_count() -> None:
    logits = np.array([[0.3, -0.1, 0.5, 0.0], [1.0, 0.2, -0.4, 0.3], [0.0, 0.0, 0.9, -0.2]])
    loss = IBOTPatchLoss(out_dim=4)
    x = torch.tensor(logits, dtype=torch.float32)
    got = loss.teacher_probs(x, 0.3, "sinkhorn_knopp", n_masked_patches=torch.tensor(3))
    np.testing.assert_allclose(got.numpy(), np_sinkhorn(logits, 0.3, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.teacher_probs(x, 0.3, "sinkhorn_knopp"), got)


# ---------------------------------------------------------------- KoLeo


def test_koleo_three_points_by_hand() -> None:
    # Directions at 0, 60 and 180 degrees (lengths vary; KoLeo normalises them).
    # Neighbours: 0 -> 60 (chord 1), 60 -> 0 (chord 1), 180 -> 60 (chord 2 sin 60 = sqrt 3).
    pts = torch.tensor([[2.0, 0.0], [0.5 * 3, math.sqrt(3) / 2 * 3], [-0.5, 0.0]])
    loss = KoLeoLoss()
    torch.testing.assert_close(
        loss.nearest_neighbours(torch.nn.functional.normalize(pts)), torch.tensor([1, 0, 1])
    )
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3))) / 3
    assert loss(pts).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_antipodal_pair_is_not_its_own_neighbour() -> None:
    got = KoLeoLoss()(torch.tensor([[1.0, 0.0], [-3.0, 0.0]]))
    assert got.item() == pytest.approx(-math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("pts", [[[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [2.0, 4.0]]])
def test_koleo_identical_pair_is_finite(pts: list[list[float]]) -> None:
    x = torch.tensor(pts, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10  # -log(~1e-8): large but finite
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_koleo_rejects_single_sample() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.ones(1, 4))


# ---------------------------------------------------------------- distributed (gloo, 2 ranks)

DIST_DINO = torch.linspace(-1.0, 1.0, 6 * 5).reshape(6, 5) ** 3 * 4.0  # 3 rows per rank
DIST_PATCH = torch.cos(torch.arange(7 * 5, dtype=torch.float32)).reshape(7, 5) * 3.0
DIST_SPLIT = (2, 5)  # rank 0 holds 2 masked patches, rank 1 holds 5


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dino_local = DIST_DINO[3 * rank : 3 * rank + 3]
        patch_local = DIST_PATCH.split(DIST_SPLIT)[rank]
        dino, ibot = DINOLoss(out_dim=5), IBOTPatchLoss(out_dim=5)
        dino.update_center(dino_local)
        ibot.update_center(patch_local)
        out = {
            "dino_sk": sinkhorn_knopp_teacher(dino_local, 0.1),
            "ibot_sk": ibot.teacher_probs(
                patch_local, 0.1, "sinkhorn_knopp", n_masked_patches=torch.tensor(len(patch_local))
            ),
            "dino_center": dino.center,
            "ibot_center": ibot.center,
        }
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole_dino = sinkhorn_knopp_teacher(DIST_DINO, 0.1)
    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in ranks]), whole_dino)
    whole_patch = IBOTPatchLoss(out_dim=5).teacher_probs(DIST_PATCH, 0.1, "sinkhorn_knopp")
    torch.testing.assert_close(torch.cat([r["ibot_sk"] for r in ranks]), whole_patch)
    for r in ranks:  # center = 0.1 * global mean, rows weighted equally across ranks
        torch.testing.assert_close(r["dino_center"], 0.1 * DIST_DINO.mean(0, keepdim=True))
        torch.testing.assert_close(r["ibot_center"], 0.1 * DIST_PATCH.mean(0, keepdim=True))
