"""Feedback heads and the downstream gradient ``g_down`` (DESIGN.md section 3, "Vision").

A designer (meta) step starts with two stages that live here:

1. **fit the feedback heads** (:meth:`FeedbackHeads.fit`): a linear+BN segmentation head
   (:class:`eval.heads.LinearBNSegHead`, pixel cross-entropy) and a linear depth head
   (:class:`eval.heads.LinearDepthHead`, SigLoss or L1) are trained for a few steps
   on *frozen* backbone features (computed under ``no_grad``) of images from the **head
   pool**, with their own optimizer whose state persists across meta steps;
2. **compute g_down** (:func:`downstream_gradient_and_loss`):
   ``g_down = grad_{theta_S}(alpha_seg * L_seg + alpha_depth * L_depth)`` on a batch of the
   **meta pool**, only w.r.t. the aligned parameters ``theta_S`` (the last ViT blocks plus
   the final norm, :func:`designers.vision.value.backbone_aligned_parameters`), with
   the heads held fixed.

Pools (:class:`FeedbackPools`) are two *disjoint* sets of labelled images. Sources:

- ``synthetic``: procedurally rendered scenes (:func:`dinov.data.synthetic.render_scenes`)
  with exact labels and depth, taken from scene indices starting at
  :data:`FEEDBACK_INDEX_OFFSET` (10**9). Pretraining renders scenes ``0 .. num_samples-1``
  of its seed, so feedback scenes never coincide with pretraining scenes (even when the
  seeds are equal) as long as a run uses fewer than 10**9 pretraining scenes. The head
  pool is indices ``offset .. offset+H-1`` and the meta pool the next ``M``.
- ``real``: the ADE20K *training* split (segmentation) and an NYUv2 split file (depth),
  read by :class:`dinov.data.datasets.ADE20KDataset` / :class:`NYUDepthDataset`; a seeded
  permutation of each dataset's items is split into head and meta pools. The evaluation
  uses ADE20K ``validation`` / the NYU test split, so feedback never sees evaluation images
  as long as the NYU split file given here is the training one.

**Invariant: feedback labels reach the learner only through g_down.** Nothing here writes
to a backbone parameter, buffer or ``.grad`` field: features for head fitting are computed
under ``no_grad`` and detached, and ``g_down`` is obtained with ``torch.autograd.grad``
(never ``.backward()``), so no gradient is accumulated into the learner's ``.grad``. The
returned tensors are detached. The learner itself only ever sees the designer's outputs,
which depend on the labels through ``V`` (a directional derivative along ``g_down``).

**Why the heads run in eval mode during g_down.** BatchNorm in train mode would (a) update
its running statistics from meta-pool images, i.e. change a buffer, and (b) make every
image's loss depend on the rest of the batch. In eval mode the heads are a fixed,
per-image function, so ``g_down`` is the gradient of a well-defined loss and nothing
changes. The backbone also runs in eval mode (no drop-path noise) for both stages; each
module's previous training flag is restored afterwards.

The random-feedback control (``feedback.mode=random``) replaces ``g_down`` by a random
direction of the same norm in the modality-free core (:mod:`designers.meta`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from designers.value import grad_only_for
from designers.vision.config import FeedbackConfig
from dinov.data.datasets import ADE_IGNORE_INDEX, ADE20KDataset, NYUDepthDataset
from dinov.data.synthetic import NUM_CLASSES, render_scenes
from dinov.distributed import all_gather_rows, all_reduce_mean, all_reduce_mean_list, is_distributed
from dinov.models import Backbone
from eval.heads import (
    LinearBNSegHead,
    LinearDepthHead,
    depth_loss,
    layer_indices,
    multilayer_features,
    normalize,
    seg_loss,
    valid_depth_mask,
)

__all__ = [
    "FEEDBACK_INDEX_OFFSET",
    "FeedbackBatch",
    "FeedbackConfig",
    "FeedbackHeads",
    "FeedbackPools",
    "downstream_gradient_and_loss",
    "downstream_loss",
    "feedback_losses",
    "this_ranks_share",
    "weighted_feedback_loss",
]

# First synthetic scene index used for feedback images; pretraining uses 0..num_samples-1.
FEEDBACK_INDEX_OFFSET = 10**9
ADE20K_NUM_CLASSES = 150
POOLS = ("head", "meta")


# ---------------------------------------------------------------------- pools


@dataclass
class FeedbackBatch:
    """Images in [0, 1] with their labels. ``depth_images is seg_images`` for synthetic
    scenes (one image carries both labels), which lets the trunk run once."""

    seg_images: Tensor | None = None  # (B, 3, H, W) float
    seg_labels: Tensor | None = None  # (B, H, W) int64, 0..K-1 or 255 (ignore)
    depth_images: Tensor | None = None
    depth: Tensor | None = None  # (B, H, W) float metres, 0 = invalid

    def to(self, device: torch.device | str) -> FeedbackBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else None)
            for f in dataclasses.fields(self)
        }
        if self.depth_images is not None and self.depth_images is self.seg_images:
            moved["depth_images"] = moved["seg_images"]  # keep the shared-images identity
        return FeedbackBatch(**moved)

    def shard(self, rank: int, world_size: int) -> FeedbackBatch:
        """Rank ``rank``'s rows: the batch cut into ``world_size`` equal contiguous parts."""
        parts: dict[str, Tensor | None] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                parts[f.name] = None
                continue
            if value.shape[0] % world_size:
                raise ValueError(
                    f"a feedback batch of {value.shape[0]} images cannot be shared equally by "
                    f"{world_size} ranks: set feedback.head_batch_size and "
                    f"feedback.meta_batch_size to multiples of {world_size}")
            parts[f.name] = value.chunk(world_size)[rank]
        if self.depth_images is not None and self.depth_images is self.seg_images:
            parts["depth_images"] = parts["seg_images"]
        return FeedbackBatch(**parts)


def this_ranks_share(batch: FeedbackBatch) -> FeedbackBatch:
    """Under DDP, this rank's share of a batch every rank sampled alike (else the batch).

    The backbone work of head fitting, ``g_down`` and the calibration is split this way:
    each rank runs 1/world of the images (see :meth:`FeedbackHeads.fit` and
    :func:`downstream_gradient_and_loss` for how the shares are recombined).
    """
    if not is_distributed():
        return batch
    return batch.shard(torch.distributed.get_rank(), torch.distributed.get_world_size())


@dataclass
class _Pool:
    """One labelled image set; images kept as uint8 (a 2,000-image ADE pool at 224 px
    is 300 MB instead of 1.2 GB in float)."""

    images: Tensor  # (N, 3, H, W) uint8
    targets: Tensor  # (N, H, W) uint8 seg labels or float32 depth

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _to_uint8(images: Tensor) -> Tensor:
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)


def _split_indices(n: int, n_head: int, n_meta: int, seed: int, what: str) -> tuple[Tensor, Tensor]:
    if n_head < 1 or n_meta < 1:
        raise ValueError(f"{what}: head and meta pools need >= 1 image, got {n_head}, {n_meta}")
    if n < n_head + n_meta:
        raise ValueError(
            f"{what}: {n} images cannot fill a {n_head}-image head pool and a disjoint "
            f"{n_meta}-image meta pool; lower the pool sizes"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_head], order[n_head : n_head + n_meta]


def _load(dataset: Any, indices: Tensor, target_dtype: torch.dtype) -> _Pool:
    images, targets = zip(*(dataset[int(i)] for i in indices), strict=True)
    return _Pool(_to_uint8(torch.stack(images)), torch.stack(targets).to(target_dtype))


class FeedbackPools:
    """Disjoint head and meta pools of labelled feedback images (see the module docstring).

    ``pools.seg[pool]`` / ``pools.depth[pool]`` hold the images; ``sample`` draws a batch.
    For the synthetic source both tasks share one set of scenes per pool.
    """

    def __init__(self, cfg: FeedbackConfig) -> None:
        self.cfg = cfg
        self.seg: dict[str, _Pool] = {}
        self.depth: dict[str, _Pool] = {}
        self.shared = cfg.source == "synthetic"
        if cfg.source == "synthetic":
            self._build_synthetic()
        else:
            self._build_real()
        if not self.seg and not self.depth:
            raise ValueError("feedback: no labelled source (set ade20k_root and/or nyu_split_file)")

    @property
    def num_classes(self) -> int:
        if self.cfg.seg_num_classes is not None:
            return self.cfg.seg_num_classes
        return NUM_CLASSES if self.cfg.source == "synthetic" else ADE20K_NUM_CLASSES

    def _build_synthetic(self) -> None:
        cfg = self.cfg
        n_head, n_meta = cfg.synthetic_head_pool, cfg.synthetic_meta_pool
        if n_head < 1 or n_meta < 1:
            raise ValueError(f"synthetic pools need >= 1 image, got {n_head}, {n_meta}")
        scenes = render_scenes(n_head + n_meta, cfg.image_size, cfg.seed, FEEDBACK_INDEX_OFFSET)
        images = _to_uint8(scenes.images)
        # ADE-style labels: synthetic ids 1..K become 0..K-1 (synthetic scenes have no 0).
        labels = (scenes.labels - 1).clamp_min(0).to(torch.uint8)
        for name, part in (("head", slice(0, n_head)), ("meta", slice(n_head, None))):
            self.seg[name] = _Pool(images[part], labels[part])
            self.depth[name] = _Pool(images[part], scenes.depth[part].clone())

    def _build_real(self) -> None:
        cfg = self.cfg
        if cfg.ade20k_root is not None:
            ade = ADE20KDataset(cfg.ade20k_root, "training", image_size=cfg.image_size)
            head, meta = _split_indices(
                len(ade), cfg.seg_head_pool, cfg.seg_meta_pool, cfg.seed, "ADE20K training"
            )
            self.seg = {"head": _load(ade, head, torch.uint8), "meta": _load(ade, meta, torch.uint8)}
        if cfg.nyu_split_file is not None:
            nyu = NYUDepthDataset(
                cfg.nyu_split_file, cfg.nyu_root, image_size=cfg.image_size, max_depth=cfg.max_depth
            )
            head, meta = _split_indices(
                len(nyu), cfg.depth_head_pool, cfg.depth_meta_pool, cfg.seed + 1, "NYUv2"
            )
            self.depth = {
                "head": _load(nyu, head, torch.float32),
                "meta": _load(nyu, meta, torch.float32),
            }

    @staticmethod
    def _indices(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
        if batch_size <= n:
            return torch.randperm(n, generator=generator)[:batch_size]
        return torch.randint(n, (batch_size,), generator=generator)  # small pool: with replacement

    def sample(self, pool: str, batch_size: int, generator: torch.Generator) -> FeedbackBatch:
        """A batch of ``batch_size`` images of ``pool`` ("head" or "meta"), on the CPU."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        batch = FeedbackBatch()
        seg_idx = None
        if pool in self.seg:
            p = self.seg[pool]
            seg_idx = self._indices(len(p), batch_size, generator)
            batch.seg_images = p.images[seg_idx].float() / 255.0
            batch.seg_labels = p.targets[seg_idx].long()
        if pool in self.depth:
            p = self.depth[pool]
            if self.shared and seg_idx is not None:
                batch.depth_images = batch.seg_images
                batch.depth = p.targets[seg_idx]
            else:
                idx = self._indices(len(p), batch_size, generator)
                batch.depth_images = p.images[idx].float() / 255.0
                batch.depth = p.targets[idx]
        return batch


# ---------------------------------------------------------------------- heads


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore each module's (and submodule's) training flag."""
    flags = [[(m, m.training) for m in module.modules()] for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for pairs in flags:
            for m, flag in pairs:
                m.training = flag


class FeedbackHeads(nn.Module):
    """The seg head on the last block's normed patch features and the depth head on
    ``depth_layers`` blocks' patch features + CLS tokens, plus their optimizer.

    The optimizer (AdamW) and the head-batch generator are part of :meth:`state_dict`
    (through ``get_extra_state``), so a checkpoint resumes them.
    """

    def __init__(self, backbone: Backbone, cfg: FeedbackConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        dim = backbone.embed_dim
        self.depth_blocks = layer_indices(backbone.num_blocks, cfg.depth_layers, cfg.depth_layer_set)
        self.seg_head = LinearBNSegHead(dim, num_classes)
        self.depth_head = LinearDepthHead(
            2 * dim * len(self.depth_blocks),
            mode=cfg.depth_head_mode,
            n_bins=cfg.depth_n_bins,
            min_depth=cfg.min_depth,
            max_depth=cfg.max_depth,
        )
        self.to(next(backbone.parameters()).device)
        self.optimizer = torch.optim.AdamW(
            self.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay
        )
        # Its own stream (the random control's directions have another, in the core): the
        # control run samples exactly the same head batches as the real one.
        self.sample_generator = torch.Generator().manual_seed(cfg.seed)
        self.fit_steps = 0

    # -- checkpointing: the optimizer and generators travel inside the module's state_dict
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "sample_generator": self.sample_generator.get_state(),
            "fit_steps": self.fit_steps,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.sample_generator.set_state(state["sample_generator"])
        self.fit_steps = int(state["fit_steps"])

    def fit(
        self, backbone: Backbone, pools: FeedbackPools, steps: int | None = None
    ) -> dict[str, float]:
        """Train both heads ``steps`` steps on frozen features of head-pool batches; returns
        the last step's losses. The backbone is untouched.

        Default ``steps``: ``cfg.head_warmup_steps`` for the first fit of fresh heads (when
        set), ``cfg.head_steps`` after it. The heads persist between meta steps, so later
        fits only track a slowly moving backbone; a long first fit and short later ones
        give ``g_down`` from fitted heads from the first meta step at a fraction of the
        cost (each head step is a backbone forward of ``head_batch_size`` images per task).
        """
        if steps is None:
            first = self.fit_steps == 0 and self.cfg.head_warmup_steps > 0
            steps = self.cfg.head_warmup_steps if first else self.cfg.head_steps
        device = next(self.parameters()).device
        last: dict[str, Tensor] = {}
        self.train()
        for _ in range(steps):
            batch = pools.sample("head", self.cfg.head_batch_size, self.sample_generator)
            batch = batch.to(device)
            # DDP: the backbone (the cost) runs on this rank's share; the gathered features
            # are the whole batch's, so every rank takes the same step on the same batch as
            # one process would (BatchNorm statistics of the whole batch included)
            with torch.no_grad(), _eval_mode(backbone):
                feats = _features(backbone, this_ranks_share(batch), self.depth_blocks)
            feats = {k: all_gather_rows(v.detach()) for k, v in feats.items()}
            # Both heads are fit regardless of the alphas: an alpha only weights g_down.
            losses = _head_losses(self, backbone, batch, feats)
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # type: ignore[union-attr]
            self.optimizer.step()
            self.fit_steps += 1
            last = {k: v.detach() for k, v in losses.items()}
        return {k: float(v) for k, v in last.items()}  # one host sync, after the last step


def _features(backbone: Backbone, batch: FeedbackBatch, depth_blocks: list[int]) -> dict[str, Tensor]:
    """Feature maps for the heads; the trunk runs once per distinct image tensor.

    ``seg``: the last block's normed patch map (equal to
    :func:`eval.heads.backbone_feature_map` with ``n_last_blocks=1``); ``depth`` /
    ``depth_cls``: :func:`eval.heads.multilayer_features` of ``depth_blocks``.
    """
    last = backbone.num_blocks - 1
    blocks = sorted(set(depth_blocks) | {last})
    out: dict[str, Tensor] = {}

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        return multilayer_features(backbone, normalize(images), blocks, norm=True)

    dim = backbone.embed_dim
    depth_pos = [blocks.index(b) for b in depth_blocks]

    def depth_parts(patch: Tensor, cls: Tensor) -> None:
        out["depth"] = torch.cat([patch[:, i * dim : (i + 1) * dim] for i in depth_pos], dim=1)
        out["depth_cls"] = torch.cat([cls[:, i * dim : (i + 1) * dim] for i in depth_pos], dim=1)

    if batch.seg_images is not None:
        patch, cls = run(batch.seg_images)
        out["seg"] = patch[:, -dim:]  # the last block comes last in `blocks`
        if batch.depth_images is batch.seg_images:
            depth_parts(patch, cls)
    if batch.depth_images is not None and "depth" not in out:
        depth_parts(*run(batch.depth_images))
    return out


def _head_losses(
    heads: FeedbackHeads, backbone: Backbone, batch: FeedbackBatch, feats: dict[str, Tensor]
) -> dict[str, Tensor]:
    losses: dict[str, Tensor] = {}
    if "seg" in feats and batch.seg_labels is not None:
        logits = heads.seg_head(feats["seg"])
        losses["seg"] = seg_loss(logits, batch.seg_labels, ADE_IGNORE_INDEX, backbone.patch_size)
    if "depth" in feats and batch.depth is not None and batch.depth_images is not None:
        cfg = heads.cfg
        pred = heads.depth_head.predict(
            feats["depth"],
            feats["depth_cls"],
            backbone.patch_size,
            tuple(batch.depth_images.shape[-2:]),
            tuple(batch.depth.shape[-2:]),
        )
        valid = valid_depth_mask(batch.depth, cfg.min_depth, cfg.max_depth)
        losses["depth"] = depth_loss(cfg.depth_loss, pred, batch.depth, valid)
    return losses


def feedback_losses(
    backbone: Backbone, heads: FeedbackHeads, batch: FeedbackBatch
) -> dict[str, Tensor]:
    """Per-task feedback losses of ``batch`` with graph through the backbone (heads and
    backbone in eval mode). Exposed for diagnostics (the realised change of L_down)."""
    device = next(heads.parameters()).device
    batch = batch.to(device)
    with _eval_mode(backbone, heads):
        return _head_losses(heads, backbone, batch, _features(backbone, batch, heads.depth_blocks))


def weighted_feedback_loss(losses: dict[str, Tensor], cfg: FeedbackConfig) -> Tensor:
    """L_down = alpha_seg * L_seg + alpha_depth * L_depth over the tasks with a non-zero alpha
    (the one definition: g_down differentiates it, the calibration reads it)."""
    weights = {"seg": cfg.alpha_seg, "depth": cfg.alpha_depth}
    terms = [weights[k] * v for k, v in losses.items() if weights[k] != 0]
    if not terms:
        raise ValueError("the feedback batch has no labels for a task with a non-zero alpha")
    return torch.stack(terms).sum()


@torch.no_grad()
def downstream_loss(backbone: Backbone, heads: FeedbackHeads, batch: FeedbackBatch,
                    cfg: FeedbackConfig) -> Tensor:
    """L_down of ``batch`` without a graph, as :func:`downstream_gradient_and_loss` takes it
    (under DDP: each rank's share, averaged over ranks): the calibration's "after" value."""
    total = weighted_feedback_loss(feedback_losses(backbone, heads, this_ranks_share(batch)), cfg)
    return all_reduce_mean(total)


def downstream_gradient_and_loss(
    backbone: Backbone,
    heads: FeedbackHeads,
    batch: FeedbackBatch,
    aligned_params: Sequence[nn.Parameter],
    cfg: FeedbackConfig,
) -> tuple[list[Tensor], Tensor]:
    """(g_down, L_down) from one forward on a meta batch.

    L_down = alpha_seg * L_seg + alpha_depth * L_depth (detached; the calibration's "before"
    value) and g_down = grad_{aligned_params} L_down as detached tensors shaped like
    ``aligned_params``. Heads and backbone run in eval mode and nothing of theirs changes
    (no parameter, buffer or ``.grad``).
    """
    params = list(aligned_params)
    if not params:
        raise ValueError("downstream_gradient_and_loss needs at least one aligned parameter")
    # a graph to the aligned parameters only: the blocks below them build none
    with grad_only_for(itertools.chain(backbone.parameters(), heads.parameters()), keep=params):
        total = weighted_feedback_loss(feedback_losses(backbone, heads, this_ranks_share(batch)), cfg)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    g_down = [
        torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)
    ]
    # DDP: the mean over the ranks' equal shares (one all-reduce; the identity in one
    # process). That is the whole batch's gradient for per-image means (seg CE with the
    # same valid-pixel count per share); for SigLoss, the mean of the shares' losses
    *reduced, total = all_reduce_mean_list([*(g.float() for g in g_down), total.detach().float()])
    return [g.to(p.dtype) for g, p in zip(reduced, params, strict=True)], total
