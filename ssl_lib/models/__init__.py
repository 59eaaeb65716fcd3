"""Backbones and MLP heads."""

from ssl_lib.models.backbones import BACKBONES, StagedBackbone, backbone_names, build_backbone
from ssl_lib.models.batchnorm import one_sample_batchnorms
from ssl_lib.models.heads import MLPConfig, build_mlp

__all__ = [
    "BACKBONES",
    "MLPConfig",
    "StagedBackbone",
    "backbone_names",
    "build_backbone",
    "build_mlp",
    "one_sample_batchnorms",
]
