"""View pipelines by name: weak, strong (MoCo v2 aug+), BYOL views 1/2, Barlow Twins views A/B,
the evaluation transform and the linear-probe training crops; each at any size (224 px for
ImageNet, 32 px for CIFAR).

At 64 px and below Gaussian blur is disabled (it destroys 32 px images; the CIFAR recipes of
the peer libraries do the same) and the evaluation transform does not resize.

The random pipelines are :class:`ViewPipeline` objects over the
:class:`~ssl_lib.data.augment.ViewSpec` of their name; ``data.augment_on`` chooses where
their photometric part runs (see docs/data_pipeline.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from ssl_lib.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE,
    SPECS,
    ViewSpec,
    draw_view,
    geometric,
    photometric_pil,
    pil_as_tensor,
    spec_for_size,
)
from ssl_lib.registry import Registry

__all__ = ["AUGMENT_ON", "VIEWS", "MultiView", "ViewPipeline"]

AUGMENT_ON = ("workers", "device")

VIEWS: Registry[Callable[[int], Callable]] = Registry("view pipeline")


class ViewPipeline:
    """One random view at ``size`` x ``size`` px, its parameters drawn from ``rng``; without
    one, from a ``random.Random`` seeded from the global torch RNG, which torchvision's
    transforms read too (so ``seed_everything`` and the loader's worker seeding still make runs
    repeatable).

    ``augment_on="workers"``: the whole view of a PIL image, float32 ``(3, size, size)``
    normalised. ``augment_on="device"``: the geometric part only, of a PIL image or a uint8
    ``(3, H, W)`` tensor, as ``{"image": uint8 (3, size, size), "params": float32
    (NUM_PARAMS,)}`` (:meth:`~ssl_lib.data.augment.ViewDraw.photometric`), which
    :func:`~ssl_lib.data.augment.photometric_batch` finishes on the training device.
    """

    def __init__(self, spec: ViewSpec, size: int, augment_on: str = "workers") -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got '{augment_on}'")
        self.spec = spec_for_size(spec, size)
        self.size = size
        self.augment_on = augment_on

    def __call__(self, img: Image.Image | torch.Tensor, rng: random.Random | None = None):
        rng = rng or random.Random(int(torch.randint(1 << 62, ())))
        if self.augment_on == "workers":
            draw = draw_view(self.spec, rng, *img.size)
            return photometric_pil(geometric(img, draw, self.size), draw)
        pixels = img if isinstance(img, torch.Tensor) else pil_as_tensor(img)
        draw = draw_view(self.spec, rng, pixels.shape[-1], pixels.shape[-2])
        return {"image": geometric(pixels, draw, self.size), "params": draw.photometric()}


def _register(name: str) -> None:
    def build(size: int, augment_on: str = "workers") -> ViewPipeline:
        return ViewPipeline(SPECS[name], size, augment_on)

    VIEWS.register(name)(build)


for _name in SPECS:
    _register(_name)


@VIEWS.register("eval")
def eval_transform(size: int, augment_on: str = "workers") -> v2.Compose:
    """Resize (size / 0.875) + centre crop; at 64 px and below a plain resize + centre crop.

    Deterministic: ``augment_on`` is accepted for a uniform signature and changes nothing.
    """
    resize = size if size <= SMALL_IMAGE else round(size / 0.875)
    return v2.Compose(
        [
            v2.Resize(resize),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class MultiView:
    """Applies each pipeline to the same image, returning the list of views."""

    def __init__(self, names: list[str], size: int, augment_on: str = "workers") -> None:
        self.names = list(names)
        self.augment_on = augment_on
        self.transforms = [VIEWS.get(n)(size, augment_on) for n in names]

    def __call__(self, img, seeds: list[int] | None = None) -> list:
        """The views of ``img``; with ``seeds``, view ``v`` draws its parameters from
        ``random.Random(seeds[v])``."""
        if self.augment_on == "device":  # one pixel tensor shared by all views
            img = pil_as_tensor(img)
        if seeds is None:
            return [t(img) for t in self.transforms]
        return [
            t(img, random.Random(seed)) if isinstance(t, ViewPipeline) else t(img)
            for t, seed in zip(self.transforms, seeds, strict=True)
        ]
