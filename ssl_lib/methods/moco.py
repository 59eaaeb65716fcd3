"""MoCo v2 (Chen et al., 2020): InfoNCE of a query against its key and a queue of past keys.

views[0] -> query encoder (online backbone + MLP head), views[1] -> key encoder (the EMA
target, shuffle-BN across processes). The queue is the method's memory bank; the current keys
are enqueued (all-gathered) *after* the logits, so they never act as their own negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lib.methods.base import BankMethodConfig, SSLMethod
from ssl_lib.methods.registry import METHODS


def infonce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: cross-entropy of ``[q.k, q.queue] / T`` with the positive at index 0.

    ``q`` and ``k`` (B x D) are L2-normalised here, ``queue`` (K x D) rows are used as stored;
    everything is computed in float32 and no gradient flows into ``k`` or the queue.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    positives = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.detach().float().T
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@dataclass
class MoCoConfig(BankMethodConfig):
    """MoCo v2: queue of ``bank_size`` keys, InfoNCE ``temperature``, constant m = 0.999."""

    name: str = "moco"
    temperature: float = 0.2
    ema_momentum: float = 0.999


@METHODS.register("moco")
class MoCo(SSLMethod):
    """Momentum Contrast v2: no predictor; the key encoder is the EMA target."""

    config_class = MoCoConfig
    uses_target = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bank = self.build_bank(1, "the queue needs at least one negative")

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        q = self.project(views[0])
        k = F.normalize(self.target_project(views[1]).float(), dim=1)
        loss = infonce_loss(q, k, self.bank.embeddings, self.cfg.method.temperature)
        self.enqueue_after_step(k, labels=labels)  # keys go in after the logits
        return loss, {}
