"""BYOL, in both published settings.

* ``symmetric: false`` is the UMBC "BYOL-asym" baseline: views[0] (strong) goes through the
  online network + predictor, views[1] (weak) through the EMA target, one loss direction.
* ``symmetric: true`` is the official BYOL: both directions, losses summed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ssl_lib.methods.base import SSLMethod, TargetMethodConfig
from ssl_lib.methods.losses import regression_loss
from ssl_lib.methods.registry import METHODS


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
