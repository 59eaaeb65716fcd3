"""BYOL, in both published settings.

* ``symmetric: false`` is the UMBC "BYOL-asym" baseline: views[0] (strong) goes through the
  online network + predictor, views[1] (weak) through the EMA target, one loss direction.
* ``symmetric: true`` is the official BYOL: both directions, losses summed.

With ``icutmix`` set, every online view is mixed by i-CutMix (:mod:`ssl_lib.methods.icutmix`,
its own ratio and box per direction) and its prediction is regressed onto
``lam * own target + (1 - lam) * partner's target`` in loss terms: the loss is linear in the
target, so the i-CutMix mixture of two regression losses is well defined; the targets are the
EMA network's embeddings of the unmixed other view.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ssl_lib.methods.base import SSLMethod, TargetMethodConfig
from ssl_lib.methods.icutmix import ICutMixConfig, icutmix
from ssl_lib.methods.losses import regression_loss
from ssl_lib.methods.registry import METHODS


@dataclass
class BYOLConfig(TargetMethodConfig):
    """BYOL: ``symmetric`` selects the official two-direction loss; ``icutmix``:
    ``{alpha: ...}`` mixes the online views by i-CutMix (``null``: off)."""

    name: str = "byol"
    symmetric: bool = False
    icutmix: ICutMixConfig | None = None


@METHODS.register("byol")
class BYOL(SSLMethod):
    """Bootstrap Your Own Latent (Grill et al., 2020)."""

    config_class = BYOLConfig
    needs_predictor = True
    uses_target = True

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        loss = self.direction_loss(views[0], views[1])
        if self.cfg.method.symmetric:
            loss = loss + self.direction_loss(views[1], views[0])
        return loss, {}

    def direction_loss(self, online: Tensor, target: Tensor) -> Tensor:
        """Regression of the online prediction of ``online`` onto the target of ``target``."""
        targets = self.target_project(target)
        mix = self.cfg.method.icutmix
        if mix is None:
            return regression_loss(self.predictor(self.project(online)), targets)
        mixed, partner, lam = icutmix(online, mix.alpha)
        p = self.predictor(self.project(mixed))
        return lam * regression_loss(p, targets) + (1 - lam) * regression_loss(p, targets[partner])
