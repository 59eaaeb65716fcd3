"""One MLP builder for every projector / predictor shape used by the supported papers.

lightly's heads fix one shape per method and drop the bias of layers followed by BatchNorm;
the UMBC code (ISD, MSF, CMSF) keeps that bias, MoCo v2 has no BatchNorm and Barlow Twins
uses three layers, so a single parametrised builder covers all of them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class MLPConfig:
    """Shape of an MLP head.

    ``num_layers`` linear layers; every layer but the last is followed by BatchNorm (if
    ``batch_norm``) and ReLU. ``last_bn`` adds a BatchNorm after the last layer (affine or not).
    """

    hidden_dim: int = 4096
    out_dim: int = 512
    num_layers: int = 2
    batch_norm: bool = True
    hidden_bias: bool = True
    last_bias: bool = True
    last_bn: bool = False
    last_bn_affine: bool = True


def build_mlp(in_dim: int, cfg: MLPConfig) -> nn.Sequential:
    """Linear -> [BN] -> ReLU, repeated, then Linear (-> [BN])."""
    if cfg.num_layers < 1:
        raise ValueError(f"MLP num_layers must be >= 1, got {cfg.num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(cfg.num_layers - 1):
        layers.append(nn.Linear(dim, cfg.hidden_dim, bias=cfg.hidden_bias))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = cfg.hidden_dim
    layers.append(nn.Linear(dim, cfg.out_dim, bias=cfg.last_bias))
    if cfg.last_bn:
        layers.append(nn.BatchNorm1d(cfg.out_dim, affine=cfg.last_bn_affine))
    return nn.Sequential(*layers)
