"""BYOL, in both published settings.

* ``symmetric: false`` is the UMBC "BYOL-asym" baseline: views[0] (strong) goes through the
  online network + predictor, views[1] (weak) through the EMA target, one loss direction.
* ``symmetric: true`` is the official BYOL: both directions, losses summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ssl_lib.config import TargetMethodConfig
from ssl_lib.methods.base import SSLMethod
from ssl_lib.methods.registry import METHODS


def regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean(2 - 2 cos(p, z))`` over the batch, in float32; no gradient flows into ``z``."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


@dataclass
class BYOLConfig(TargetMethodConfig):
    """BYOL: ``symmetric`` selects the official two-direction loss."""

    name: str = "byol"
    symmetric: bool = False


@METHODS.register("byol")
class BYOL(SSLMethod):
    """Bootstrap Your Own Latent (Grill et al., 2020)."""

    config_class = BYOLConfig
    needs_predictor = True
    uses_target = True

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        online, target = views[0], views[1]
        loss = regression_loss(self.predictor(self.project(online)), self.target_project(target))
        if self.cfg.method.symmetric:
            loss = loss + regression_loss(
                self.predictor(self.project(target)), self.target_project(online)
            )
        return loss, {}
