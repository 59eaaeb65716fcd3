"""MSF: Mean Shift for self-supervised learning (Koohpayegani et al., ICCV 2021).

views[0] -> online network + predictor (query ``q``), views[1] -> EMA target (shuffle-BN),
giving ``u``. The normalised targets are enqueued (all-gathered) *before* the search, so each
sample's own target is its nearest neighbour; the k nearest bank rows of ``u`` are found by the
bank's exact search and ``q`` is pulled towards them: ``mean(2 - 2 cos(q, bank[idx]))``
(:func:`ssl_lib.methods.losses.regression_loss`). With k = 1 this is BYOL-asym. Only the
gathered B x k x D neighbours enter the loss: no B x K matrix is built for the online branch
and the bank is never cloned.

With ``icutmix`` set, views[0] is mixed by i-CutMix (:mod:`ssl_lib.methods.icutmix`) and the
loss is ``lam * loss(own neighbours) + (1 - lam) * loss(partner's neighbours)``: the
neighbours come from the unmixed target view, and the regression loss is linear in its
targets, so the mixture is well defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ssl_lib.memory import MemoryBank
from ssl_lib.methods.base import BankMethodConfig, SSLMethod
from ssl_lib.methods.icutmix import ICutMixConfig, icutmix
from ssl_lib.methods.losses import neighbour_purity, regression_loss
from ssl_lib.methods.registry import METHODS
from ssl_lib.schema import require


@dataclass
class MSFConfig(BankMethodConfig):
    """MSF: ``k`` nearest neighbours in a bank of ``bank_size`` target embeddings;
    ``icutmix``: ``{alpha: ...}`` mixes the online view by i-CutMix (``null``: off)."""

    name: str = "msf"
    k: int = 5
    bank_size: int = 1024000
    icutmix: ICutMixConfig | None = None

    def check(self) -> None:
        super().check()
        require(self.k >= 1, "k", f"must be >= 1, got {self.k}")


@METHODS.register("msf")
class MSF(SSLMethod):
    """Mean shift: online prediction regressed onto the target's k nearest bank entries."""

    config_class = MSFConfig
    needs_predictor = True
    uses_target = True

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        batch = self.cfg.data.batch_size
        self.bank = self.build_bank(
            max(m.k, batch),
            f"it must hold the global batch (data.batch_size={batch}), which is enqueued before "
            f"the search, and at least method.k={m.k} rows",
        )

    def searched_banks(self) -> list[tuple[MemoryBank, int]]:
        return [(self.bank, self.cfg.method.k)]

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        mix = self.cfg.method.icutmix
        online = views[0]
        if mix is not None:
            online, partner, lam = icutmix(online, mix.alpha)
        q = self.predictor(self.project(online))
        u = F.normalize(self.target_project(views[1]).float(), dim=1)
        self.bank.enqueue(u, labels=labels)
        _, idx = self.bank.knn(u, self.cfg.method.k)
        neighbours = self.bank.gather(idx)
        if mix is None:
            loss = regression_loss(q, neighbours)
        else:
            loss = lam * regression_loss(q, neighbours)
            loss = loss + (1 - lam) * regression_loss(q, neighbours[partner])
        return loss, neighbour_purity(self.bank, idx, labels)
