"""Linear probes: the UMBC standardisation, held-out LR selection and the frozen backbone."""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_lib.config import LinearEvalConfig
from ssl_lib.eval.linear import (
    LinearProbe,
    holdout_split,
    linear_augmented,
    linear_cached,
    select_lr,
    standardization_stats,
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
