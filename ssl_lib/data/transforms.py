"""View pipelines by name: weak, strong (MoCo v2 aug+), BYOL views 1/2, Barlow Twins views A/B,
the evaluation transform and the linear-probe training crops; each at any size (224 px for
ImageNet, 32 px for CIFAR).

At 64 px and below Gaussian blur is disabled (it destroys 32 px images; the CIFAR recipes of
the peer libraries do the same) and the evaluation transform does not resize.

``data.augment_on`` chooses where the views are made (see docs/data_pipeline.md): ``workers``
runs these torchvision / lightly pipelines per image; ``device`` runs a
:class:`ViewPipeline` over the same augmentations' :class:`~ssl_lib.data.augment.ViewSpec`,
whose photometric part finishes batched on the training device.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from ssl_lib.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE,
    SPECS,
    ViewSpec,
    draw_view,
    geometric,
    pil_as_tensor,
    spec_for_size,
)
from ssl_lib.data.sampling import seeded_rng
from ssl_lib.registry import Registry

__all__ = ["AUGMENT_ON", "VIEWS", "MultiView", "ViewPipeline"]

AUGMENT_ON = ("workers", "device")

VIEWS: Registry[Callable[[int], Callable]] = Registry("view pipeline")
#: pipelines whose transforms read numpy's global generator (lightly's blur and solarisation)
USES_NUMPY = {"byol1", "byol2", "bt_a", "bt_b"}


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U[lo, hi] applied as PIL's radius (the MoCo v2 / UMBC code)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img):
        s = torch.empty(1).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def _finish() -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


@VIEWS.register("weak")
def weak(size: int) -> v2.Compose:
    """Random resized crop (scale 0.2-1) and horizontal flip (UMBC ``aug_weak``)."""
    return v2.Compose(
        [v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(), *_finish()]
    )


@VIEWS.register("strong")
def strong(size: int) -> v2.Compose:
    """MoCo v2 aug+: crop 0.2-1, jitter(0.4,0.4,0.4,0.1) p=0.8, gray p=0.2, blur p=0.5, flip.

    The flip comes after the blur, as in the MoCo / UMBC code.
    """
    ops: list = [
        v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if size > SMALL_IMAGE:
        ops.append(v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5))
    ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _finish())


def _byol_kwargs(size: int) -> dict:
    kwargs: dict = {"input_size": size, "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    if size <= SMALL_IMAGE:
        kwargs["gaussian_blur"] = 0.0
    return kwargs


# lightly's BYOL views equal the BYOL paper's (crop 0.08-1, flip, jitter 0.4/0.4/0.2/0.1 at
# p=0.8, gray 0.2, blur p=1.0 / 0.1, solarize p=0.0 / 0.2), so they are reused. Barlow Twins
# uses exactly the same two pipelines (its views A and B).
@VIEWS.register("byol1")
def byol1(size: int) -> BYOLView1Transform:
    """BYOL view 1 (blur always, no solarisation)."""
    return BYOLView1Transform(**_byol_kwargs(size))


@VIEWS.register("byol2")
def byol2(size: int) -> BYOLView2Transform:
    """BYOL view 2 (blur p=0.1, solarisation p=0.2)."""
    return BYOLView2Transform(**_byol_kwargs(size))


VIEWS.register("bt_a")(byol1)
VIEWS.register("bt_b")(byol2)


def eval_geometry(size: int) -> v2.Compose:
    """The geometry of the evaluation transform alone (PIL image in, PIL image out):
    Resize (size / 0.875) + centre crop; at 64 px and below a plain resize + centre crop."""
    resize = size if size <= SMALL_IMAGE else round(size / 0.875)
    return v2.Compose([v2.Resize(resize), v2.CenterCrop(size)])


def to_normalized_tensor() -> v2.Compose:
    """The evaluation transform without its geometry: tensor in [0, 1], ImageNet-normalised."""
    return v2.Compose(_finish())


@VIEWS.register("eval")
def eval_transform(size: int) -> v2.Compose:
    """Resize (size / 0.875) + centre crop; at 64 px and below a plain resize + centre crop."""
    return v2.Compose([eval_geometry(size), *_finish()])


@VIEWS.register("probe")
def probe_transform(size: int) -> v2.Compose:
    """Linear-probe training crops: random resized crop (scale 0.08-1) and horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *_finish()])


class ViewPipeline:
    """The loader-worker part of one view for ``data.augment_on: device``: all the view's random
    parameters drawn from ``rng`` (without one, from a ``random.Random`` seeded from the global
    torch RNG, which torchvision's transforms read too), then crop, resize and flip.

    Takes a PIL image or a uint8 ``(3, H, W)`` tensor; returns ``{"image": uint8 (3, size,
    size), "params": float32 (NUM_PARAMS,)}`` (:meth:`~ssl_lib.data.augment.ViewDraw.photometric`),
    which :func:`~ssl_lib.data.augment.photometric_batch` finishes on the training device.
    """

    def __init__(self, spec: ViewSpec, size: int) -> None:
        self.spec = spec_for_size(spec, size)
        self.size = size

    def __call__(self, img: Image.Image | torch.Tensor, rng: random.Random | None = None) -> dict:
        rng = rng or random.Random(int(torch.randint(1 << 62, ())))
        pixels = img if isinstance(img, torch.Tensor) else pil_as_tensor(img)
        draw = draw_view(self.spec, rng, pixels.shape[-1], pixels.shape[-2])
        return {"image": geometric(pixels, draw, self.size), "params": draw.photometric()}


class MultiView:
    """Applies each pipeline to the same image, returning the list of views.

    ``augment_on="workers"``: the pipelines of :data:`VIEWS`, float32 ``(3, size, size)``
    views. ``"device"``: a :class:`ViewPipeline` per view (each name must be in
    :data:`~ssl_lib.data.augment.SPECS`).
    """

    def __init__(self, names: list[str], size: int, augment_on: str = "workers") -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got '{augment_on}'")
        self.names = list(names)
        self.augment_on = augment_on
        if augment_on == "device":
            self.transforms: list = [ViewPipeline(SPECS[n], size) for n in names]
        else:
            self.transforms = [VIEWS.get(n)(size) for n in names]

    def __call__(self, img, seeds: list[int] | None = None) -> list:
        """The views of ``img``; with ``seeds``, view ``v`` is drawn under ``seeds[v]``."""
        if self.augment_on == "device":
            pixels = pil_as_tensor(img)  # one pixel tensor shared by all views
            if seeds is None:
                return [t(pixels) for t in self.transforms]
            return [
                t(pixels, random.Random(seed))
                for t, seed in zip(self.transforms, seeds, strict=True)
            ]
        if seeds is None:
            return [t(img) for t in self.transforms]
        views = []
        for name, t, seed in zip(self.names, self.transforms, seeds, strict=True):
            with seeded_rng(seed, numpy=name in USES_NUMPY):
                views.append(t(img))
        return views
