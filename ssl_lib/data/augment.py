"""View augmentations with explicit random parameters, drawn per view from one seeded stream,
for ``data.augment_on: device``: the loader workers crop and flip, the training device runs the
photometric part batched.

A view is a :class:`ViewSpec`: a geometric part (random resized crop, horizontal flip) and a
photometric part (colour jitter, grayscale, Gaussian blur, solarisation, normalisation), the
same augmentations as the pipeline of the same name in :mod:`ssl_lib.data.transforms`.
:func:`draw_view` draws every random parameter of one view from a ``random.Random`` seeded from
``(run seed, epoch, index, view)``, so a view is a pure function of those numbers, in any worker
and after a resume, and no process-wide generator is touched.

The parameters follow torchvision's own sampling exactly (``RandomResizedCrop.get_params``,
``ColorJitter``: factors ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h], a random order of the four
adjustments per image; ``RandomApply`` / ``RandomGrayscale`` / ``RandomHorizontalFlip``
Bernoulli draws). They are redrawn here rather than through torchvision because its samplers
take no generator: they read the global torch RNG. The geometric ops are torchvision's
functional ones; the photometric ones kornia's ``kornia.enhance`` / ``kornia.filters`` ones
(batched, per-sample factors), which compute the formulas of torchvision's per-image ops that
the ``workers`` pipelines run: multiplicative brightness, blends with the grayscale mean
(contrast) and the grayscale image (saturation), a hue shift in HSV, ITU-R 601 luma,
solarisation at 128/255.

Moving the flip before the photometric ops (the MoCo order has it after the blur) changes no
distribution: every photometric op here commutes with a horizontal flip.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import kornia
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE = 64  # at this size and below Gaussian blur is off (it destroys 32 px images)
SOLARIZE_THRESHOLD = 128  # of 255: PIL's ImageOps.solarize default, as BYOL's 0.5
NO_ORDER = (0, 1, 2, 3)  # brightness, contrast, saturation, hue
# columns of ViewDraw.photometric()
JITTER, ORDER, FACTORS, GRAY, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
NUM_PARAMS = 13


@dataclass(frozen=True)
class ViewSpec:
    """The random augmentations of one view pipeline (probabilities in [0, 1]).

    ``scale`` / ``ratio``: random resized crop area fraction and aspect-ratio range (torchvision
    defaults ``ratio = (3/4, 4/3)``). ``jitter``: (brightness, contrast, saturation, hue)
    strengths of ``ColorJitter``, applied with probability ``jitter_p``. ``blur_sigma``: the
    Gaussian blur's sigma range in pixels (PIL ``GaussianBlur(radius=sigma)``, as the MoCo v2
    and lightly code use), applied with ``blur_p`` (forced to 0 at ``SMALL_IMAGE`` px and below).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


@dataclass
class ViewDraw:
    """One view's drawn parameters: the crop box ``(top, left, height, width)`` in pixels of the
    source image, the flip, and the photometric parameters (factors in torchvision's units:
    brightness / contrast / saturation multipliers, hue in turns of the colour wheel)."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter: bool = False
    order: tuple[int, int, int, int] = NO_ORDER
    factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    gray: bool = False
    blur: bool = False
    sigma: float = 0.0
    solarize: bool = False

    def photometric(self) -> Tensor:
        """The photometric parameters as one float32 vector of ``NUM_PARAMS`` values (what a
        loader worker sends to the device): 0/1 flags at ``JITTER``, ``GRAY``, ``BLUR``,
        ``SOLARIZE``, the jitter order at ``ORDER``, its factors at ``FACTORS``, the blur's
        sigma at ``SIGMA``. One tensor per view keeps the worker's cost per sample low."""
        return torch.tensor(
            [
                self.jitter,
                *self.order,
                *self.factors,
                self.gray,
                self.blur,
                self.sigma,
                self.solarize,
            ],
            dtype=torch.float32,
        )


def crop_box(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random resized crop: torchvision's
    ``RandomResizedCrop.get_params`` algorithm (10 tries of area ~ U[scale] x image area and
    log-aspect ~ U[log ratio], then the central crop of the clamped aspect ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(spec: ViewSpec, rng: random.Random, width: int, height: int) -> ViewDraw:
    """All random parameters of one view of a ``width`` x ``height`` image, from ``rng``."""
    draw = ViewDraw(
        crop_box(rng, width, height, spec.scale, spec.ratio), rng.random() < spec.flip_p
    )
    if spec.jitter_p and rng.random() < spec.jitter_p:
        b, c, s, h = spec.jitter
        order = list(NO_ORDER)
        rng.shuffle(order)
        draw.jitter = True
        draw.order = tuple(order)  # type: ignore[assignment]
        draw.factors = (
            rng.uniform(max(0.0, 1 - b), 1 + b),
            rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s),
            rng.uniform(-h, h),
        )
    draw.gray = rng.random() < spec.gray_p
    if spec.blur_p and rng.random() < spec.blur_p:
        draw.blur = True
        draw.sigma = rng.uniform(*spec.blur_sigma)
    draw.solarize = bool(spec.solarize_p) and rng.random() < spec.solarize_p
    return draw


def geometric(img: Image.Image | Tensor, draw: ViewDraw, size: int) -> Image.Image | Tensor:
    """Crop ``draw.box`` of ``img``, resize it to ``size`` x ``size`` (bilinear, antialiased, as
    ``RandomResizedCrop``) and flip it if ``draw.flip``.

    ``img``: a PIL image, or a uint8 tensor ``(3, H, W)``; for a tensor the result is a
    contiguous uint8 tensor ``(3, size, size)``. torch's antialiased uint8 resize is about 3x
    faster than PIL's and matches it within one grey level (torchvision's documented tolerance).
    """
    out = F.resized_crop(img, *draw.box, [size, size], antialias=True)
    out = F.horizontal_flip(out) if draw.flip else out
    return out.contiguous() if isinstance(out, Tensor) else out


def pil_as_tensor(img: Image.Image) -> Tensor:
    """An RGB PIL image as a uint8 ``(3, H, W)`` tensor sharing its pixels (no copy: a
    channels-last view of the pixel array, which torch's resize reads fastest). Read-only."""
    with warnings.catch_warnings():  # the array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def normalize(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float images ``(..., 3, H, W)`` to float32 normalised with the ImageNet
    mean and std."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return F.normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def _adjust_hue(images: Tensor, turns: Tensor) -> Tensor:
    return kornia.enhance.adjust_hue(images, turns * (2 * math.pi))


_BATCH_JITTER = (
    kornia.enhance.adjust_brightness_accumulative,
    kornia.enhance.adjust_contrast_with_mean_subtraction,
    kornia.enhance.adjust_saturation_with_gray_subtraction,
    _adjust_hue,
)


def blur_kernel_size(spec: ViewSpec) -> int:
    """Odd kernel width covering +-3 of the largest sigma."""
    return 2 * math.ceil(3 * spec.blur_sigma[1]) + 1


@torch.no_grad()
def photometric_batch(images: Tensor, params: Tensor, spec: ViewSpec) -> Tensor:
    """The photometric part on a batch, each image with its own parameters, then normalisation.

    ``images``: uint8 ``(B, 3, H, W)``; ``params``: float32 ``(B, NUM_PARAMS)``, the rows of
    :meth:`ViewDraw.photometric` (any device; moved to the images'). Returns float32
    ``(B, 3, H, W)``. Each adjustment runs only on the images that draw it, in each image's own
    jitter order (kornia's ``ColorJitter`` uses one order per batch, torchvision one per image,
    so kornia's functional ops are called here with the per-image order). Values are clamped to
    [0, 1] after every step, as the uint8 per-image ops saturate. The blur is a true Gaussian of
    the drawn sigma (kernel +-3 sigma) where the per-image pipeline uses PIL's box-filter
    approximation of it.
    """
    # Which images draw which op is decided on a host copy of the parameters: one transfer per
    # view instead of a device sync for every nonzero() of the loops below.
    host = params.detach().cpu()
    params = params.to(images.device)
    x = images.float().div_(255)

    def rows_where(mask: Tensor) -> Tensor | None:
        rows = torch.nonzero(mask).flatten()
        return rows.to(images.device, non_blocking=True) if rows.numel() else None

    jitter = host[:, JITTER] > 0
    order = host[:, ORDER].long()
    factors = params[:, FACTORS]
    for position in range(4):
        for op, adjust in enumerate(_BATCH_JITTER):
            rows = rows_where(jitter & (order[:, position] == op))
            if rows is not None:
                x[rows] = adjust(x[rows], factors[rows, op].to(x.dtype)).clamp_(0, 1)
    rows = rows_where(host[:, GRAY] > 0)
    if rows is not None:
        x[rows] = kornia.color.rgb_to_grayscale(x[rows]).expand(-1, 3, -1, -1)
    rows = rows_where(host[:, BLUR] > 0)
    if rows is not None:
        sigma = params[rows, SIGMA].to(x.dtype)[:, None].expand(-1, 2)
        k = blur_kernel_size(spec)
        x[rows] = kornia.filters.gaussian_blur2d(x[rows], (k, k), sigma).clamp_(0, 1)
    rows = rows_where(host[:, SOLARIZE] > 0)
    if rows is not None:
        sub = x[rows]
        x[rows] = torch.where(sub >= SOLARIZE_THRESHOLD / 255, 1 - sub, sub)
    return normalize(x)


def spec_for_size(spec: ViewSpec, size: int) -> ViewSpec:
    """``spec`` at ``size`` px: without blur at ``SMALL_IMAGE`` px and below."""
    if size > SMALL_IMAGE or not spec.blur_p:
        return spec
    return ViewSpec(**{**spec.__dict__, "blur_p": 0.0})


#: The view pipelines of the papers, by name (see docs/data_pipeline.md).
SPECS: dict[str, ViewSpec] = {
    # UMBC / MSF aug_weak: crop 0.2-1, flip
    "weak": ViewSpec(scale=(0.2, 1.0)),
    # MoCo v2 aug+ (He et al. 2020; Chen et al. 2020, "Improved baselines", sec. 3)
    "strong": ViewSpec(
        scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5
    ),
    # BYOL (Grill et al. 2020, appendix B, table 6), views 1 and 2
    "byol1": ViewSpec(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=1.0),
    "byol2": ViewSpec(
        jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2
    ),
    # linear-probe training crops: crop 0.08-1, flip
    "probe": ViewSpec(),
}
SPECS["bt_a"] = SPECS["byol1"]  # Barlow Twins uses BYOL's two pipelines (Zbontar et al. 2021)
SPECS["bt_b"] = SPECS["byol2"]
