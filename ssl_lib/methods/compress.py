"""CompRess: similarity-distribution distillation from a frozen self-supervised teacher.

Koohpayegani, Tejankar, Pirsiavash, "CompRess: Self-Supervised Learning by Compressing
Representations", NeurIPS 2020, arXiv 2010.14713 (Sec. 3, Eq. 1-3; the official code
UMBCvision/CompRess). The teacher embeds an image; its softmax distribution of similarities to
a bank of anchors (past teacher embeddings), at temperature T_t, is the target of the
student's distribution at T_s: ``KL(p_teacher || p_student)``, ``batchmean``
(:func:`compress_loss`). Variants (``method.variant``):

* ``2q`` (the paper's main one): the student's similarities are to its own bank, written by a
  momentum (EMA, m = 0.999) copy of the student; the EMA averages parameters only, not the
  BatchNorm buffers, and the copy's BatchNorm runs in train mode (batch statistics);
* ``2q_nomomentum``: the student bank is written by the student itself;
* ``1q`` (one queue): the student's embedding goes through ``Linear(d_s -> d_t)`` and is
  compared with the *teacher's* bank, which the student never writes. This is ISD's loss
  (:func:`ssl_lib.methods.isd.isd_loss`) with a frozen external teacher.

Similarities use the banks as they were before this batch; the batch's embeddings are then
written (all-gathered under several processes, so every process holds the same banks). Both
sides are L2-normalised; the anchors are used as stored: ``bank_init: uniform_cmc`` fills them
with i.i.d. uniform values in ``[-s, s]``, ``s = 1 / sqrt(D / 3)``, not normalised (the code's
CMC-style init), ``rows`` with L2-normalised Gaussian rows. One view per image goes to both
networks (``data.views: [view]``); with two views, views[0] goes to the student and views[1]
to the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from ssl_lib.distill import TeacherConfig, check_teachers
from ssl_lib.memory import MemoryBank
from ssl_lib.methods.base import BankMethodConfig
from ssl_lib.methods.distill import DistillMethod
from ssl_lib.methods.isd import PURITY_K, isd_loss
from ssl_lib.methods.losses import neighbour_purity
from ssl_lib.methods.registry import METHODS

VARIANTS = ("2q", "2q_nomomentum", "1q")


def compress_loss(
    student: Tensor,
    teacher: Tensor,
    student_anchors: Tensor,
    teacher_anchors: Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> tuple[Tensor, Tensor]:
    """CompRess's ``KL(p_t || p_s)`` (arXiv 2010.14713, Sec. 3, Eq. 3), ``batchmean``.

    Args:
        student: ``(B, d_s)`` student embeddings (L2-normalised here).
        teacher: ``(B, d_t)`` teacher embeddings (L2-normalised here; no gradient).
        student_anchors: ``(K_s, d_s)`` anchors of the student side, used as stored.
        teacher_anchors: ``(K_t, d_t)`` anchors of the teacher side (``K_s == K_t``; the same
            tensor for ``1q``).
        student_temperature, teacher_temperature: T_s and T_t (0.04 in the paper).

    ``p_t = softmax(t A_t^T / T_t)``, ``p_s = softmax(s A_s^T / T_s)``; the KL is summed over
    the anchors and averaged over the batch, in float32. Returns the float32 scalar loss and the
    ``(B, K_t)`` teacher similarities ``t A_t^T`` (reused for the bank's neighbour purity).
    """
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    student_sims = s @ student_anchors.detach().float().T
    teacher_sims = t @ teacher_anchors.detach().float().T
    loss = isd_loss(student_sims, teacher_sims, student_temperature, teacher_temperature)
    return loss, teacher_sims


@dataclass
class CompressConfig(BankMethodConfig):
    """CompRess: one teacher, the variant, temperatures, banks and their initialisation.

    ``linear_map`` (``1q``): the ``Linear(d_s -> d_t)`` on the student; without it the
    student's embedding must already have the teacher's width. ``ema_momentum``: m of the
    ``2q`` key encoder (constant, no shuffle-BN, as the official code).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "variant": VARIANTS,
        "bank_init": ("uniform_cmc", "rows"),
    }

    name: str = "compress"
    teachers: list[TeacherConfig] = field(default_factory=list)
    variant: str = "2q"
    teacher_temperature: float = 0.04
    student_temperature: float = 0.04
    bank_size: int = 128000
    bank_init: str = "uniform_cmc"
    linear_map: bool = True
    ema_momentum: float = 0.999
    shuffle_bn: bool = False

    def check(self) -> None:
        super().check()
        check_teachers(self.teachers, 1, 1)


def _variant(config: Any) -> str:
    """``method.variant`` of a config (DictConfig or plain dict), before it is validated."""
    raw = config if OmegaConf.is_config(config) else OmegaConf.create(config)
    return str(OmegaConf.select(raw, "method.variant", default=CompressConfig.variant))


@METHODS.register("compress")
class CompRess(DistillMethod):
    """Student (backbone [+ projector]) matching a frozen teacher's similarity distribution."""

    config_class = CompressConfig

    def __init__(self, config) -> None:
        self.uses_target = _variant(config) == "2q"  # the momentum key encoder
        super().__init__(config)
        m = self.cfg.method
        teacher_dim, student_dim = self.teacher_dims[0], self.embed_dim
        self.to_teacher: nn.Module = nn.Identity()
        if m.variant == "1q":
            if m.linear_map:
                self.to_teacher = nn.Linear(student_dim, teacher_dim)
            elif student_dim != teacher_dim:
                raise ValueError(
                    f"method.variant=1q compares the student with the teacher's bank, but the "
                    f"student embedding is {student_dim}-d and the teacher's {teacher_dim}-d: "
                    "set method.linear_map=true (a Linear student -> teacher) or match the widths"
                )
        self.bank = self._bank(teacher_dim, self.cfg.run.seed)
        if m.variant != "1q":  # no labels: only the teacher bank's feed the purity monitor
            self.student_bank = self._bank(student_dim, self.cfg.run.seed + 1, payloads=())

    def _bank(self, dim: int, seed: int, payloads: tuple[str, ...] = ("labels",)) -> MemoryBank:
        m = self.cfg.method
        if m.bank_size < 2:
            raise ValueError(f"method.bank_size ({m.bank_size}) must be >= 2")
        bank = MemoryBank(
            m.bank_size, dim, payloads, dtype=m.bank_dtype, backend=m.search_backend, seed=seed
        )
        if m.bank_init == "uniform_cmc":
            bound = 1.0 / math.sqrt(dim / 3)
            gen = torch.Generator().manual_seed(seed)
            rows = torch.rand(m.bank_size, dim, generator=gen) * (2 * bound) - bound
            bank.embeddings.copy_(rows)
        return bank

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        m = self.cfg.method
        student_view, teacher_view = views[0], views[-1]
        student = F.normalize(self.to_teacher(self.project(student_view)).float(), dim=1)
        teacher = F.normalize(self.teacher_features(teacher_view, index)[0], dim=1)
        student_bank = self.bank if m.variant == "1q" else self.student_bank
        loss, teacher_sims = compress_loss(
            student,
            teacher,
            student_bank.embeddings,
            self.bank.embeddings,
            m.student_temperature,
            m.teacher_temperature,
        )
        with torch.no_grad():
            top = teacher_sims.topk(min(PURITY_K, self.bank.size), dim=1)
        extra = neighbour_purity(self.bank, top.indices, labels)
        # Both banks take this batch after the optimiser step: the loss saw them without it.
        self.enqueue_after_step(teacher, labels=labels)
        if m.variant == "2q":
            key = F.normalize(self.target_project(student_view).float(), dim=1)
            self.enqueue_after_step(key, bank=self.student_bank)
        elif m.variant == "2q_nomomentum":
            self.enqueue_after_step(student, bank=self.student_bank)
        return loss, extra
