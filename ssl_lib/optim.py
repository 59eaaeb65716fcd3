"""Optimisers, parameter groups and the learning-rate / EMA-momentum schedules.

Schedules are pure functions of the optimiser step, so they are exact after a resume (the
step is restored) and testable against their closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from lightly.utils.lars import LARS
from torch import nn


def lr_factor(
    schedule: str,
    step: int,
    steps_per_epoch: int,
    max_epochs: int,
    *,
    warmup_epochs: float = 0.0,
    final_ratio: float = 0.0,
    milestones: Iterable[int] = (),
    gamma: float = 0.2,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    * ``cosine_epoch``: the UMBC code's per-epoch cosine with a 1-based epoch ``e`` and no
      warm-up, ``0.5 (1 + cos(pi (e - 1) / E))``; constant within an epoch.
    * ``warmup_cosine``: per step, linear warm-up from 0 over ``warmup_epochs``, then cosine
      from 1 down to ``final_ratio`` at the last step (BYOL, Barlow Twins).
    * ``step``: ``gamma ** n`` where ``n`` counts the milestones ``m`` with ``e >= m``
      (1-based epoch ``e``), as the UMBC step schedule.
    * ``constant``: 1.
    """
    epoch0 = step // max(1, steps_per_epoch)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine_epoch":
        return 0.5 * (1.0 + math.cos(math.pi * epoch0 / max_epochs))
    if schedule == "step":
        return gamma ** sum(epoch0 + 1 >= m for m in milestones)
    if schedule == "warmup_cosine":
        total = steps_per_epoch * max_epochs
        warmup = round(warmup_epochs * steps_per_epoch)
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        q = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return final_ratio + (1.0 - final_ratio) * q
    raise ValueError(f"unknown learning-rate schedule '{schedule}'")


def ema_momentum(schedule: str, base: float, final: float, step: int, total_steps: int) -> float:
    """EMA momentum at ``step``: ``constant`` (UMBC) or BYOL's ``cosine`` from base to final."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return final - (final - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2
    raise ValueError(f"unknown EMA schedule '{schedule}'")


def param_groups(modules: Iterable[nn.Module], cfg, lr: float, lr_biases: float) -> list[dict]:
    """Trainable parameters split into weights and 1-D parameters (biases, norm scales).

    With ``cfg.exclude_bias_and_norm`` the 1-D group gets no weight decay (which also excludes
    it from LARS adaptation) and its own learning rate ``lr_biases``; otherwise every parameter
    is decayed (the UMBC code).
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not cfg.exclude_bias_and_norm:
        return [{"params": params, "lr": lr, "weight_decay": cfg.weight_decay}]
    weights = [p for p in params if p.ndim > 1]
    ones = [p for p in params if p.ndim <= 1]
    return [
        {"params": weights, "lr": lr, "weight_decay": cfg.weight_decay},
        {"params": ones, "lr": lr_biases, "weight_decay": 0.0},
    ]


def build_optimizer(modules: Iterable[nn.Module], cfg, global_batch: int) -> torch.optim.Optimizer:
    """SGD or LARS (lightly's, which skips adaptation for zero-weight-decay groups)."""
    scale = global_batch / 256 if cfg.lr_scaling == "linear" else 1.0
    lr = cfg.lr * scale
    lr_biases = (cfg.lr_biases if cfg.lr_biases is not None else cfg.lr) * scale
    groups = param_groups(modules, cfg, lr, lr_biases)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.lars_trust_coefficient,
        )
    raise ValueError(f"unknown optimizer '{cfg.name}'; choose sgd or lars")
