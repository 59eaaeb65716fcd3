"""Learning-rate and EMA schedules against their closed forms; parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_lib.optim import build_optimizer, ema_momentum, lr_factor, param_groups


def test_cosine_epoch_matches_umbc_formula():
    spe, epochs = 7, 10
    for step in range(spe * epochs):
        e = step // spe + 1  # 1-based epoch, as the UMBC code
        expected = 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))
        assert lr_factor("cosine_epoch", step, spe, epochs) == pytest.approx(expected)
    assert lr_factor("cosine_epoch", 0, spe, epochs) == 1.0
    # constant inside an epoch
    assert lr_factor("cosine_epoch", spe, spe, epochs) == lr_factor(
        "cosine_epoch", 2 * spe - 1, spe, epochs
    )


def test_warmup_cosine_matches_closed_form():
    spe, epochs, warm, final = 5, 20, 2, 0.001
    total, w = spe * epochs, warm * spe
    for step in range(total + 1):
        if step < w:
            expected = step / w
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
            expected = final + (1 - final) * q
        got = lr_factor("warmup_cosine", step, spe, epochs, warmup_epochs=warm, final_ratio=final)
        assert got == pytest.approx(expected)
    assert lr_factor(
        "warmup_cosine", total, spe, epochs, warmup_epochs=warm, final_ratio=final
    ) == pytest.approx(final)


def test_step_schedule_counts_milestones_with_one_based_epochs():
    spe = 3
    f = [lr_factor("step", s, spe, 200, milestones=[140, 180], gamma=0.2) for s in range(0, 600)]
    # 1-based epoch 140 (steps 417..419) is the first at 0.2x
    assert f[138 * spe] == 1.0 and f[139 * spe] == pytest.approx(0.2)
    assert lr_factor("step", 179 * spe, spe, 200, milestones=[140, 180]) == pytest.approx(0.04)


def test_ema_momentum_schedules():
    assert ema_momentum("constant", 0.99, 1.0, 123, 1000) == 0.99
    for step in (0, 250, 500, 1000):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * step / 1000) + 1) / 2
        assert ema_momentum("cosine", 0.996, 1.0, step, 1000) == pytest.approx(expected)
    assert ema_momentum("cosine", 0.996, 1.0, 1000, 1000) == pytest.approx(1.0)


class Cfg:
    name = "lars"
    lr = 0.2
    lr_biases = 0.0048
    momentum = 0.9
    weight_decay = 1.5e-6
    exclude_bias_and_norm = True
    lars_trust_coefficient = 0.001
    lr_scaling = "linear"


def test_param_groups_exclude_one_dimensional_parameters():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    groups = param_groups([net], Cfg, 1.0, 0.5)
    assert all(p.ndim == 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] > 0
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0
    assert groups[1]["lr"] == 0.5
    opt = build_optimizer([net], Cfg, global_batch=512)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)  # 0.2 * 512 / 256
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0096)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_umbc_groups_decay_everything():
    class Umbc(Cfg):
        name = "sgd"
        exclude_bias_and_norm = False
        lr_scaling = "none"

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    opt = build_optimizer([net], Umbc, global_batch=256)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 1.5e-6
