"""Backbones: images -> (B, feat_dim) features, built by name.

Every built-in CNN backbone is a :class:`StagedBackbone`: a list of stages followed by global
average pooling, so blockwise training can address the stages and evaluators can probe them.
The vision transformers (``vit_b_16``, ``vit_s_16``, ``vit_micro_p8``) give the final CLS
token (after the last LayerNorm) as their feature and are built for ``data.image_size``.
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


def _import_timm(name: str):
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"backbone '{name}' needs timm: pip install 'ssl_lib[timm]'") from err
    return timm


def _timm(name: str, **kwargs) -> nn.Module:
    timm = _import_timm(f"timm:{name}")
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    net.feat_dim = net.num_features
    return net


# Patch side (pixels) of the registered vision transformers; the image side must be a multiple.
VIT_PATCH_SIZES = {"vit_b_16": 16, "vit_s_16": 16, "vit_micro_p8": 8}


def image_size_problem(name: str, image_size: int) -> str | None:
    """Why backbone ``name`` cannot take ``image_size`` x ``image_size`` images, else ``None``.

    A vision transformer cuts the image into non-overlapping patches, so its patch side must
    divide the image side (Dosovitskiy et al., 2021, Sec. 3.1). The text completes the
    sentence "image size ...".
    """
    patch = VIT_PATCH_SIZES.get(name)
    if patch is None or image_size % patch == 0:
        return None
    lower = max(patch, image_size // patch * patch)
    return (
        f"{image_size} is not a multiple of the {patch}-pixel patch side of backbone '{name}': "
        f"use e.g. {lower} or {lower + patch}"
    )


def _check_vit_size(name: str, image_size: int) -> None:
    problem = image_size_problem(name, image_size)
    if problem is not None:
        raise ValueError(f"image size {problem}")


@BACKBONES.register("vit_b_16")
def vit_b_16(image_size: int = 224) -> nn.Module:
    """torchvision's ViT-B/16 (12 blocks, width 768, 12 heads), randomly initialised.

    Feature: the CLS token after the final LayerNorm, ``(B, 768)``.
    """
    _check_vit_size("vit_b_16", image_size)
    net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    net.heads = nn.Identity()  # forward then returns the CLS token
    net.feat_dim = net.hidden_dim
    return net


@BACKBONES.register("vit_s_16")
def vit_s_16(image_size: int = 224) -> nn.Module:
    """ViT-S/16 (12 blocks, width 384, 6 heads; timm ``vit_small_patch16_224``), randomly
    initialised (never downloads weights). Needs timm.

    Feature: the CLS token after the final LayerNorm, ``(B, 384)``.
    """
    _check_vit_size("vit_s_16", image_size)
    return _timm("vit_small_patch16_224", img_size=image_size, global_pool="token")


@BACKBONES.register("vit_micro_p8")
def vit_micro_p8(image_size: int = 32) -> nn.Module:
    """A 2-block ViT (width 32, 2 heads, patch 8) for tests and CPU demos. Needs timm.

    Feature: the CLS token after the final LayerNorm, ``(B, 32)``.
    """
    _check_vit_size("vit_micro_p8", image_size)
    timm = _import_timm("vit_micro_p8")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=image_size,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=0,
        global_pool="token",
    )
    net.feat_dim = net.num_features
    return net


def build_backbone(name: str, image_size: int | None = None, **kwargs) -> nn.Module:
    """Build a backbone by registry name, or ``timm:<model>`` through ``timm.create_model``.

    The returned module maps images to ``(B, feat_dim)`` and has a ``feat_dim`` attribute.
    ``image_size`` (pixels, square) reaches the backbones built for one input size (the
    vision transformers of ``VIT_PATCH_SIZES``); the others accept any size and ignore it.
    Raises ``ValueError`` when a vision transformer's patch side does not divide it.
    """
    if name.startswith("timm:"):
        return _timm(name[len("timm:") :], **kwargs)
    if image_size is not None and name in VIT_PATCH_SIZES:
        kwargs["image_size"] = image_size
    return BACKBONES.get(name)(**kwargs)


def backbone_names() -> list[str]:
    """Names accepted by :func:`build_backbone` (plus ``timm:<model>``)."""
    return BACKBONES.names()
