"""The modality-agnostic value-estimator core (DESIGN.md section 3).

This module owns one quantity: the directional derivative of a pretraining loss along a
direction in (a subset of) the learner's parameters,

    V = d/dε fn()|_{params + ε·v},  ε = 0,   v = direction / ‖direction‖,

returned as a tensor that stays differentiable w.r.t. everything ``fn`` depends on
besides ``params`` (the designer's outputs: views, masks, soft targets). It is shared by
the vision designers and the LM designer, so it imports nothing vision-specific.

The derivative is taken along the *unit* direction. A caller that needs
``g_downᵀ ∇θ L_pre`` multiplies the result by ``‖g_down‖`` (or, since only the designer
gradient's direction and scale relative to its learning rate matter, folds it into the
designer lr).

Methods:

- ``fd`` (default): central difference with a step relative to ``‖θ‖``; first-order
  autograd only, so it works with fused/flash attention kernels (see the caveats in
  :func:`directional_derivative` for checkpointing and sharding).
- ``exact``: double backward; the reference.
- ``jvp``: forward-mode AD (``torch.func.jvp`` through ``torch.func.functional_call``);
  needs the module that owns ``params``.

:func:`directional_derivative_split` is ``fd`` with the trunk below ``params`` run once
(the meta step's estimator, for a scalar loss): it differentiates each perturbed pass
as soon as it has run, so one pass's graph is alive at a time; its ``recompute=True``
also rebuilds the trunk's graph in the backward (activation-checkpointing style).
:func:`grad_only_for` freezes the model's other parameters while such a graph is built,
so it stores nothing for their gradients.

Contract for ``fn``: it reads parameters and buffers but updates no state (no BatchNorm
running stats in train mode, no EMA, no centering update; pass precomputed no-grad
teacher targets). The estimator itself only ever touches ``params``, and restores them
bitwise.

Gradients: ``fd`` and ``jvp`` cut ``params`` out of the returned value's graph, so a
backward through V reaches only the designer. ``exact`` cannot (its value is built from
a graph through ``params``): take designer gradients with
``torch.autograd.grad(V, designer_params)`` or zero the learner's grads afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

METHODS = ("fd", "exact", "jvp")


# ----------------------------------------------------------------------------- helpers
def unit_direction(direction: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``direction`` scaled to unit norm over all tensors jointly (fp32), and that norm."""
    flat = [_wide(d.detach()) for d in direction]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in flat]))
    if not torch.isfinite(norm) or norm.item() == 0.0:
        raise ValueError(f"direction must have a finite non-zero norm, got {norm.item()}")
    return [d / norm for d in flat], norm


def _check_shapes(params: Sequence[Tensor], direction: Sequence[Tensor]) -> None:
    if len(params) != len(direction):
        raise ValueError(f"{len(params)} params but {len(direction)} direction tensors")
    for i, (p, d) in enumerate(zip(params, direction, strict=True)):
        if p.shape != d.shape:
            raise ValueError(f"direction[{i}] has shape {tuple(d.shape)}, param {tuple(p.shape)}")


def _wide(t: Tensor) -> Tensor:
    """``t`` in fp32 at least (bf16/fp16 widened, fp64 kept): where differences are taken."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    # The fused CPU/CUDA attention kernels implement neither double backward nor forward
    # AD; the math backend decomposes attention into differentiable primitives.
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _detached(params: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily make ``params`` not require grad.

    The fd graphs then reach only the designer: backward skips every weight-gradient
    product of the perturbed passes and never writes ``param.grad``.
    """
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@contextlib.contextmanager
def grad_only_for(params: Iterable[Tensor], keep: Sequence[Tensor] = ()) -> Iterator[None]:
    """Of ``params``, only those in ``keep`` require grad inside the block; flags restored.

    Wrap a value evaluation (or a ``g_down`` forward) in it with every learner parameter
    in ``params`` and the ones differentiated in ``keep``: layers whose weights need no
    gradient then save no activations for one (a linear layer keeps only what its input
    gradient needs), so the graph to the designer is smaller. Graphs built inside stay
    valid after the block.
    """
    keep_ids = {id(p) for p in keep}
    with _detached([p for p in params if id(p) not in keep_ids]):
        yield


@contextlib.contextmanager
def _snapshot_saved_params(params: Sequence[Tensor]) -> Iterator[None]:
    """Save a private copy of any tensor sharing storage with ``params`` when autograd saves it.

    fd evaluates ``fn`` twice with the parameters edited in place between the passes; the
    graph of the first pass must keep seeing the values it ran with (θ+εv), not the later
    ones, or the designer gradient of the ``+`` pass would be computed with θ−εv weights.
    Views (e.g. ``weight.t()`` saved by ``addmm``) are matched by storage.
    """
    ptrs = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: Tensor) -> Any:
        if t.device.type != "meta" and t.untyped_storage().data_ptr() in ptrs:
            return t.detach().clone()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _set_perturbed(params: Sequence[Tensor], saved: Sequence[Tensor],
                   unit: Sequence[Tensor], step: float) -> None:
    # From the saved copy in fp32, never by adding to the current value: no drift.
    with torch.no_grad():
        for p, s, v in zip(params, saved, unit, strict=True):
            p.copy_((_wide(s) + step * v.to(s.device)).to(p.dtype))


# ----------------------------------------------------------------------------- methods
def fd_step(params: Sequence[Tensor], eps: float) -> float:
    """The fd step ε·max(‖θ‖, 1): relative to the parameter norm, absolute for tiny θ."""
    with torch.no_grad():
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params]))
    return eps * max(float(norm), 1.0)


def _perturbed_passes(fn: Callable[[float], Tensor], params: Sequence[Tensor],
                      unit: Sequence[Tensor], step: float,
                      rng: tuple[Tensor, list[Tensor] | None],
                      keep_graphs: bool = True) -> list[Tensor]:
    """``fn(s)`` at θ + s·step·v for s = +1, −1, each pass from the same RNG state; θ restored.

    ``keep_graphs``: the passes' graphs outlive the loop (the caller backpropagates
    through both later), so tensors autograd saves from ``params`` are copied at each pass.
    """
    saved = [p.detach().clone() for p in params]
    snapshot = _snapshot_saved_params(params) if keep_graphs else contextlib.nullcontext()
    outs = []
    try:
        with _detached(params), snapshot:
            for s in (1.0, -1.0):
                _set_rng_state(rng)
                _set_perturbed(params, saved, unit, s * step)
                outs.append(_wide(fn(s)))
    finally:
        with torch.no_grad():
            for p, t in zip(params, saved, strict=True):
                p.copy_(t)
    return outs


def _central_difference(fn: Callable[[], Tensor], params: Sequence[Tensor],
                        unit: Sequence[Tensor], eps: float) -> Tensor:
    """(fn(θ+hv) − fn(θ−hv)) / 2h with identical RNG draws; params restored bitwise."""
    step = fd_step(params, eps)
    plus, minus = _perturbed_passes(lambda _: fn(), params, unit, step, _rng_state())
    return (plus - minus) / (2.0 * step)


def _exact(fn: Callable[[], Tensor], params: Sequence[Tensor], unit: Sequence[Tensor]) -> Tensor:
    """Σ (∂fn/∂θ)·v with the graph kept, so the caller's backward is a double backward."""
    with _math_attention():
        out = fn()
        if out.numel() != 1:
            raise ValueError("method='exact' needs a scalar fn; use 'fd' or 'jvp' for tensors")
        grads = torch.autograd.grad(out, list(params), create_graph=True, allow_unused=True)
    total = _wide(out.new_zeros(()))
    for g, v in zip(grads, unit, strict=True):
        if g is not None:
            total = total + (_wide(g) * v.to(g.device)).sum()
    return total


def _layer_norm_by_primitives(x: Tensor, normalized_shape: Sequence[int],
                              weight: Tensor | None = None, bias: Tensor | None = None,
                              eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


class _DecomposedLayerNorm(TorchFunctionMode):
    """Runs ``F.layer_norm`` as mean/var/rsqrt primitives.

    The fused kernel's forward-AD formula reads its saved mean/rstd, which reverse mode
    treats as constants, so backpropagating a jvp tangent through it silently drops terms
    (the designer gradient was off by ~cos 0.94 on a tiny ViT). Primitives are exact.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm_by_primitives(*args, **kwargs)
        return func(*args, **kwargs)


class _Closure(nn.Module):
    """Lets ``functional_call`` swap parameters of ``inner`` while an arbitrary closure runs."""

    def __init__(self, inner: nn.Module, fn: Callable[[], Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self) -> Tensor:
        return self.fn()


def _param_names(module: nn.Module, params: Sequence[Tensor]) -> list[str]:
    by_id = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the given module")
    return [by_id[id(p)] for p in params]


def _jvp(fn: Callable[[], Tensor], params: Sequence[Tensor], unit: Sequence[Tensor],
         module: nn.Module | None) -> Tensor:
    """Forward-mode tangent of fn along v; differentiable w.r.t. the closure's other inputs.

    Chosen over ``torch.autograd.forward_ad`` because ``torch.func.functional_call`` is the
    public way to substitute dual tensors for a module's parameters; ``fn`` keeps calling
    the module as usual and sees the substituted tensors. Primals are detached, so the
    result carries no gradient to ``params`` (reverse-over-forward reaches the designer only).
    """
    if module is None:
        raise ValueError("method='jvp' needs the module that owns params (module=...)")
    wrapper = _Closure(module, fn)
    names = [f"inner.{n}" for n in _param_names(module, params)]

    def call(*tensors: Tensor) -> Tensor:
        return functional_call(wrapper, dict(zip(names, tensors, strict=True)), (), strict=False)

    primals = tuple(p.detach() for p in params)
    tangents = tuple(v.to(device=p.device, dtype=p.dtype)
                     for p, v in zip(params, unit, strict=True))
    with _math_attention(), _DecomposedLayerNorm():
        out, tangent = torch.func.jvp(call, primals, tangents)
    # functorch can promote a tangent to fp64 where Python scalars meet 0-dim tensors
    # (e.g. `w * loss` sums); the primal's dtype is the one the caller expects.
    return _wide(tangent.to(out.dtype))


# -------------------------------------------------------------------------------- API
def directional_derivative(
    fn: Callable[[], Tensor],
    params: Sequence[nn.Parameter] | Sequence[Tensor],
    direction: Sequence[Tensor],
    method: str = "fd",
    eps: float = 1e-3,
    module: nn.Module | None = None,
) -> Tensor:
    """≈ d/dε fn() at params + ε·v, ε = 0, with v = direction / ‖direction‖ (joint norm).

    ``fn`` is a zero-argument closure returning a tensor (a scalar loss for vision,
    per-token log-probabilities for the LM; ``exact`` needs a scalar). The result has
    fn's shape, is at least fp32, and stays differentiable w.r.t. fn's inputs other than ``params``.
    Multiply by ``unit_direction(direction)[1]`` (‖direction‖) for ``directionᵀ∇θ fn``.

    - ``fd``: central difference with step ``eps·max(‖θ‖, 1)`` (θ = ``params`` jointly);
      parameters edited under no_grad from a saved copy and restored bitwise; RNG state
      replayed so both passes draw the same dropout/drop-path masks; graph reaches the
      designer only (params detached during the passes).
    - ``exact``: ``autograd.grad(fn(), params, create_graph=True)`` dotted with v.
    - ``jvp``: ``torch.func.jvp`` through ``functional_call``; needs ``module`` (any module
      owning every tensor in ``params``).

    ``exact`` and ``jvp`` run attention on the math SDPA backend.

    Caveats (fd): activation checkpointing must be off for the blocks owning ``params``
    (its backward recomputes them with the restored θ, not θ±εv); ``params`` must be
    full tensors, not FSDP shards (norms and ε would be per shard, and FSDP would
    re-gather the restored shards in the backward): the meta step runs on an unsharded
    student (:func:`dinov.distributed.full_parameters`).
    Low-precision params (bf16) realise the step only up to their rounding.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = list(params)
    _check_shapes(params, direction)
    unit, _ = unit_direction(direction)
    if method == "fd":
        return _central_difference(fn, params, unit, eps)
    if method == "exact":
        return _exact(fn, params, unit)
    return _jvp(fn, params, unit, module)


def directional_derivative_split(
    trunk_fn: Callable[[], Sequence[Tensor]],
    head_fn: Callable[..., Tensor],
    params: Sequence[nn.Parameter] | Sequence[Tensor],
    direction: Sequence[Tensor],
    eps: float = 1e-3,
    recompute: bool = False,
) -> Tensor:
    """fd of a scalar loss with the trunk shared: ``trunk_fn`` runs once, ``head_fn`` at θ_S ± εv.

    ``trunk_fn()`` computes everything that does not depend on ``params`` and returns it
    as a sequence of tensors (activations below the aligned blocks with grad to the
    designer, and any other tensor the loss reads with a graph); ``head_fn(*inputs)`` maps
    them to a scalar. The result is differentiable w.r.t. those inputs only: a tensor with
    a graph that ``head_fn`` reads from elsewhere, or a weight outside ``params`` that
    requires grad, gets no gradient from it (the meta step freezes every learner weight
    outside θ_S, :func:`grad_only_for`). Its value equals
    ``directional_derivative(lambda: head_fn(*trunk_fn()), ..., method="fd")`` when
    ``trunk_fn`` does not read ``params``, and so does its gradient to the inputs. RNG
    note: the trunk's draws happen once, before the replayed head passes.

    The two head passes run one after the other, each followed at once by its backward
    to the inputs (possible because the output is a scalar: the caller's backward only
    scales those gradients), so at most one head graph is alive, next to the trunk graph:
    two-pass fd's time with one pass's memory. Since each pass is differentiated while
    θ_S ± εv is still set, activation checkpointing inside the head is safe here (unlike
    in :func:`directional_derivative`). The result supports one backward, not a double
    backward. Called with grad disabled, no head backward runs.

    ``recompute=True`` trades compute for memory, as activation checkpointing does: the
    trunk runs under :func:`torch.utils.checkpoint.checkpoint` (its graph is rebuilt in
    the caller's backward, after the head passes are gone). Peak memory is then one head
    graph or the trunk graph, whichever is larger; time grows by one trunk forward.
    ``trunk_fn`` must then be re-runnable (checkpoint replays its RNG draws).
    """
    params = list(params)
    _check_shapes(params, direction)
    unit, _ = unit_direction(direction)
    if recompute:
        inputs = tuple(checkpoint(lambda: tuple(trunk_fn()), use_reentrant=False))
    else:
        inputs = tuple(trunk_fn())
    step = fd_step(params, eps)
    # inside apply() grad mode is always off: whether a backward can follow is read here
    differentiate = torch.is_grad_enabled()
    return _SequentialCentralDifference.apply(head_fn, params, unit, step, differentiate, *inputs)


class _SequentialCentralDifference(torch.autograd.Function):
    """(head(θ+hv) − head(θ−hv)) / 2h of the trunk's outputs, each pass differentiated at once.

    Written by hand because autograd keeps both passes' graphs until the caller's
    backward. Here each pass's gradient w.r.t. the inputs is taken right after it runs
    (the parameters still at that pass's θ ± hv), summed in fp32 at least, and saved;
    the backward only scales the sum. Needs a scalar head: its gradient is then one
    tensor per input.
    """

    @staticmethod
    def forward(ctx: Any, head_fn: Callable[..., Tensor], params: list[Tensor],
                unit: list[Tensor], step: float, differentiate: bool, *inputs: Tensor) -> Tensor:
        wanted = [i for i, t in enumerate(inputs) if differentiate and t.requires_grad]
        sums: list[Tensor | None] = [None] * len(inputs)

        def pass_and_gradient(sign: float) -> Tensor:
            leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
            with torch.set_grad_enabled(bool(wanted)):
                out = _wide(head_fn(*leaves))
            if out.numel() != 1:
                raise ValueError(f"directional_derivative_split needs a scalar head, got shape "
                                 f"{tuple(out.shape)}; use directional_derivative")
            if wanted and out.requires_grad:
                scale = torch.full_like(out, sign / (2.0 * step))
                got = torch.autograd.grad(out, [leaves[i] for i in wanted], scale,
                                          allow_unused=True)
                for i, g in zip(wanted, got, strict=True):
                    if g is not None:
                        sums[i] = _wide(g) if sums[i] is None else sums[i] + _wide(g)
            return out.detach()

        plus, minus = _perturbed_passes(pass_and_gradient, params, unit, step,
                                        _rng_state(), keep_graphs=False)
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.save_for_backward(*sums)
        return (plus - minus) / (2.0 * step)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else (grad_out.to(g.dtype) * g).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]
        return (None, None, None, None, None, *grads)


def aligned_parameters(layers: Sequence[nn.Module], n_last: int,
                       final: Sequence[nn.Module] = ()) -> list[nn.Parameter]:
    """The aligned set S: the parameters of the last ``n_last`` of ``layers`` plus those of
    the ``final`` modules (``value.align_last_n_blocks``).

    The caller names its layers: a timm ViT's ``model.blocks`` and final ``model.norm``,
    an HF causal LM's ``model.layers`` and ``model.norm``.
    """
    layers = list(layers)
    if not 1 <= n_last <= len(layers):
        raise ValueError(f"n_last must be in [1, {len(layers)}], got {n_last}")
    params: list[nn.Parameter] = []
    for layer in [*layers[-n_last:], *final]:
        params += list(layer.parameters())
    return params
