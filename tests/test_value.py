"""designers.value: fd and jvp against exact on a tiny DINO/iBOT student, plus invariants.

The stand-in designer is a learnable per-image brightness φ: every view of image i is
scaled by (1 + φ_i), so the student loss, and hence V, depends on φ. Teacher targets are
precomputed (no grad) on the undesigned views, as a designer step does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import Tensor

from designers.value import (
    directional_derivative,
    directional_derivative_split,
    grad_only_for,
    unit_direction,
)
from designers.vision.value import backbone_aligned_parameters as aligned_parameters
from dinov.config import load_config
from dinov.data.masking import sample_block_masks
from dinov.train.meta_arch import SSLMetaArch, TeacherTargets
from dinov.train.task import Task

BATCH = 4


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def designed(task: Task, phi: Tensor) -> Task:
    """Scale each image's views by (1 + φ_i); views are view-major (rows v*B + i)."""
    g = (1 + phi).repeat(task.n_global).view(-1, 1, 1, 1)
    loc = (1 + phi).repeat(task.n_local).view(-1, 1, 1, 1)
    return Task(task.student_global * g, task.teacher_global, task.local * loc, task.masks,
                task.n_global, task.n_local)


@pytest.fixture(scope="module")
def setup() -> tuple[SSLMetaArch, Task, TeacherTargets]:
    torch.manual_seed(0)
    cfg = load_config("configs/smoke.yaml", ["model.depth=3", "model.drop_path_rate=0.2"])
    meta = SSLMetaArch(cfg)
    meta.train()  # drop-path active: fd must replay the same draws in both passes
    g, loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local = cfg.crops.local_crops_number
    grid = meta.backbone.patch_grid(g, g)
    masks = sample_block_masks(2 * BATCH, grid, cfg.masks, torch.Generator().manual_seed(0))
    images = torch.rand(2 * BATCH, 3, g, g)
    task = Task(images, images, torch.rand(n_local * BATCH, 3, loc, loc), masks, 2, n_local)
    targets = meta.teacher_targets(task, teacher_temp=0.04)
    return meta, task, targets


def random_direction(params: list[torch.nn.Parameter], seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def value_and_grad(meta: SSLMetaArch, task: Task, targets: TeacherTargets, method: str,
                   n_blocks: int = 2) -> tuple[Tensor, Tensor]:
    params = aligned_parameters(meta.backbone, n_blocks)
    phi = torch.zeros(BATCH, requires_grad=True)
    torch.manual_seed(123)  # same drop-path draws for every method

    def fn() -> Tensor:
        return meta.student_losses(designed(task, phi), targets)["total"]

    value = directional_derivative(fn, params, random_direction(params), method=method,
                                   module=meta.student)
    (grad,) = torch.autograd.grad(value, phi)
    return value.detach(), grad


def state_copy(meta: SSLMetaArch) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in meta.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_designer_gradient_matches_exact(setup, method: str) -> None:
    meta, task, targets = setup
    v_exact, g_exact = value_and_grad(meta, task, targets, "exact")
    v, g = value_and_grad(meta, task, targets, method)
    assert g_exact.abs().max() > 1e-4  # the check is not vacuous
    assert cosine(g, g_exact) >= 0.99
    assert torch.allclose(v, v_exact, rtol=1e-2, atol=1e-4)
    assert torch.allclose(g, g_exact, rtol=5e-2, atol=1e-2 * float(g_exact.abs().max()))


@pytest.mark.parametrize("method", ["fd", "exact", "jvp"])
def test_params_and_buffers_unchanged(setup, method: str) -> None:
    meta, task, targets = setup
    before = state_copy(meta)
    flags = [p.requires_grad for p in meta.parameters()]
    value_and_grad(meta, task, targets, method)
    after = meta.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [p.requires_grad for p in meta.parameters()] == flags
    if method != "exact":  # fd and jvp cut params out of V's graph: no learner grads
        assert all(p.grad is None for p in meta.parameters())
    meta.zero_grad(set_to_none=True)


def test_fd_advances_the_callers_rng_as_one_pass(setup) -> None:
    # Both fd passes replay one RNG state (the drop-path agreement with exact above
    # depends on it); afterwards the caller's stream must be where one pass leaves it.
    meta, task, targets = setup
    params = aligned_parameters(meta.backbone, 1)

    def fn() -> Tensor:
        return meta.student_losses(task, targets)["total"]

    torch.manual_seed(7)
    value = directional_derivative(fn, params, random_direction(params))
    after_fd = torch.rand(8)
    torch.manual_seed(7)
    fn()
    after_one = torch.rand(8)
    assert torch.isfinite(value)
    assert torch.equal(after_fd, after_one)


def test_split_equals_plain_fd(setup) -> None:
    meta, task, targets = setup
    backbone, head = meta.student["backbone"], meta.student["dino_head"]
    n_aligned = 2
    start = backbone.num_blocks - n_aligned
    params = aligned_parameters(backbone, n_aligned)
    direction = random_direction(params, seed=3)
    phi = torch.zeros(BATCH, requires_grad=True)
    shell = {}

    def trunk() -> tuple[Tensor]:
        views = designed(task, phi).student_global
        state = backbone.prepare_tokens(views)
        shell["state"] = state
        return (backbone.run_blocks(state, 0, start).x,)

    def head_fn(x: Tensor) -> Tensor:
        state = dataclasses.replace(shell["state"], x=x)
        out = backbone.finalize(backbone.run_blocks(state, start))
        logits = head(out.cls).float().unflatten(0, (task.n_global, -1))
        return meta.dino_loss(logits, targets.dino_probs, n_global=task.n_global)

    meta.eval()  # no drop-path: the trunk's draws would differ between the two layouts
    try:
        v_plain = directional_derivative(lambda: head_fn(*trunk()), params, direction)
        (g_plain,) = torch.autograd.grad(v_plain, phi)
        v_split = directional_derivative_split(trunk, head_fn, params, direction)
        (g_split,) = torch.autograd.grad(v_split, phi)
    finally:
        meta.train()
    assert torch.equal(v_plain, v_split)
    assert torch.allclose(g_plain, g_split, rtol=1e-5, atol=1e-7)
    assert g_plain.abs().max() > 0


@pytest.mark.parametrize("recompute", [False, True])
def test_student_trunk_split_matches_plain_fd(setup, recompute: bool) -> None:
    """SSLMetaArch.student_trunk (DINO + iBOT + KoLeo, local crops, drop-path on): the
    split value and its designer gradient equal plain fd on student_losses, with and
    without recomputation; params, buffers and the caller's RNG stream are untouched."""
    meta, task, targets = setup
    n_aligned = 2
    params = aligned_parameters(meta.backbone, n_aligned)
    direction = random_direction(params, seed=5)
    before = state_copy(meta)

    def split_value() -> tuple[Tensor, Tensor, Tensor]:
        phi = torch.zeros(BATCH, requires_grad=True)
        trunk, head = meta.student_trunk(designed(task, phi), targets, meta.num_blocks - n_aligned)
        torch.manual_seed(11)
        value = directional_derivative_split(trunk, head, params, direction, recompute=recompute)
        (grad,) = torch.autograd.grad(value, phi)
        return value.detach(), grad, torch.rand(4)  # the stream after value + backward

    phi = torch.zeros(BATCH, requires_grad=True)
    torch.manual_seed(11)
    v_plain = directional_derivative(
        lambda: meta.student_losses(designed(task, phi), targets)["total"], params, direction)
    (g_plain,) = torch.autograd.grad(v_plain, phi)
    meta.eval()
    try:  # the cut at any block is the same function as student_losses
        for end in (0, 1, meta.num_blocks):
            trunk, head = meta.student_trunk(task, targets, end)
            assert torch.allclose(head(*trunk()), meta.student_losses(task, targets)["total"],
                                  rtol=1e-6, atol=1e-6)
    finally:
        meta.train()
    v, g, _ = split_value()
    v2, g2, after = split_value()
    assert g_plain.abs().max() > 1e-5
    assert torch.allclose(v, v_plain, rtol=1e-4, atol=1e-6)
    assert cosine(g, g_plain) > 0.999
    assert torch.equal(v, v2) and torch.equal(g, g2)  # deterministic, RNG replayed
    torch.manual_seed(11)
    trunk, head = meta.student_trunk(designed(task, torch.zeros(BATCH)), targets,
                                     meta.num_blocks - n_aligned)
    head(*trunk())  # one forward: where a value evaluation leaves the caller's stream
    assert torch.equal(after, torch.rand(4))
    after_state = meta.state_dict()
    for key in before:
        assert torch.equal(before[key], after_state[key]), key
    assert all(p.grad is None for p in meta.parameters())


@pytest.mark.parametrize("recompute", [False, True])
def test_split_differentiates_through_soft_token_masks(setup, recompute: bool) -> None:
    """token_mask designer: the soft masks enter the patch embedding (in the trunk) and
    the iBOT weights (a head argument); the split's designer gradient equals plain fd's
    through both."""
    meta, task, targets = setup
    params = aligned_parameters(meta.backbone, 2)
    direction = random_direction(params, seed=9)

    def soft(phi: Tensor) -> Task:
        scale = (1 + phi).repeat(task.n_global).view(-1, 1)
        return dataclasses.replace(task, soft_masks=task.masks.masks.float() * scale)

    meta.eval()  # no drop-path: the split and the plain passes then see the same network
    try:
        phi = torch.zeros(BATCH, requires_grad=True)
        v_plain = directional_derivative(
            lambda: meta.student_losses(soft(phi), targets)["total"], params, direction)
        (g_plain,) = torch.autograd.grad(v_plain, phi)
        phi = torch.zeros(BATCH, requires_grad=True)
        trunk, head = meta.student_trunk(soft(phi), targets, meta.num_blocks - 2)
        value = directional_derivative_split(trunk, head, params, direction, recompute=recompute)
        (g,) = torch.autograd.grad(value, phi)
    finally:
        meta.train()
    assert g_plain.abs().max() > 1e-3
    assert torch.allclose(value, v_plain, rtol=1e-4, atol=1e-6)
    assert torch.allclose(g, g_plain, rtol=1e-4, atol=1e-6)


class _LiveSaved:
    """Autograd-saved tensor bookkeeping: bytes held by live graphs now and at the peak."""

    now = 0
    peak = 0

    def __init__(self, t: Tensor) -> None:
        # detached: holding a saved output itself would make a reference cycle with its
        # grad_fn, and the graph would never be freed
        self.t, self.n = t.detach(), t.numel() * t.element_size()
        _LiveSaved.now += self.n
        _LiveSaved.peak = max(_LiveSaved.peak, _LiveSaved.now)

    def __del__(self) -> None:
        _LiveSaved.now -= self.n


def _live_saved(fn: Callable[[], object]) -> tuple[object, int, int]:
    """fn(), the peak bytes of saved tensors alive during it, and those still alive after."""
    _LiveSaved.now = _LiveSaved.peak = 0
    with torch.autograd.graph.saved_tensors_hooks(_LiveSaved, lambda s: s.t):
        out = fn()
    return out, _LiveSaved.peak, _LiveSaved.now


def test_split_keeps_one_head_graph_alive_at_a_time(setup) -> None:
    """The split fd differentiates each perturbed pass as soon as it has run: its peak is
    the trunk's graph plus ONE head pass's graph (two-pass autograd would hold two)."""
    meta, task, targets = setup
    params = aligned_parameters(meta.backbone, 2)
    direction = random_direction(params, seed=7)
    phi = torch.zeros(BATCH, requires_grad=True)
    meta.eval()  # no drop-path, so the separately measured passes are the same passes
    try:
        trunk, head = meta.student_trunk(designed(task, phi), targets, meta.num_blocks - 2)
        acts, trunk_peak, trunk_bytes = _live_saved(trunk)
        input_grads = sum(a.numel() * 4 for a in acts if a.requires_grad)  # type: ignore[union-attr]
        leaves = [a.detach().requires_grad_(a.requires_grad) for a in acts]  # type: ignore[union-attr]
        with grad_only_for(params):  # θ_S as in the estimator's passes: no weight grads
            out, head_peak, head_bytes = _live_saved(partial(head, *leaves))
        del acts, leaves, out  # their graphs are freed before the counters restart
        value, split_peak, after = _live_saved(
            lambda: directional_derivative_split(trunk, head, params, direction))
        (grad,) = torch.autograd.grad(value, phi)  # type: ignore[arg-type]
    finally:
        meta.train()
    assert head_bytes > 0.2 * trunk_bytes  # the test can tell one head graph from two
    assert split_peak >= trunk_bytes + head_bytes  # a head pass was counted...
    assert split_peak <= max(trunk_peak, trunk_bytes + head_peak)  # ...but never two
    # once V is returned: the trunk's graph and the summed gradients at its outputs
    assert after == trunk_bytes + input_grads
    assert grad.abs().max() > 0


def quadratic(a: Tensor, x: Tensor, w: Tensor) -> Callable[[], Tensor]:
    return lambda: 0.5 * w @ a @ w + (x * w).sum() * x.sum()


def test_exact_and_fd_on_quadratic_match_analytic() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T
    w = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, generator=gen, dtype=torch.float64)
    unit, norm = unit_direction([d])
    assert math.isclose(float(norm), float(d.norm()), rel_tol=1e-6)
    v = (d / d.norm()).to(torch.float64)
    fn = quadratic(a, x, w)
    # f = ½wᵀAw + (xᵀw)(Σx): ∇_w f = Aw + x·Σx, so V = vᵀAw + (xᵀv)(Σx), ∂V/∂x = v·Σx + xᵀv.
    expected = v @ a @ w + (x @ v) * x.sum()
    expected_grad = v * x.sum() + (x @ v)
    for method in ("exact", "fd"):
        value = directional_derivative(fn, [w], [d], method=method)
        (grad,) = torch.autograd.grad(value, x)
        tol = 1e-10 if method == "exact" else 1e-4  # fd evaluates fn in its dtype, diffs in fp32
        assert torch.allclose(value.double(), expected, rtol=tol, atol=tol), method
        assert torch.allclose(grad, expected_grad.detach(), rtol=tol, atol=tol), method


def test_bad_arguments() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        directional_derivative(lambda: w.sum(), [w], [torch.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        directional_derivative(lambda: w.sum(), [w], [torch.ones(4)])
    with pytest.raises(ValueError, match="method"):
        directional_derivative(lambda: w.sum(), [w], [torch.ones(3)], method="bogus")
    with pytest.raises(ValueError, match="module"):
        directional_derivative(lambda: w.sum(), [w], [torch.ones(3)], method="jvp")


def test_grad_only_for_saves_less_and_keeps_the_gradients() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                              torch.nn.GELU(), torch.nn.Linear(64, 1))
    kept = list(net[4].parameters())
    x = torch.randn(32, 8, requires_grad=True)
    full, _, full_bytes = _live_saved(lambda: net(x).sum())
    with grad_only_for(net.parameters(), keep=kept):
        lean, _, lean_bytes = _live_saved(lambda: net(x).sum())
    # flags are back, and the graph built inside still works after the block
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal(full, lean)
    got = torch.autograd.grad(lean, [x, *kept])
    want = torch.autograd.grad(full, [x, *kept])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # the frozen linear layers kept no inputs for their weight gradients: x (32x8) and
    # the first GELU's output (32x64) are gone; the kept last layer still saves its input
    assert full_bytes - lean_bytes == (32 * 8 + 32 * 64) * 4
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(lean, net[0].weight)


def test_designer_gradient_through_the_teacher_views(setup) -> None:
    """designer.teacher_gradient: the teacher's views are designed too and their targets
    (Sinkhorn-Knopp, the smoke config's centering) keep a graph; fd and jvp still agree
    with exact, and the teacher path changes the gradient."""
    from designers.config import ValueConfig
    from designers.vision.value import designed_loss_derivative

    meta, task, _ = setup
    assert meta.cfg.loss.centering == "sinkhorn_knopp"
    params = aligned_parameters(meta.backbone, 2)
    direction = random_direction(params)

    def grad(method: str, through_teacher: bool, recompute: bool = False) -> Tensor:
        phi = torch.zeros(BATCH, requires_grad=True)
        view = designed(task, phi)
        if through_teacher:
            view = dataclasses.replace(
                view, teacher_global=task.teacher_global * (1 + phi).repeat(task.n_global).view(-1, 1, 1, 1))
        torch.manual_seed(123)
        targets = meta.teacher_targets(view, teacher_temp=0.04, differentiable=through_teacher)
        cfg = ValueConfig(method=method, align_last_n_blocks=2, recompute=recompute)
        value = designed_loss_derivative(meta, view, targets, params, direction, cfg)
        (g,) = torch.autograd.grad(value, phi)
        meta.zero_grad(set_to_none=True)
        return g

    exact = grad("exact", True)
    for method in ("fd", "jvp"):
        assert cosine(grad(method, True), exact) >= 0.99, method
    student_only = grad("exact", False)
    assert (exact - student_only).abs().max() > 0.05 * exact.abs().max()
    # the targets reach the split head as its arguments: recomputing the trunk keeps the
    # teacher path
    stored, recomputed = grad("fd", True), grad("fd", True, recompute=True)
    assert torch.allclose(recomputed, stored, rtol=1e-5, atol=1e-8)
    assert cosine(recomputed, exact) >= 0.99
