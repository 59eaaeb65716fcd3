"""The cosine centroid pseudo-classifier of PatchSearch and Grad-CAM on it, for CNNs and ViTs.

Grad-CAM (Selvaraju et al., ICCV 2017, Eq. 1-2) comes from captum's ``LayerGradCam``: captum
depends only on torch, numpy and matplotlib, whereas the ``grad-cam`` package pulls OpenCV
(``opencv-python``, which needs ``libGL`` to import on a headless server), scikit-learn and
ttach. captum treats dimension 1 of the layer output as channels, so a ViT's tokens
``(B, N, D)`` are shown to it as a ``(B, D, h, w)`` grid by :class:`_TokenGrid`, installed in
the last block for the duration of the attribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from ssl_lib.models.backbones import StagedBackbone
from ssl_lib.schema import ConfigError


class PseudoClassifier(nn.Module):
    """Backbone -> L2-normalise -> cosine similarity to each normalised centroid.

    PatchSearch Sec. 3.2: the "classes" are the k-means clusters, the logit of cluster c is
    the cosine similarity of the feature to the normalised mean feature of c. The head is a
    bias-free ``nn.Linear`` called by :meth:`forward` itself, so Grad-CAM explains the cluster
    logit whatever the backbone (the original attaches it as ``model.fc``, which a timm ViT's
    forward never calls).

    ``centroids``: float ``(K, D)``; normalised here. ``forward``: images ``(B, 3, S, S)`` ->
    logits ``(B, K)`` float32 in [-1, 1].
    """

    def __init__(self, backbone: nn.Module, centroids: Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(centroids.shape[1], centroids.shape[0], bias=False)
        self.head.weight.data.copy_(nn.functional.normalize(centroids.float(), dim=1))
        self.head.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.normalize(self.backbone(x).flatten(1), dim=1))


def cluster_centroids(feats: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised mean feature of each non-empty cluster, and the clusters renumbered 0..K-1.

    ``feats``: float ``(N, D)``; ``assign``: int64 ``(N,)`` cluster ids. Returns
    ``(centroids (K, D) float32, assign (N,) int64)`` with empty clusters removed.
    """
    ids, assign = torch.unique(assign, return_inverse=True)
    sums = torch.zeros(len(ids), feats.shape[1]).index_add_(0, assign, feats.float())
    return nn.functional.normalize(sums, dim=1), assign


class _ToGrid(nn.Module):
    """Patch tokens ``(B, h*w, D)`` -> ``(B, D, h, w)``: the layer captum explains for a ViT."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)


class _TokenGrid(nn.Module):
    """``layer`` followed by a round trip of its patch tokens through :class:`_ToGrid`.

    The output equals ``layer``'s; the prefix tokens (class / register tokens) pass unchanged.
    """

    def __init__(self, layer: nn.Module, num_prefix: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.layer = layer
        self.num_prefix = num_prefix
        self.to_grid = _ToGrid(grid)

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        grid = self.to_grid(y[:, self.num_prefix :])
        return torch.cat([y[:, : self.num_prefix], grid.flatten(2).transpose(1, 2)], dim=1)


def _vit_site(backbone: nn.Module) -> tuple[nn.Module, str, int, int] | None:
    """``(module, attribute, prefix tokens, patch size)`` of a ViT's last block's first norm."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed"):  # timm
        patch = backbone.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, tuple | list) else patch
        return backbone.blocks[-1], "norm1", int(getattr(backbone, "num_prefix_tokens", 1)), patch
    encoder = getattr(backbone, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers") and hasattr(backbone, "patch_size"):
        return encoder.layers[-1], "ln_1", 1, int(backbone.patch_size)  # torchvision
    return None


@contextmanager
def cam_layer(backbone: nn.Module, image_size: int) -> Iterator[nn.Module]:
    """The layer Grad-CAM explains, as PatchSearch chooses it (Sec. 3.2, code).

    CNNs: the last stage (``StagedBackbone.stages[-1]``, or ``layer4`` of a torchvision / timm
    ResNet). ViTs (timm ``VisionTransformer``, torchvision ``VisionTransformer``): the first
    LayerNorm of the last block, its patch tokens reshaped to the ``image_size / patch`` grid;
    the reshaping module is removed again on exit. Raises ``ConfigError`` for another backbone
    or a patch size that does not divide ``image_size``.
    """
    if isinstance(backbone, StagedBackbone):
        yield backbone.stages[-1]
        return
    if hasattr(backbone, "layer4"):
        yield backbone.layer4
        return
    site = _vit_site(backbone)
    if site is None:
        raise ConfigError(
            f"Grad-CAM: backbone {type(backbone).__name__} is neither a staged CNN, a ResNet "
            "(layer4) nor a timm / torchvision ViT"
        )
    parent, name, num_prefix, patch = site
    if image_size % patch:
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of the ViT's patch size {patch}"
        )
    side = image_size // patch
    original = getattr(parent, name)
    wrapper = _TokenGrid(original, num_prefix, (side, side))
    setattr(parent, name, wrapper)
    try:
        yield wrapper.to_grid
    finally:
        setattr(parent, name, original)


def grad_cam(classifier: PseudoClassifier, images: Tensor, image_size: int) -> Tensor:
    """Grad-CAM of each image for its top pseudo-class, upsampled to the image.

    ``images``: float ``(B, 3, S, S)`` on the classifier's device. Returns ``(cams (B, S, S)
    float32, top classes (B,) int64)``; the maps are ReLU'd and bilinearly upsampled from the
    layer's resolution (not min-max scaled: the window search does not depend on it).
    """
    with torch.no_grad():
        top = classifier(images).argmax(dim=1)
    with cam_layer(classifier.backbone, image_size) as layer:
        cam = LayerGradCam(classifier, layer).attribute(images, target=top, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), images.shape[-2:], "bilinear")
    return cam[:, 0].float(), top


def salient_window(cams: Tensor, window: int) -> Tensor:
    """Top-left corner ``(y, x)`` of the ``window x window`` square of largest sum in each map.

    A box filter of stride 1 from the integral image (float64); exact ties go to the first
    position in row-major order. ``cams``: ``(B, H, W)``. Returns int64 ``(B, 2)``. Raises
    ``ValueError`` when ``window`` exceeds ``H`` or ``W``.
    """
    b, h, w = cams.shape
    if not 1 <= window <= min(h, w):
        raise ValueError(f"window {window} does not fit in {h} x {w} maps")
    s = nn.functional.pad(cams.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    box = s[:, window:, window:] - s[:, :-window, window:] - s[:, window:, :-window]
    box = box + s[:, :-window, :-window]
    flat = box.flatten(1).argmax(dim=1)
    cols = w - window + 1
    return torch.stack([flat // cols, flat % cols], dim=1)
