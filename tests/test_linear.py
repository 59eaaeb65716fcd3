"""Linear probes: the UMBC standardisation, held-out LR selection and the frozen backbone."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_lib.eval.config import LinearEvalConfig
from ssl_lib.eval.linear import (
    LinearProbe,
    evaluate,
    holdout_split,
    linear_augmented,
    linear_cached,
    select_lr,
    standardization_stats,
    topn_hits,
)


def lin_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(LinearEvalConfig), values)


def blobs(n: int, seed: int, dim: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_standardization_matches_plain_formula():
    feats = torch.randn(50, 4, dtype=torch.float64) * 5 + 2
    mean, var = standardization_stats(feats.half())
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in feats.tolist()]
    for d in range(4):
        column = [r[d] for r in rows]
        mu = sum(column) / len(column)
        sigma2 = sum((c - mu) ** 2 for c in column) / len(column)
        assert math.isclose(mean[d].item(), mu, abs_tol=2e-3)
        assert math.isclose(var[d].item(), sigma2, abs_tol=2e-3)

    probe = LinearProbe(4, 3, (mean, var))
    x = torch.randn(6, 4)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = ((unit - mean) / torch.sqrt(var + 1e-5)) @ probe.fc.weight.T + probe.fc.bias
    assert torch.allclose(probe(x), expected, atol=1e-5)
    assert sum(p.numel() for p in probe.parameters()) == 4 * 3 + 3  # statistics are not learnt


def test_holdout_split_is_disjoint_and_seeded():
    fit, held = holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and len(fit) == 90
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(100))
    assert torch.equal(held, holdout_split(100, 0.1, seed=3)[1])


def test_cached_lr_selection_sees_only_the_held_out_train_rows():
    cfg = lin_cfg(epochs=3, milestones=[2], batch_size=32, lr_grid=[1e-4, 1.0], val_fraction=0.25)
    train = blobs(120, seed=0)
    val_a, val_b = blobs(60, seed=1), blobs(60, seed=2)
    val_b = (val_b[0], torch.zeros_like(val_b[1]))  # another val set entirely
    a = linear_cached(train, val_a, 3, cfg)
    b = linear_cached(train, val_b, 3, cfg)
    assert a["lr_selection"] == b["lr_selection"]  # the val set plays no part in the choice
    assert a["lr"] == 1.0 and a["lr_selection"]["num_holdout"] == 30
    assert a["top1"] > 80 and len(a["history"]) == 3

    # Scrambling the held-out rows' labels changes the selection scores.
    _, held = holdout_split(120, 0.25, cfg.seed)
    feats, labels = train
    scrambled = labels.clone()
    scrambled[held] = (labels[held] + 1) % 3
    plain = select_lr(feats, labels, 3, cfg, "cpu")["holdout_top1"]
    assert select_lr(feats, scrambled, 3, cfg, "cpu")["holdout_top1"] != plain


def test_augmented_probe_keeps_the_backbone_frozen_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = blobs(64, seed=0)
    loader = [(x[i : i + 16], y[i : i + 16], torch.arange(i, i + 16)) for i in range(0, 64, 16)]
    with torch.no_grad():
        train_feats = model.eval()(x)
    cfg = lin_cfg(protocol="umbc", epochs=2, milestones=[1], lr=0.5)
    result = linear_augmented(model, loader, train_feats, (train_feats, y), 3, cfg)
    assert {"top1", "top5", "best_top1", "best_epoch"} <= set(result)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    moco_cfg = OmegaConf.merge(cfg, {"protocol": "moco", "lr": 0.1})
    moco = linear_augmented(model, loader, train_feats, (train_feats, y), 3, moco_cfg)
    assert len(moco["history"]) == 2


# --- Reported accuracies come from evidence only ----------------------------------------------


def fixed_probe(weight: torch.Tensor, bias: torch.Tensor) -> LinearProbe:
    """A plain head with the given weights (classes x dim)."""
    probe = LinearProbe(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        probe.fc.weight.copy_(weight)
        probe.fc.bias.copy_(bias)
    return probe


def test_tied_logits_give_no_credit():
    labels = torch.arange(40) % 10
    feats = torch.randn(40, 4)
    # All-zero logits: argmax would say class 0 (10 % top-1) and topk classes 0-4 (50 % top-5).
    zero = fixed_probe(torch.zeros(10, 4), torch.zeros(10))
    assert evaluate(zero, feats, labels, 10) == {"top1": 0.0, "top5": 0.0}
    # Classes 0 and 7 tie for the largest logit: neither is credited with top-1, both with top-5.
    bias = torch.zeros(10)
    bias[[0, 7]] = 1.0
    tied = fixed_probe(torch.zeros(10, 4), bias)
    for label in (0, 7):
        res = evaluate(tied, feats, torch.full((40,), label), 10)
        assert res == {"top1": 0.0, "top5": 100.0}, label
    # Classes 1-6 tie below them: a tie across the top-5 boundary credits none of them.
    res = evaluate(tied, feats, torch.full((40,), 1), 10)
    assert res == {"top1": 0.0, "top5": 0.0}
    # A strict maximum is the standard top-1.
    bias[7] = 2.0
    strict = fixed_probe(torch.zeros(10, 4), bias)
    assert evaluate(strict, feats, torch.full((40,), 7), 10) == {"top1": 100.0, "top5": 100.0}


def test_topn_hits_rule():
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0],  # label 0 strictly first
            [1.0, 1.0, 0.0],  # label 0 tied first with class 1
            [0.0, 0.0, 0.0],  # constant
            [float("nan"), 1.0, 0.0],  # not finite
            [0.0, 5.0, 1.0],  # label 0 last
        ]
    )
    labels = torch.zeros(5, dtype=torch.int64)
    assert topn_hits(logits, labels, 1).tolist() == [True, False, False, False, False]
    assert topn_hits(logits, labels, 2).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match="top-3 needs more than 3 classes"):
        topn_hits(logits, labels, 3)
    with pytest.raises(ValueError, match="Q x C"):
        topn_hits(logits, labels[:2], 1)


def test_probe_results_with_few_classes_empty_sets_and_bad_labels():
    x, y = blobs(60, seed=0)  # 3 classes: a top-5 would hold all of them
    probe = fixed_probe(torch.randn(3, 8), torch.zeros(3))
    res = evaluate(probe, x, y, 3)
    assert res["top5"] is None and 0 <= res["top1"] <= 100
    with pytest.raises(ValueError, match="empty"):
        evaluate(probe, x[:0], y[:0], 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        evaluate(fixed_probe(torch.randn(1, 8), torch.zeros(1)), x, y * 0, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        evaluate(probe, x, y + 1, 3)
    with pytest.raises(ValueError, match="3 logits for 4 classes"):
        evaluate(probe, x, y, 4)


def test_both_probe_modes_credit_no_class_for_a_dead_head_and_skip_trivial_top5():
    # Zero features and a learning rate of 0: the head's logits stay all zero (bias 0).
    classes = 10
    labels = torch.arange(80) % classes
    zeros = torch.zeros(80, 8)
    cached_cfg = lin_cfg(epochs=1, milestones=[1], batch_size=16, lr_grid=[0.0])
    cached = linear_cached((zeros, labels), (zeros, labels), classes, cached_cfg)
    plain_cfg = lin_cfg(protocol="moco", epochs=1, milestones=[1], lr=0.0)
    dead = nn.Linear(8, 8)
    nn.init.zeros_(dead.weight)
    nn.init.zeros_(dead.bias)
    loader = [(zeros[i : i + 16], labels[i : i + 16], None) for i in range(0, 80, 16)]
    augmented = linear_augmented(dead, loader, zeros, (zeros, labels), classes, plain_cfg)
    for res in (cached, augmented):
        assert (res["top1"], res["top5"], res["best_top1"], res["best_top5"]) == (0, 0, 0, 0)
    assert cached["lr_selection"]["holdout_top1"] == {0.0: 0.0}

    # With 3 classes both modes report top-1 and no top-5.
    x, y = blobs(60, seed=0)
    few = linear_cached((x, y), (x, y), 3, lin_cfg(epochs=1, milestones=[1], lr_grid=[0.1]))
    assert few["top5"] is None and few["best_top5"] is None and few["top1"] > 0
    assert all(h["top5"] is None for h in few["history"])
