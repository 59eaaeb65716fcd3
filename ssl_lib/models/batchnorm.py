"""Which BatchNorm layers cannot train on batches of one sample."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def one_sample_batchnorms(
    root: nn.Module, trained: Iterable[nn.Module], backbone: nn.Module, image_size: int
) -> list[str]:
    """Names (in ``root``) of the BatchNorm layers of ``trained`` that one sample cannot train.

    A BatchNorm in training mode needs more than one value per channel: every ``BatchNorm1d``
    on feature vectors (projector, predictor and other heads) fails with one sample, and a
    ``BatchNorm2d`` of the backbone fails when its feature map is 1 x 1 at ``image_size``
    (found with one forward pass of ``backbone`` on a 1-image batch, in eval mode, which
    changes no statistics; the modules' training flags are restored afterwards).
    """
    names = {id(m): name for name, m in root.named_modules()}
    norms = [
        m
        for module in trained
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    single: dict[int, bool] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        single[id(module)] = x.numel() // max(x.shape[1], 1) <= 1

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    modes = [(m, m.training) for m in backbone.modules()]
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        backbone.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    found = []
    for m in norms:
        # not reached by the backbone pass: a head's BatchNorm on (batch, features) rows
        rows = isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm))
        name = names.get(id(m), type(m).__name__)
        if single.get(id(m), rows) and name not in found:
            found.append(name)
    return found
