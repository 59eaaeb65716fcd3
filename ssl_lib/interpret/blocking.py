"""Test-time patch blocking for vision transformers (Subramanya et al., "Backdoor Attacks on
Vision Transformers", arXiv 2206.08477).

For each test image: the rollout map of its predicted class (:mod:`ssl_lib.interpret.rollout`)
is smoothed by a box filter (31 x 31 at 224 px); a square (30 x 30 at 224 px, the trigger size
of the paper, so the defence is told the trigger size) centred on the filtered map's peak and
shifted to lie inside the image is set to black in pixel space (and normalised like the rest
of the image); the blocked image is classified again. Both sizes scale with the image side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.interpret.rollout import rollout_maps

__all__ = [
    "BLOCK_AT_224",
    "FILTER_AT_224",
    "block_at_peaks",
    "block_squares",
    "box_filter",
    "peak_positions",
    "scaled_block_size",
    "scaled_filter_size",
    "square_box",
]

REFERENCE_SIZE = 224
BLOCK_AT_224 = 30  # side of the blocked square at 224 px
FILTER_AT_224 = 31  # side of the box filter at 224 px (odd: centred windows)


def scaled_block_size(image_size: int, at_224: int = BLOCK_AT_224) -> int:
    """``at_224`` scaled to ``image_size`` (rounded, at least 1 pixel)."""
    return max(1, round(at_224 * image_size / REFERENCE_SIZE))


def scaled_filter_size(image_size: int, at_224: int = FILTER_AT_224) -> int:
    """The odd box-filter side nearest to ``at_224`` scaled to ``image_size`` (at least 1)."""
    half = round((at_224 - 1) / 2 * image_size / REFERENCE_SIZE)
    return 2 * max(0, half) + 1


def box_filter(maps: Tensor, size: int) -> Tensor:
    """Mean over the ``size`` x ``size`` window centred on each pixel (zero padding).

    ``maps``: (B, H, W) float; ``size`` odd. Returns (B, H, W); its argmax is the centre of
    the window with the largest sum (the ones-kernel convolution of the paper, divided by
    ``size**2``). Raises ``ValueError`` for an even or non-positive ``size``.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the box filter side must be odd and >= 1, got {size}")
    pooled = F.avg_pool2d(
        maps[:, None].float(), size, stride=1, padding=size // 2, count_include_pad=True
    )
    return pooled[:, 0]


def peak_positions(maps: Tensor) -> Tensor:
    """``(B, 2)`` int64 (row, column) of each map's maximum (first in row-major order)."""
    flat = maps.flatten(1).argmax(dim=1)
    width = maps.shape[-1]
    return torch.stack([flat // width, flat % width], dim=1)


def square_box(
    centre_y: int, centre_x: int, size: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """The ``size`` x ``size`` square centred at (``centre_y``, ``centre_x``), moved inside.

    Returns ``(y1, y2, x1, x2)`` (rows ``y1:y2``, columns ``x1:x2``): the top-left corner is
    the centre minus ``size // 2``, clamped so that the whole square lies in the
    ``height`` x ``width`` image (it keeps its size). Raises ``ValueError`` when the square
    does not fit in the image.
    """
    if not 1 <= size <= min(height, width):
        raise ValueError(
            f"block size {size} px does not fit in a {height}x{width} image: use 1 to "
            f"{min(height, width)} px"
        )
    y1 = min(max(centre_y - size // 2, 0), height - size)
    x1 = min(max(centre_x - size // 2, 0), width - size)
    return y1, y1 + size, x1, x1 + size


def block_squares(
    images: Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Normalised ``images`` (B, C, H, W) with each image's box black in pixel space.

    Black (pixel value 0) normalised is ``-mean / std`` per channel. Returns a new tensor.
    """
    black = (-torch.tensor(mean) / torch.tensor(std)).to(images).view(-1, 1, 1)
    blocked = images.clone()
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        blocked[i, :, y1:y2, x1:x2] = black
    return blocked


def block_at_peaks(
    classifier: nn.Module,
    vit: nn.Module,
    images: Tensor,
    block_size: int,
    filter_size: int,
    rollout: str = "gradient",
    discard_ratio: float = 0.9,
    column_quirk: bool = False,
) -> tuple[Tensor, Tensor, list[tuple[int, int, int, int]]]:
    """Block each image's most attended square; ``images`` normalised (B, 3, H, W).

    Returns ``(logits_before, logits_after, boxes)``: the classifier's logits (B, C) of the
    images and of the blocked images, and the blocked boxes ``(y1, y2, x1, x2)``. Raises
    ``ValueError`` when ``block_size`` does not fit in the image.
    """
    height, width = images.shape[-2:]
    square_box(0, 0, block_size, height, width)  # the size check, before any forward pass
    maps, before = rollout_maps(classifier, vit, images, rollout, discard_ratio, column_quirk)
    peaks = peak_positions(box_filter(maps, filter_size)).tolist()
    boxes = [square_box(y, x, block_size, height, width) for y, x in peaks]
    was_training = classifier.training
    classifier.eval()
    with torch.no_grad():
        after = classifier(block_squares(images, boxes))
    classifier.train(was_training)
    return before, after, boxes
