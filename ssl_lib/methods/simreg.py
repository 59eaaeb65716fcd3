"""SimReg: regression distillation from frozen self-supervised teachers.

Navaneet, Koohpayegani, Tejankar, Pirsiavash, "SimReg: Regression as a Simple Yet Effective
Tool for Self-supervised Knowledge Distillation", BMVC 2021, arXiv 2201.05131 (Sec. 3; the
official code UCDvision/simreg). A student backbone followed by a training-only head ``g_k``
per teacher regresses each teacher's feature: ``loss = sum_k w_k (2 - 2 cos(g_k(S(x)),
T_k(x))) / sum_k w_k`` (:func:`~ssl_lib.methods.losses.simreg_loss`). The heads are thrown
away after training: ``forward`` (what evaluators and ``ssl-lib export`` use) is the student
backbone.

Heads (``method.head``):

* ``official4`` (the released code's default): Linear d->2d, BN, ReLU, Linear 2d->d, then
  Linear d->2d, BN, ReLU, Linear 2d->D, with nothing between the two halves;
* ``linear2``: Linear d->2d, Linear 2d->D without BN or ReLU (what the code's
  ``n_mlp_layers=2`` builds, a factorised linear map);
* ``mlp``: any :class:`~ssl_lib.models.MLPConfig` in ``method.head_mlp`` (its ``out_dim`` is
  replaced by each teacher's width).

Views (``method.view_mode``): ``same_weak`` (the paper's choice: one weak view, the same
tensor to student and teacher; ``data.views`` holds one view), ``weak_strong`` (views[0]
strong to the student, views[1] weak to the teacher) and ``strong_strong``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from ssl_lib.distill import TeacherConfig, check_teachers
from ssl_lib.methods.distill import DistillMethod
from ssl_lib.methods.losses import simreg_loss
from ssl_lib.methods.registry import METHODS
from ssl_lib.models import MLPConfig, build_mlp
from ssl_lib.schema import MethodConfig

VIEW_COUNTS = {"same_weak": 1, "weak_strong": 2, "strong_strong": 2}


@dataclass
class SimRegConfig(MethodConfig):
    """SimReg: ``teachers`` (one head each), the ``head`` variant and the ``view_mode``."""

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "head": ("official4", "linear2", "mlp"),
        "view_mode": tuple(VIEW_COUNTS),
    }

    name: str = "simreg"
    teachers: list[TeacherConfig] = field(default_factory=list)
    head: str = "official4"
    head_mlp: MLPConfig = field(default_factory=MLPConfig)
    view_mode: str = "same_weak"

    def check(self) -> None:
        super().check()
        check_teachers(self.teachers, 1, None)


def simreg_head(kind: str, in_dim: int, out_dim: int, mlp: MLPConfig | None = None) -> nn.Module:
    """One SimReg head from the student width ``in_dim`` to a teacher width ``out_dim``."""
    if kind == "official4":
        half = MLPConfig(hidden_dim=2 * in_dim, out_dim=in_dim, num_layers=2)
        last = MLPConfig(hidden_dim=2 * in_dim, out_dim=out_dim, num_layers=2)
        return nn.Sequential(*build_mlp(in_dim, half), *build_mlp(in_dim, last))
    if kind == "linear2":
        return nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.Linear(2 * in_dim, out_dim))
    return build_mlp(in_dim, dataclasses.replace(mlp or MLPConfig(), out_dim=out_dim))


@METHODS.register("simreg")
class SimReg(DistillMethod):
    """Student backbone + one training-only head per frozen teacher."""

    config_class = SimRegConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        cfg = self.cfg
        if cfg.model.projector is not None:
            raise ValueError(
                "method simreg needs model.projector=null: its heads (method.head) map the "
                "student backbone to each teacher"
            )
        needed = VIEW_COUNTS[cfg.method.view_mode]
        if len(cfg.data.views) != needed:
            raise ValueError(
                f"method.view_mode={cfg.method.view_mode} needs {needed} view(s) in data.views, "
                f"got {list(cfg.data.views)} (same_weak: [weak]; weak_strong: [strong, weak])"
            )
        mlp = MLPConfig(**cfg.method.head_mlp)
        self.heads = nn.ModuleList(
            simreg_head(cfg.method.head, self.backbone.feat_dim, dim, mlp)
            for dim in self.teacher_dims
        )

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        student_view = views[0]
        teacher_view = views[0] if self.cfg.method.view_mode == "same_weak" else views[1]
        features = self.backbone(student_view)
        predictions = [head(features) for head in self.heads]
        targets = self.teacher_features(teacher_view, index)
        weights = [spec.weight for spec in self.cfg.method.teachers]
        return simreg_loss(predictions, targets, weights), {}
