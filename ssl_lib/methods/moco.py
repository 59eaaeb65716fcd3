"""MoCo v2 (Chen et al., 2020): InfoNCE of a query against its key and a queue of past keys.

views[0] -> query encoder (online backbone + MLP head), views[1] -> key encoder (the EMA
target, shuffle-BN across processes). The queue is the method's memory bank; the current keys
are enqueued (all-gathered) *after* the logits, so they never act as their own negatives.
With ``icutmix`` set, the query images are mixed by i-CutMix (:mod:`ssl_lib.methods.icutmix`)
and the loss is :func:`icutmix_infonce_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lib.methods.base import BankMethodConfig, SSLMethod
from ssl_lib.methods.icutmix import ICutMixConfig, icutmix
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


def icutmix_infonce_loss(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float, partner: Tensor, lam: float
) -> Tensor:
    """InfoNCE of i-CutMix queries: ``lam * CE(own key) + (1 - lam) * CE(partner's key)``.

    The logits of query ``i`` are ``[q_i . k_j for every key j of the batch, q_i . queue] / T``;
    its own key is class ``i`` and its partner's key class ``partner[i]``. PatchSearch's
    i-CutMix is written for MoCo v3, whose logits are the in-batch keys only (and whose loss is
    scaled by 2T); for MoCo v2 the queue is kept as further negatives, as i-Mix does for MoCo
    (Lee et al., ICLR 2021), and the loss is not rescaled, so ``lam = 1`` is MoCo v2's
    InfoNCE with the other keys of the batch as extra negatives.

    ``q``, ``k``: (B, D), L2-normalised here; ``queue``: (K, D) rows used as stored;
    ``partner``: (B,) int64 permutation. Float32; no gradient flows into ``k`` or the queue.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    logits = torch.cat([q @ k.T, q @ queue.detach().float().T], dim=1) / temperature
    log_p = logits.log_softmax(dim=1)  # one softmax over batch + queue serves both targets
    rows = torch.arange(q.shape[0], device=q.device)
    return -(lam * log_p[rows, rows] + (1 - lam) * log_p[rows, partner]).mean()


@dataclass
class MoCoConfig(BankMethodConfig):
    """MoCo v2: queue of ``bank_size`` keys, InfoNCE ``temperature``, constant m = 0.999.

    ``icutmix``: ``{alpha: ...}`` mixes the queries by i-CutMix (``null``: off).
    """

    name: str = "moco"
    temperature: float = 0.2
    ema_momentum: float = 0.999
    icutmix: ICutMixConfig | None = None


@METHODS.register("moco")
class MoCo(SSLMethod):
    """Momentum Contrast v2: no predictor; the key encoder is the EMA target."""

    config_class = MoCoConfig
    uses_target = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bank = self.build_bank(1, "the queue needs at least one negative")

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        m = self.cfg.method
        k = F.normalize(self.target_project(views[1]).float(), dim=1)
        if m.icutmix is None:
            loss = infonce_loss(self.project(views[0]), k, self.bank.embeddings, m.temperature)
        else:
            mixed, partner, lam = icutmix(views[0], m.icutmix.alpha)
            loss = icutmix_infonce_loss(
                self.project(mixed), k, self.bank.embeddings, m.temperature, partner, lam
            )
        self.enqueue_after_step(k, labels=labels)  # keys go in after the logits
        return loss, {}
