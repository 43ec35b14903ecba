"""Metric and probe primitives shared by the trainer's online probes and ``eval/``.

This module is the single implementation of every downstream metric in the codebase:

- classification probes on frozen features: DINO's weighted kNN, top-k accuracy and a
  grid of linear heads trained together (DINOv2-style linear evaluation);
- semantic segmentation: a bincount confusion matrix and mmseg-convention mIoU/aAcc/mAcc;
- monocular depth: the NYUv2 (BTS/Monodepth/DINOv2) error set, per image then averaged;
- retrieval: the revisited Oxford/Paris protocol (Radenovic et al., 2018) — ``compute_ap``
  and ``compute_map`` re-derived in vectorised torch, Easy/Medium/Hard mAP and mP@k.

Everything is plain torch on whatever device the inputs live on; percentages are in
[0, 100]. Nothing here imports the rest of ``dinov``, so ``eval/`` can use it freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEPTH_METRIC_NAMES",
    "LinearProbeResult",
    "RetrievalMetrics",
    "SegmentationMetrics",
    "average_precision",
    "confusion_matrix",
    "depth_errors",
    "knn_classify",
    "revisited_map",
    "segmentation_metrics",
    "similarity_ranks",
    "summarize_depth",
    "topk_accuracy",
    "train_linear_probes",
]


# --------------------------------------------------------------------------------------
# classification probes on frozen features
# --------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """DINO's weighted kNN classifier.

    Features are L2-normalised so the dot product is the cosine similarity. Each test
    sample's top-k train neighbours vote for their label with weight ``exp(sim / T)``;
    the votes are summed per class. Returns ``{k: scores (N_test, num_classes)}`` (take
    ``argmax`` for the prediction, or feed to :func:`topk_accuracy`). ``k`` larger than
    the train set is clipped to it; the dict keeps the requested ``k`` as key.
    """
    if not ks:
        raise ValueError("ks must not be empty")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(device=train.device, dtype=torch.long)
    clipped = {k: min(int(k), train.shape[0]) for k in ks}
    k_max = max(clipped.values())
    out = {k: test.new_zeros(test.shape[0], num_classes) for k in ks}
    # Chunk over test samples: the (chunk, N_train) similarity block is the memory peak.
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ train.T
        # One sorted top-k_max serves every k: its first k columns are the top-k.
        top_sims, top_idx = sims.topk(k_max, dim=1, largest=True, sorted=True)
        top_labels = labels[top_idx]
        weights = (top_sims / temperature).exp()
        for k, kc in clipped.items():
            out[k][start : start + chunk_size].scatter_add_(1, top_labels[:, :kc], weights[:, :kc])
    return out


@torch.no_grad()
def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each ``k`` (clipped to the number of classes)."""
    labels = labels.to(scores.device).long()
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1, largest=True, sorted=True).indices
    hits = top == labels[:, None]  # (N, k_max), at most one True per row
    return {k: 100.0 * hits[:, : min(k, k_max)].any(dim=1).double().mean().item() for k in ks}


@dataclass
class LinearProbeResult:
    """Outcome of a linear-probe grid: the best head on val and every head's val top-1."""

    best_lr: float
    top1: float
    top5: float
    accuracies: dict[float, float]  # val top-1 (percent) per learning rate


def _cosine_lr_factor(step: int, total_steps: int) -> float:
    """Cosine decay from 1 to 0 over ``total_steps`` optimizer steps."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def _standardise(train: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """Both feature sets standardised with the *train* mean and std (fp32)."""
    x_train = train.float()
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True).clamp_min(1e-6)  # guard constant features
    return (x_train - mean) / std, (val.float() - mean) / std


def _sgd_heads(weight: Tensor, bias: Tensor, lr_vec: Tensor, x_train: Tensor, y_train: Tensor,
               epochs: int, batch_size: int, weight_decay: float, gen: torch.Generator) -> None:
    """Train the stacked heads ``weight`` (L, D, C) and ``bias`` (L, 1, C) in place: SGD,
    momentum 0.9, cosine decay, each head at its own lr (``lr_vec`` (L, 1, 1))."""
    n_heads, num_classes = weight.shape[0], weight.shape[2]
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    params = (weight, bias)
    momenta = [torch.zeros_like(p) for p in params]
    n_train = x_train.shape[0]
    total_steps = epochs * math.ceil(n_train / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen).to(x_train.device)
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            logits = torch.baddbmm(bias, x_train[idx].expand(n_heads, -1, -1), weight)
            # Summing the heads' mean losses gives each head exactly its own gradient.
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, num_classes), y_train[idx].repeat(n_heads), reduction="sum"
                )
                / idx.numel()
            )
            grads = torch.autograd.grad(loss, params)
            # A hand-rolled SGD (same update as torch.optim.SGD, dampening 0) because the
            # lr differs per head *inside* one stacked tensor, which param groups cannot do.
            factor = _cosine_lr_factor(step, total_steps)
            with torch.no_grad():
                for p, g, buf in zip(params, grads, momenta, strict=True):
                    if weight_decay and p is weight:  # no decay on biases
                        g = g + weight_decay * p
                    buf.mul_(0.9).add_(g)
                    p.sub_(lr_vec * factor * buf)
            step += 1


def train_linear_probes(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearProbeResult:
    """Train one linear head per learning rate, all together, and return the best on val.

    As in DINOv2's linear evaluation, the grid shares one pass over the data: the heads
    are stacked into one weight tensor ``(L, D, C)`` and every mini-batch updates all of
    them at once. Features are first standardised with the *train* mean/std (so the
    same lr grid suits any backbone's feature scale). Optimiser: SGD, momentum 0.9,
    cosine lr decay over all steps, per-head lr; deterministic given ``seed``.
    """
    if not lrs:
        raise ValueError("lrs must not be empty")
    device = train_feats.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_train, x_val = _standardise(train_feats, val_feats.to(device))
    y_train = train_labels.to(device).long()
    y_val = val_labels.to(device).long()

    n_heads, dim = len(lrs), x_train.shape[1]
    # DINOv2 initialises linear heads with N(0, 0.01) weights and zero bias.
    weight = (torch.randn(n_heads, dim, num_classes, generator=gen) * 0.01).to(device)
    bias = torch.zeros(n_heads, 1, num_classes, device=device)
    lr_vec = torch.tensor([float(lr) for lr in lrs], device=device).view(n_heads, 1, 1)
    _sgd_heads(weight, bias, lr_vec, x_train, y_train, epochs, batch_size, weight_decay, gen)

    with torch.no_grad():
        # One head at a time: (N_val, C) logits per head instead of (L, N_val, C) at once.
        per_head = [
            topk_accuracy(torch.addmm(bias[i], x_val, weight[i]), y_val, ks=(1, 5))
            for i in range(n_heads)
        ]
    accuracies = {float(lr): acc[1] for lr, acc in zip(lrs, per_head, strict=True)}
    best = max(range(n_heads), key=lambda i: per_head[i][1])  # first best on ties
    return LinearProbeResult(
        best_lr=float(lrs[best]),
        top1=per_head[best][1],
        top5=per_head[best][5],
        accuracies=accuracies,
    )


# --------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """``(C, C)`` int64 confusion matrix, rows = target class, columns = predicted class.

    Pixels whose target is ``ignore_index`` are dropped. Matrices of several batches add
    up, so callers accumulate them and call :func:`segmentation_metrics` once at the end
    (dataset-level IoU, as mmseg computes it — not a mean of per-image IoUs).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    t = target[keep].long()
    p = pred[keep].long()
    # Out-of-range labels would silently land in the wrong cell of the flat bincount.
    if t.numel() and (
        t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes
    ):
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index")
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


@dataclass
class SegmentationMetrics:
    """mmseg-convention segmentation scores, all in percent.

    A class absent from both predictions and targets in the whole dataset has NaN IoU
    and is left out of ``miou`` (nanmean); a class predicted but never in the targets
    has IoU 0 and counts. ``macc`` averages per-class accuracy over classes present in
    the targets.
    """

    miou: float
    aacc: float
    macc: float
    per_class_iou: list[float]


def _nanmean(x: Tensor) -> float:
    """Mean over the finite entries; NaN when there are none."""
    finite = ~x.isnan()
    return x[finite].mean().item() if finite.any() else float("nan")


def segmentation_metrics(conf: Tensor) -> SegmentationMetrics:
    """mIoU, aAcc, mAcc and per-class IoU (percent) from an accumulated confusion matrix."""
    conf = conf.double()
    intersect = conf.diag()
    area_target = conf.sum(dim=1)
    area_pred = conf.sum(dim=0)
    union = area_target + area_pred - intersect
    # 0/0 -> NaN marks classes that never occur; they drop out of the nanmeans below.
    iou = 100.0 * intersect / union
    acc = 100.0 * intersect / area_target
    total = area_target.sum()
    aacc = (100.0 * intersect.sum() / total).item() if total > 0 else float("nan")
    return SegmentationMetrics(
        miou=_nanmean(iou), aacc=aacc, macc=_nanmean(acc), per_class_iou=iou.tolist()
    )


# --------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------

DEPTH_METRIC_NAMES = ("rmse", "abs_rel", "log10", "rmse_log", "sq_rel", "d1", "d2", "d3")


@torch.no_grad()
def depth_errors(
    pred: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
) -> dict[str, Tensor]:
    """Per-image NYUv2 depth errors: ``{name: (N,) tensor}`` for :data:`DEPTH_METRIC_NAMES`.

    ``pred``/``target`` are ``(N, H, W)`` in metres. A pixel counts where ``valid`` (if
    given) holds and ``min_depth < target < max_depth``; predictions are clamped to
    ``[min_depth, max_depth]``. Each metric is computed per image and the caller
    averages over images (:func:`summarize_depth`), as the BTS/Monodepth/DINOv2
    protocol does. ``d1..d3`` are percentages of pixels with ``max(p/t, t/p)`` below
    ``1.25, 1.25**2, 1.25**3``. An image without valid pixels gets NaN everywhere.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"expected equal (N, H, W) shapes, got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    target = target.float()
    mask = (target > min_depth) & (target < max_depth)
    if valid is not None:
        mask &= valid.to(device=mask.device, dtype=torch.bool)
    # Put harmless values (1 m) at excluded pixels so logs/divisions stay finite there;
    # the mask then zeroes their contribution.
    t = torch.where(mask, target, torch.ones_like(target))
    p = torch.where(mask, pred.float().clamp(min_depth, max_depth), torch.ones_like(target))
    maskf = mask.double()
    count = maskf.sum(dim=(1, 2))

    def image_mean(x: Tensor) -> Tensor:
        # Sum in float64: a 480x640 image has ~3e5 terms.
        return (x.double() * maskf).sum(dim=(1, 2)) / count  # 0/0 = NaN for empty images

    diff = p - t
    log_diff = p.log() - t.log()
    ratio = torch.maximum(p / t, t / p)
    return {
        "rmse": image_mean(diff.square()).sqrt(),
        "abs_rel": image_mean(diff.abs() / t),
        "log10": image_mean((p.log10() - t.log10()).abs()),
        "rmse_log": image_mean(log_diff.square()).sqrt(),
        "sq_rel": image_mean(diff.square() / t),
        "d1": 100.0 * image_mean((ratio < 1.25).double()),
        "d2": 100.0 * image_mean((ratio < 1.25**2).double()),
        "d3": 100.0 * image_mean((ratio < 1.25**3).double()),
    }


def summarize_depth(per_image: dict[str, Tensor]) -> dict[str, float]:
    """Average per-image depth errors over images, skipping images with no valid pixel."""
    return {name: _nanmean(values.double().flatten()) for name, values in per_image.items()}


# --------------------------------------------------------------------------------------
# retrieval (revisited Oxford / Paris)
# --------------------------------------------------------------------------------------

# Queries processed at once by revisited_map: bounds the (queries, n_db) work tensors
# (R1M has ~1M database images).
_QUERY_CHUNK = 16


def _ap_and_precision(
    is_pos: Tensor, is_junk: Tensor, num_pos: Tensor, ks: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Batched revisitop ``compute_ap`` + precision@k over ranked lists.

    ``is_pos``/``is_junk``: ``(Q, n)`` flags along each query's ranking; ``num_pos``: the
    number of ground-truth positives per query (positives missing from the ranking
    still count, as in the official code). Returns AP ``(Q,)`` and mP@k ``(Q, len(ks))``
    as fractions.
    """
    keep = (~is_junk).long()
    # 0-based rank after junk removal = number of non-junk entries strictly before,
    # i.e. the official "position minus junk images appearing before it".
    rank = (keep.cumsum(dim=1) - keep).double()
    pos = is_pos.long()
    j = (pos.cumsum(dim=1) - pos).double()  # index of each positive among the positives
    # Trapezoid between the precision just before and just after the j-th positive;
    # the precision before a positive at rank 0 is taken as 1.
    precision_0 = torch.where(rank > 0, j / rank.clamp_min(1.0), torch.ones_like(rank))
    precision_1 = (j + 1.0) / (rank + 1.0)
    trapezoids = (precision_0 + precision_1) / 2.0 * is_pos.double()
    ap = trapezoids.sum(dim=1) / num_pos.double()

    # mP@k as the official compute_map: kq = min(max 1-based positive rank, k) and
    # precision = #positives within kq / kq, so a query with fewer positives than k is
    # not penalised for the ranks it could never fill.
    rank1 = torch.where(is_pos, rank + 1.0, torch.zeros_like(rank))
    max_pos = rank1.max(dim=1).values
    prs = []
    for k in ks:  # a handful of cut-offs; vectorising over them would multiply memory
        kq = torch.clamp(max_pos, max=float(k))
        kq = torch.where(kq > 0, kq, torch.full_like(kq, float(k)))  # no positive ranked
        within = (is_pos & (rank1 <= kq[:, None])).sum(dim=1).double()
        prs.append(within / kq)
    return ap, torch.stack(prs, dim=1)


def average_precision(ranks_of_positives: Tensor, num_positives: int) -> float:
    """Revisitop ``compute_ap``: trapezoidal AP from 0-based ranks of the positives.

    ``ranks_of_positives`` are the positives' positions in the ranked list after junk
    removal; ``num_positives`` is the ground-truth count (positives never retrieved
    contribute zero recall).
    """
    ranks = ranks_of_positives.long().flatten()
    if num_positives <= 0:
        raise ValueError("num_positives must be positive")
    if ranks.numel() == 0:
        return 0.0
    is_pos = torch.zeros(1, int(ranks.max()) + 1, dtype=torch.bool, device=ranks.device)
    is_pos[0, ranks] = True
    ap, _ = _ap_and_precision(
        is_pos, torch.zeros_like(is_pos), torch.tensor([num_positives]), ks=(1,)
    )
    return ap.item()


@dataclass
class RetrievalMetrics:
    """Revisited Oxford/Paris scores in percent, per protocol ``easy``/``medium``/``hard``."""

    map: dict[str, float]
    mp_at_k: dict[str, dict[int, float]]


# Revisited protocols: (positive sets, junk sets) among a query's 'easy'/'hard'/'junk'.
_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _as_index_tensor(values: object) -> Tensor:
    """A ground-truth index list/array as a flat int64 tensor."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1))


@torch.no_grad()
def _membership(gnd: list[dict], ranks_q: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every database image's membership of every query's easy/hard/junk set, as
    (Q, n_total) flags built once (each protocol is then a boolean combination), and the
    sets' sizes. A query without one of the three lists is an error, never an empty list."""
    n_q, device = ranks_q.shape[0], ranks_q.device
    sets: dict[str, list[Tensor]] = {}
    for key in ("easy", "hard", "junk"):
        missing = [i for i, g in enumerate(gnd) if key not in g]
        if missing:
            raise ValueError(f"ground truth of query {missing[0]} has no '{key}' list "
                             f"(every query needs easy, hard and junk)")
        sets[key] = [_as_index_tensor(g[key]) for g in gnd]
    n_total = int(ranks_q.max()) + 1 if ranks_q.numel() else 0
    for idx_list in sets.values():
        for idx in idx_list:
            if idx.numel():
                n_total = max(n_total, int(idx.max()) + 1)
    flags: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for key, idx_list in sets.items():
        member = torch.zeros(n_q, n_total, dtype=torch.bool, device=device)
        q_idx = torch.repeat_interleave(torch.arange(n_q), torch.tensor([len(i) for i in idx_list]))
        db_idx = torch.cat(idx_list) if idx_list else torch.zeros(0, dtype=torch.long)
        member[q_idx.to(device), db_idx.to(device)] = True
        flags[key] = member
        counts[key] = torch.tensor([len(i) for i in idx_list], dtype=torch.long, device=device)
    return flags, counts


def revisited_map(
    ranks: Tensor, gnd: list[dict], ks: Sequence[int] = (1, 5, 10)
) -> RetrievalMetrics:
    """Revisited Oxford/Paris Easy/Medium/Hard mAP and mP@k, as revisitop's ``compute_map``.

    ``ranks``: ``(n_db, n_queries)`` database indices sorted by decreasing similarity
    per query (the official layout; see :func:`similarity_ranks`). ``gnd[i]`` holds the
    query's ``'easy'``, ``'hard'`` and ``'junk'`` database indices. Protocols: Easy —
    positives easy, junk junk+hard; Medium — positives easy+hard, junk junk; Hard —
    positives hard, junk junk+easy. Junk is removed from the ranking before positions
    are taken; queries without positives under a protocol are left out of its means.
    """
    if ranks.dim() != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, {len(gnd)}), got {tuple(ranks.shape)}")
    ranks_q = ranks.T.long()  # (Q, n_db): one ranked list per row
    n_q = ranks_q.shape[0]
    flags, counts = _membership(gnd, ranks_q)
    maps: dict[str, float] = {}
    mp_at_k: dict[str, dict[int, float]] = {}
    for name, (pos_keys, junk_keys) in _PROTOCOLS.items():
        num_pos = sum(counts[key] for key in pos_keys)
        aps, prs = [], []
        for start in range(0, n_q, _QUERY_CHUNK):
            rows = slice(start, start + _QUERY_CHUNK)
            order = ranks_q[rows]
            # Flags along each query's ranking: gather the membership by ranked db index.
            is_pos = torch.zeros_like(order, dtype=torch.bool)
            is_junk = torch.zeros_like(order, dtype=torch.bool)
            for key in pos_keys:
                is_pos |= flags[key][rows].gather(1, order)
            for key in junk_keys:
                is_junk |= flags[key][rows].gather(1, order)
            # Queries without positives get num_pos 1 here and are dropped below.
            ap, pr = _ap_and_precision(is_pos, is_junk, num_pos[rows].clamp_min(1), ks)
            aps.append(ap)
            prs.append(pr)
        has_pos = num_pos > 0  # official: empty queries are counted as -1 and skipped
        ap_all = torch.cat(aps)[has_pos]
        pr_all = torch.cat(prs)[has_pos]
        if ap_all.numel() == 0:
            maps[name] = float("nan")
            mp_at_k[name] = {int(k): float("nan") for k in ks}
            continue
        maps[name] = 100.0 * ap_all.mean().item()
        pr_mean = 100.0 * pr_all.mean(dim=0)
        mp_at_k[name] = {int(k): pr_mean[i].item() for i, k in enumerate(ks)}
    return RetrievalMetrics(map=maps, mp_at_k=mp_at_k)


@torch.no_grad()
def similarity_ranks(query_feats: Tensor, db_feats: Tensor) -> Tensor:
    """Database indices by decreasing cosine similarity, ``(n_db, n_queries)``.

    The layout of revisitop's ``ranks = argsort(-X.T @ Q, axis=0)``; the sort is stable
    so ties keep database order and results are reproducible.
    """
    q = F.normalize(query_feats.float(), dim=1)
    db = F.normalize(db_feats.float(), dim=1)
    sims = db @ q.T  # (n_db, n_q)
    return torch.argsort(sims, dim=0, descending=True, stable=True)
