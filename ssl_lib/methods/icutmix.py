"""i-CutMix: CutMix of the query images, with the contrastive target mixed in the same ratio.

PatchSearch (Tejankar et al., CVPR 2023, arXiv 2304.01482) retrains on the filtered set with
i-CutMix (after i-Mix, Lee et al., ICLR 2021) because pasting a box of another image over a
possible trigger weakens what a left-over poison can teach. For the whole batch: one mixing ratio
``lam ~ Beta(alpha, alpha)``, folded to ``lam = max(lam, 1 - lam)``; one box of area about
``(1 - lam)`` of the image, centred at a uniformly random pixel and clipped to the image; the box
is cut from a permuted batch partner, and ``lam`` is recomputed from the clipped box. The loss
is then ``lam * loss(own target) + (1 - lam) * loss(partner's target)``, the targets coming from
the other, unmixed view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_lib.schema import Section, require

__all__ = ["ICutMixConfig", "apply_box", "cutmix_box", "icutmix"]


@dataclass
class ICutMixConfig(Section):
    """``alpha``: the Beta(alpha, alpha) parameter of the mixing ratio (PatchSearch: 1.0)."""

    alpha: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def cutmix_box(
    lam: float, height: int, width: int, centre_y: int, centre_x: int
) -> tuple[tuple[int, int, int, int], float]:
    """The CutMix box for ratio ``lam`` centred at pixel ``(centre_y, centre_x)``, clipped.

    The unclipped box has sides ``int(height * sqrt(1 - lam))`` x ``int(width * sqrt(1 - lam))``
    (area about ``1 - lam``; Yun et al., ICCV 2019, Sec. 3.1), its corners are the centre minus
    and plus half of each side (floor), clipped to the image.

    Returns ``((y1, y2, x1, x2), lam)``: the rows ``y1:y2`` and columns ``x1:x2`` taken from the
    partner, and the ratio recomputed as ``1 - box area / image area`` (the share of the own
    image that is left).
    """
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    y1, y2 = max(centre_y - half_h, 0), min(centre_y + half_h, height)
    x1, x2 = max(centre_x - half_w, 0), min(centre_x + half_w, width)
    return (y1, y2, x1, x2), 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def apply_box(images: Tensor, partner: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """``images`` (B, C, H, W) with the pixels of ``box`` (y1, y2, x1, x2) replaced by those of
    ``images[partner]`` (``partner``: a (B,) permutation); a new tensor."""
    y1, y2, x1, x2 = box
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = images[partner, :, y1:y2, x1:x2]
    return mixed


def icutmix(images: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """Mix a batch ``images`` (B, C, H, W) by i-CutMix with Beta(``alpha``, ``alpha``) ratios.

    Draws (from torch's global generator, so runs are seeded and resumable) one ratio, one box
    centre and one partner permutation for the batch. Returns ``(mixed, partner, lam)``:
    ``mixed[i]`` is ``images[i]`` with the box cut from ``images[partner[i]]``, and ``lam`` is
    the share of its own pixels; the loss weighs the own target by ``lam`` and the partner's
    target by ``1 - lam``.
    """
    batch, _, height, width = images.shape
    ratio = torch.distributions.Beta(alpha, alpha).sample().item()
    ratio = max(ratio, 1.0 - ratio)
    centre_y = int(torch.randint(height, ()).item())
    centre_x = int(torch.randint(width, ()).item())
    box, lam = cutmix_box(ratio, height, width, centre_y, centre_x)
    partner = torch.randperm(batch, device=images.device)
    return apply_box(images, partner, box), partner, lam
