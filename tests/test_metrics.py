"""Tests for dinov.metrics: every expected number is worked out by hand in the test."""

from __future__ import annotations

import math

import pytest
import torch

from dinov.metrics import (
    DEPTH_METRIC_NAMES,
    average_precision,
    confusion_matrix,
    depth_errors,
    knn_classify,
    revisited_map,
    segmentation_metrics,
    similarity_ranks,
    summarize_depth,
    topk_accuracy,
    train_linear_probes,
)

E = math.e

# --------------------------------------------------------------------------------------
# classification probes
# --------------------------------------------------------------------------------------


def test_knn_weighted_votes_by_hand():
    # Train set (norms differ on purpose: only directions matter after L2-normalisation).
    train = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    out = knn_classify(train, labels, test, num_classes=3, ks=(1, 3, 10), temperature=1.0)

    # test 0 = (1, 0): cosines a=1, b=0, c=1/sqrt2, d=-1.
    #   k=1: a only -> class 0 with weight e^1.
    #   k=3: a, c, b -> class 0: e^1 = 2.718; class 1: e^0.7071 + e^0 = 3.028 -> class 1 wins.
    #   k=10 clipped to 4: adds d -> class 2: e^-1.
    # test 1 = (-2, 1)/sqrt5: cosines a=-2/sqrt5, b=1/sqrt5, c=-1/sqrt10, d=2/sqrt5.
    #   k=1: d -> class 2 with e^(2/sqrt5); k=3: d, b, c.
    s5, s10 = math.sqrt(5), math.sqrt(10)
    expected = {
        1: [[E, 0, 0], [0, 0, math.exp(2 / s5)]],
        3: [
            [E, math.exp(1 / math.sqrt(2)) + 1, 0],
            [0, math.exp(1 / s5) + math.exp(-1 / s10), math.exp(2 / s5)],
        ],
        10: [
            [E, math.exp(1 / math.sqrt(2)) + 1, 1 / E],
            [math.exp(-2 / s5), math.exp(1 / s5) + math.exp(-1 / s10), math.exp(2 / s5)],
        ],
    }
    assert set(out) == {1, 3, 10}
    for k, scores in expected.items():
        torch.testing.assert_close(out[k], torch.tensor(scores), rtol=1e-5, atol=1e-6)
    assert out[1].argmax(1).tolist() == [0, 2]
    assert out[3].argmax(1).tolist() == [1, 2]


def test_knn_chunking_matches_single_chunk():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    a = knn_classify(train, labels, test, 5, ks=(3, 7), chunk_size=4)
    b = knn_classify(train, labels, test, 5, ks=(3, 7), chunk_size=1024)
    for k in (3, 7):
        torch.testing.assert_close(a[k], b[k])


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.1],  # ranking 1, 2, (0|3): label 1 -> top-1 hit
            [0.6, 0.1, 0.2, 0.1],  # ranking 0, 2, ...: label 2 -> top-2 hit only
            [0.4, 0.3, 0.2, 0.1],  # ranking 0, 1, 2, 3: label 3 -> last
        ]
    )
    labels = torch.tensor([1, 2, 3])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)
    assert acc[5] == pytest.approx(100.0)  # k clipped to the 4 classes


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = 4, 16
    means = 4.0 * torch.eye(num_classes, dim) + 3.0  # offset: standardisation must cope
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = means[labels] + torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


def test_linear_probes_separable_blobs_and_determinism():
    x_tr, y_tr = _blobs(50, seed=1)
    x_va, y_va = _blobs(25, seed=2)
    lrs = (1e-3, 1e-2, 1e-1, 3e-1)
    kwargs = dict(num_classes=4, lrs=lrs, epochs=30, batch_size=64, seed=0)
    res = train_linear_probes(x_tr, y_tr, x_va, y_va, **kwargs)
    assert list(res.accuracies) == list(lrs)  # one val top-1 per lr, in grid order
    assert res.best_lr in lrs
    assert res.top1 == max(res.accuracies.values())
    assert res.top1 >= 95.0
    assert res.top5 == pytest.approx(100.0)  # 4 classes: top-5 clipped to top-4
    again = train_linear_probes(x_tr, y_tr, x_va, y_va, **kwargs)
    assert again == res
    # Heads in the grid do not interact: the first head alone (same seed, hence the same
    # initial weights) reaches the same val accuracy as inside the grid.
    alone = train_linear_probes(x_tr, y_tr, x_va, y_va, **{**kwargs, "lrs": lrs[:1]})
    assert alone.accuracies[lrs[0]] == res.accuracies[lrs[0]]


# --------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------


def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [3, 2, 0]])  # the last pixel is ignored
    conf = confusion_matrix(pred, target, num_classes=5)
    # rows = target: t0 -> p0, p1; t1 -> p1, p3; t2 -> p2; classes 3, 4 never targets.
    expected = torch.zeros(5, 5, dtype=torch.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[1, 3] = expected[2, 2] = 1
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)

    m = segmentation_metrics(conf)
    # IoU: c0 = 1/(2+1-1) = 1/2; c1 = 1/(2+2-1) = 1/3; c2 = 1; c3 = 0/(0+1-0) = 0 (predicted
    # only, counts); c4 absent everywhere -> NaN, excluded: mIoU = (1/2+1/3+1+0)/4 = 11/24.
    assert m.per_class_iou[:4] == pytest.approx([50.0, 100 / 3, 100.0, 0.0])
    assert math.isnan(m.per_class_iou[4])
    assert m.miou == pytest.approx(100 * 11 / 24)
    assert m.aacc == pytest.approx(60.0)  # 3 correct of 5 valid pixels
    # per-class acc over target classes 0..2: 1/2, 1/2, 1 -> 2/3
    assert m.macc == pytest.approx(200 / 3)


def test_confusion_matrices_add_up_and_match_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex  # after dinov's compat shim

    num_classes = 6
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)  # class 5 never occurs
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 5, (4, 16, 16), generator=g)
    pred[target == 0] = 0  # a class with IoU well above chance

    conf = confusion_matrix(pred[:2], target[:2], num_classes) + confusion_matrix(
        pred[2:], target[2:], num_classes
    )
    assert torch.equal(conf, confusion_matrix(pred, target, num_classes))
    ours = segmentation_metrics(conf)

    ref = MulticlassJaccardIndex(num_classes, ignore_index=255, average="none")(pred, target)
    present = torch.tensor([(target == c).any() or (pred == c).any() for c in range(num_classes)])
    # torchmetrics reports 0 for absent classes; mmseg's NaN convention drops them.
    assert present.tolist() == [True] * 5 + [False]
    torch.testing.assert_close(
        torch.tensor(ours.per_class_iou, dtype=torch.float64)[present],
        100 * ref[present].double(),
        rtol=1e-6,
        atol=1e-6,
    )
    assert ours.miou == pytest.approx(100 * ref[present].mean().item(), rel=1e-6)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), num_classes=3)


# --------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------


def test_depth_errors_single_image_by_hand():
    target = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # 0 m is below min_depth: excluded
    pred = torch.tensor([[[1.5, 2.0], [2.0, 5.0]]])
    err = depth_errors(pred, target)
    assert set(err) == set(DEPTH_METRIC_NAMES)
    # valid pixels (p, t): (1.5, 1), (2, 2), (2, 4): diffs 0.5, 0, -2
    assert err["rmse"].item() == pytest.approx(math.sqrt((0.25 + 0 + 4) / 3))
    assert err["abs_rel"].item() == pytest.approx((0.5 / 1 + 0 + 2 / 4) / 3)
    assert err["sq_rel"].item() == pytest.approx((0.25 / 1 + 0 + 4 / 4) / 3)
    assert err["log10"].item() == pytest.approx((math.log10(1.5) + 0 + math.log10(2)) / 3)
    assert err["rmse_log"].item() == pytest.approx(
        math.sqrt((math.log(1.5) ** 2 + 0 + math.log(2) ** 2) / 3)
    )
    # max(p/t, t/p) = 1.5, 1, 2 -> d1 (<1.25): 1/3; d2 (<1.5625): 2/3; d3 (<1.953): 2/3
    assert err["d1"].item() == pytest.approx(100 / 3)
    assert err["d2"].item() == pytest.approx(200 / 3)
    assert err["d3"].item() == pytest.approx(200 / 3)


def test_depth_errors_valid_mask_clamp_and_per_image_mean():
    target = torch.tensor(
        [[[2.0, 2.0], [2.0, 2.0]], [[2.0, 2.0], [2.0, 2.0]], [[2.0, 2.0], [20.0, 20.0]]]
    )
    pred = torch.tensor(
        [[[3.0, 9.0], [9.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]], [[2.0, 2.0], [2.0, 2.0]]]
    )
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[0] = torch.tensor([[True, False], [False, False]])  # image 0: one pixel, error 1
    valid[2] = False  # image 2: nothing valid (and its 20 m targets exceed max_depth anyway)
    err = depth_errors(pred, target, valid)
    assert err["rmse"].shape == (3,)
    assert err["rmse"][:2].tolist() == pytest.approx([1.0, 0.0])
    assert err["abs_rel"][:2].tolist() == pytest.approx([0.5, 0.0])
    assert all(math.isnan(v[2].item()) for v in err.values())
    summary = summarize_depth(err)
    # per-image mean over the two images with pixels: (1 + 0)/2 and (0.5 + 0)/2, whereas
    # pooling the 5 pixels would give sqrt(1/5) and 0.1.
    assert summary["rmse"] == pytest.approx(0.5)
    assert summary["abs_rel"] == pytest.approx(0.25)
    assert summary["d1"] == pytest.approx(50.0)

    # predictions are clamped to [min_depth, max_depth] before scoring
    clamped = depth_errors(torch.tensor([[[50.0]]]), torch.tensor([[[5.0]]]), max_depth=10.0)
    assert clamped["rmse"].item() == pytest.approx(5.0)


# --------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # positives at ranks 0 and 2 (of 5): trapezoids (1 + 1/1)/2 * 1/2 and
    # (1/2 + 2/3)/2 * 1/2 -> 1/2 + 7/24 = 19/24
    assert average_precision(torch.tensor([0, 2]), 2) == pytest.approx(19 / 24)
    # ranks 1 and 3 with a third positive never retrieved (recall step 1/3):
    # (0/1 + 1/2)/2/3 + (1/3 + 2/4)/2/3 = 1/12 + 5/36 = 2/9
    assert average_precision(torch.tensor([1, 3]), 3) == pytest.approx(2 / 9)
    assert average_precision(torch.tensor([0, 1, 2]), 3) == pytest.approx(1.0)


def _hand_ranking():
    # Query 0: easy {0, 3}, hard {5}, junk {1}; ranked list 2 0 1 5 3 4 6 7.
    # Query 1: easy {4, 6}, no hard, junk {7}; ranked list 4 7 6 0 1 2 3 5.
    ranks = torch.tensor([[2, 0, 1, 5, 3, 4, 6, 7], [4, 7, 6, 0, 1, 2, 3, 5]]).T  # (n_db, n_q)
    gnd = [
        {"easy": [0, 3], "hard": [5], "junk": [1]},
        {"easy": [4, 6], "hard": [], "junk": [7]},
    ]
    return ranks, gnd


def test_revisited_map_by_hand():
    ranks, gnd = _hand_ranking()
    res = revisited_map(ranks, gnd, ks=(1, 5))
    # Query 0
    #   Easy (junk 1, 5): list 2 0 3 4 6 7 -> positives at 1, 2 of 2:
    #     AP = (0 + 1/2)/2/2 + (1/2 + 2/3)/2/2 = 1/8 + 7/24 = 5/12
    #     mP: 1-based positions 2, 3; @1: kq=min(3,1)=1 -> 0; @5: kq=3 -> 2/3
    #   Medium (junk 1): list 2 0 5 3 4 6 7 -> positives at 1, 2, 3 of 3:
    #     AP = (0 + 1/2)/2/3 + (1/2 + 2/3)/2/3 + (2/3 + 3/4)/2/3 = 6/72 + 14/72 + 17/72 = 37/72
    #     mP: positions 2, 3, 4; @1 -> 0; @5: kq=4 -> 3/4
    #   Hard (junk 1, 0, 3): list 2 5 4 6 7 -> positive at 1 of 1:
    #     AP = (0 + 1/2)/2 = 1/4; mP: position 2; @1 -> 0; @5: kq=2 -> 1/2
    # Query 1 (junk 7): list 4 6 0 1 2 3 5 -> positives at 0, 1: AP = 1 (Easy and Medium),
    #   mP@1 = 1, mP@5: kq=2 -> 1. No hard positives: left out of Hard.
    assert res.map["easy"] == pytest.approx(100 * (5 / 12 + 1) / 2)  # 70.83
    assert res.map["medium"] == pytest.approx(100 * (37 / 72 + 1) / 2)  # 75.69
    assert res.map["hard"] == pytest.approx(100 * 1 / 4)  # query 0 only
    assert res.mp_at_k["easy"] == pytest.approx({1: 50.0, 5: 100 * (2 / 3 + 1) / 2})
    assert res.mp_at_k["medium"] == pytest.approx({1: 50.0, 5: 100 * (3 / 4 + 1) / 2})
    assert res.mp_at_k["hard"] == pytest.approx({1: 0.0, 5: 50.0})


def test_revisited_map_query_chunks_and_similarity_ranks():
    ranks, gnd = _hand_ranking()
    # Repeating the queries 20 times spans several internal query chunks; means are unchanged.
    many = revisited_map(ranks.repeat(1, 20), gnd * 20, ks=(1, 5))
    one = revisited_map(ranks, gnd, ks=(1, 5))
    assert many.map == pytest.approx(one.map)

    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    queries = torch.tensor([[2.0, 0.1], [0.0, -1.0]])
    # query 0 ~ (1, 0.05): cosines db0 .999, db2 .74, db1 .05, db3 -.97
    # query 1 = (0, -1): cosines db0 0, db1 -1, db2 -.71, db3 -.196
    expected = torch.tensor([[0, 2, 1, 3], [0, 3, 2, 1]]).T
    assert torch.equal(similarity_ranks(queries, db), expected)


def test_revisited_map_refuses_a_query_without_a_list():
    """A query's missing easy/hard/junk list is an error, never an empty list (which would
    silently change the mAP)."""
    ranks = torch.arange(4).view(4, 1)
    with pytest.raises(ValueError, match="query 0 has no 'junk' list"):
        revisited_map(ranks, [{"easy": [0], "hard": [1]}])
