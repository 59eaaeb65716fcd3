"""MSF: Mean Shift for self-supervised learning (Koohpayegani et al., ICCV 2021).

views[0] -> online network + predictor (query ``q``), views[1] -> EMA target (shuffle-BN),
giving ``u``. The normalised targets are enqueued (all-gathered) *before* the search, so each
sample's own target is its nearest neighbour; the k nearest bank rows of ``u`` are found by the
bank's exact search and ``q`` is pulled towards them: ``mean(2 - 2 q . bank[idx])``. With k = 1
this is BYOL-asym. Only the gathered B x k x D neighbours enter the loss: no B x K matrix is
built for the online branch and the bank is never cloned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ssl_lib.config import BankMethodConfig
from ssl_lib.memory import MemoryBank
from ssl_lib.methods.base import SSLMethod, neighbour_purity
from ssl_lib.methods.registry import METHODS


def msf_loss(q: Tensor, neighbours: Tensor) -> Tensor:
    """``mean over batch and k of 2 - 2 nrm(q_i) . n_ij`` for neighbours ``n`` (B x k x D).

    ``q`` is L2-normalised here; the neighbours are used as stored (unit rows of the bank).
    The loss is linear in the neighbours, so their mean over k is taken first (same value and
    gradient, a B x D product instead of B x k x D). Float32, no gradient into the neighbours.
    """
    q = F.normalize(q.float(), dim=-1)
    return 2 - 2 * (q * neighbours.detach().float().mean(dim=1)).sum(dim=-1).mean()


@dataclass
class MSFConfig(BankMethodConfig):
    """MSF: ``k`` nearest neighbours in a bank of ``bank_size`` target embeddings."""

    name: str = "msf"
    k: int = 5
    bank_size: int = 1024000


@METHODS.register("msf")
class MSF(SSLMethod):
    """Mean shift: online prediction regressed onto the target's k nearest bank entries."""

    config_class = MSFConfig
    needs_predictor = True
    uses_target = True

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        if m.k < 1:
            raise ValueError(f"method.k must be >= 1, got {m.k}")
        batch = self.cfg.data.batch_size
        self.bank = self.build_bank(
            max(m.k, batch),
            f"it must hold the global batch (data.batch_size={batch}), which is enqueued before "
            f"the search, and at least method.k={m.k} rows",
        )

    def searched_banks(self) -> list[tuple[MemoryBank, int]]:
        return [(self.bank, self.cfg.method.k)]

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        q = self.predictor(self.project(views[0]))
        u = F.normalize(self.target_project(views[1]).float(), dim=1)
        self.bank.enqueue(u, labels=labels)
        _, idx = self.bank.knn(u, self.cfg.method.k)
        loss = msf_loss(q, self.bank.gather(idx))
        purity = neighbour_purity(self.bank.payload("labels")[idx], labels)
        return loss, {} if purity is None else {"purity": purity}
