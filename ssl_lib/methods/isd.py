"""ISD: Iterative Similarity Distillation (Tejankar et al., ICCV 2021).

The student matches the teacher's distribution of similarities to a bank of anchors (past
teacher embeddings): ``KL(softmax(t A^T / T_t) || softmax(s A^T / T_s))``, averaged over the
batch. views[0] -> student (online + predictor), views[1] -> teacher (EMA target, shuffle-BN).
The anchors are the bank *before* this step's enqueue; the teacher embeddings are enqueued
(all-gathered) after the loss. Both official variants are config values:

* ISD-plus (R-50): projector + predictor, T_t = 0.01, T_s = 0.1, m = 0.99, weak view to the
  teacher, strong to the student.
* ISD-R18: no projector, predictor f-f-f, T = 0.02 on both sides, m = 0.999, strong/strong;
  ``bank_init: columns`` reproduces its queue initialisation (normalised along dim 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lib.methods.base import BankMethodConfig, SSLMethod
from ssl_lib.methods.losses import neighbour_purity
from ssl_lib.methods.registry import METHODS

PURITY_K = 5


def isd_loss(
    student_sims: Tensor,
    teacher_sims: Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> Tensor:
    """``KL(p_t || p_s)`` with ``batchmean``: sum over anchors, mean over the batch.

    ``p = softmax(sims / T)`` over the B x K similarities to the anchors, in float32; no gradient
    flows into the teacher side.
    """
    log_p_s = F.log_softmax(student_sims.float() / student_temperature, dim=1)
    p_t = F.softmax(teacher_sims.detach().float() / teacher_temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean")


@dataclass
class ISDConfig(BankMethodConfig):
    """ISD: temperatures of both sides, the anchor bank and its initialisation.

    ``bank_init``: ``rows`` (L2-normalised random rows, ISD-plus) or ``columns`` (the random
    K x D queue normalised along dim 0, as ISD-R18's ``train_isd.py`` does).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"bank_init": ("rows", "columns")}

    name: str = "isd"
    teacher_temperature: float = 0.01
    student_temperature: float = 0.1
    bank_size: int = 128000
    bank_init: str = "rows"


@METHODS.register("isd")
class ISD(SSLMethod):
    """Student = online network + predictor, teacher = EMA target (backbone [+ projector])."""

    config_class = ISDConfig
    needs_predictor = True
    uses_target = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bank = self.build_bank(2, "the similarity distributions need several anchors")
        if self.cfg.method.bank_init == "columns":
            gen = torch.Generator().manual_seed(self.cfg.run.seed)
            rows = torch.randn(self.bank.size, self.bank.dim, generator=gen)
            self.bank.embeddings.copy_(F.normalize(rows, dim=0))

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        m = self.cfg.method
        student = F.normalize(self.predictor(self.project(views[0])).float(), dim=1)
        teacher = F.normalize(self.target_project(views[1]).float(), dim=1)
        anchors = self.bank.embeddings.float()  # no copy for an fp32 bank
        teacher_sims = teacher @ anchors.T
        loss = isd_loss(
            student @ anchors.T, teacher_sims, m.student_temperature, m.teacher_temperature
        )
        top = teacher_sims.topk(min(PURITY_K, self.bank.size), dim=1).indices
        extra = neighbour_purity(self.bank, top, labels)
        self.enqueue_after_step(teacher, labels=labels)  # anchors exclude the current batch
        return loss, extra
