"""Backbones: images -> (B, feat_dim) features, built by name.

Every built-in backbone is a :class:`StagedBackbone`: a list of stages followed by global
average pooling, so blockwise training can address the stages and evaluators can probe them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from ssl_lib.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")  # torchvision builders of the ResNets


class StagedBackbone(nn.Module):
    """A sequence of stages followed by global average pooling.

    Attributes:
        stages: the blocks, applied in order (for ResNets: stem+layer1, layer2, layer3, layer4).
        stage_dims: channel count of each stage's output.
        feat_dim: dimension of the pooled output (the last stage's channels).
    """

    def __init__(self, stages: list[nn.Module], stage_dims: list[int]) -> None:
        super().__init__()
        if len(stages) != len(stage_dims):
            raise ValueError("stages and stage_dims must have the same length")
        self.stages = nn.ModuleList(stages)
        self.stage_dims = list(stage_dims)
        self.feat_dim = stage_dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _resnet(arch: str, cifar_stem: bool) -> StagedBackbone:
    # torchvision's ResNet initialisation matches the papers' (He-normal convs, BN gamma=1,
    # beta=0, no zero-init of the last BN in each block), so it is used as is.
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        # 32x32 inputs: 3x3 stride-1 first conv and no max-pool (the usual CIFAR variant).
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    stages = [stem, net.layer2, net.layer3, net.layer4]
    dims = [_out_channels(s) for s in stages]
    return StagedBackbone(stages, dims)


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


for _arch in RESNET_ARCHS:
    BACKBONES.register(_arch)(lambda a=_arch: _resnet(a, cifar_stem=False))
    BACKBONES.register(f"{_arch}_cifar")(lambda a=_arch: _resnet(a, cifar_stem=True))


@BACKBONES.register("tiny_cnn")
def tiny_cnn(width: int = 16) -> StagedBackbone:
    """A four-stage CNN with a few thousand parameters, for tests and CPU demos."""

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    widths = [width, 2 * width, 4 * width, 8 * width]
    stages = [block(3, widths[0], 1)]
    stages += [block(widths[i - 1], widths[i], 2) for i in range(1, 4)]
    return StagedBackbone(stages, widths)


def _timm(name: str, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"backbone 'timm:{name}' needs timm: pip install 'ssl_lib[timm]'"
        ) from err
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    net.feat_dim = net.num_features
    return net


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by registry name, or ``timm:<model>`` through ``timm.create_model``.

    The returned module maps images to ``(B, feat_dim)`` and has a ``feat_dim`` attribute.
    """
    if name.startswith("timm:"):
        return _timm(name[len("timm:") :], **kwargs)
    return BACKBONES.get(name)(**kwargs)


def backbone_names() -> list[str]:
    """Names accepted by :func:`build_backbone` (plus ``timm:<model>``)."""
    return BACKBONES.names()
