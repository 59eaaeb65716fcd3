"""Patch triggers: the pattern, where it goes in an image, and how it is pasted.

Follows the patch-trigger attack of Saha et al., *Backdoor Attacks on Self-Supervised
Learning*, CVPR 2022 (arXiv 2105.10123): a square (or aspect-kept) trigger pasted
at a uniformly random position inside a central band of the image. Everything here is a pure
function of its arguments (seeded generators), so the same seed gives the same pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from ssl_lib.data.datasets import DataError, load_rgb

Box = tuple[int, int, int, int]  # x, y, w, h in pixels; (x, y) is the top-left corner


def procedural_trigger(width: int, cells: int = 4, seed: int = 0) -> np.ndarray:
    """A ``width`` x ``width`` blurred pattern of random colour patches (uint8, H x W x 3).

    A ``cells`` x ``cells`` grid of colours drawn uniformly from ``seed``, scaled up with
    nearest-neighbour sampling, then blurred by a Gaussian of radius ``width / (4 * cells)``
    pixels: the style of the published triggers (Saha et al.; those images are not
    shipped), not their pixels.
    """
    rng = np.random.default_rng([seed, width, cells])
    grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((width, width), Image.NEAREST)
    img = img.filter(ImageFilter.GaussianBlur(radius=width / (4 * cells)))
    return np.asarray(img, dtype=np.uint8).copy()


def image_trigger(path: str, width: int) -> np.ndarray:
    """The user's trigger image resized to ``width`` pixels wide, aspect kept (uint8 H x W x 3).

    Raises :class:`DataError` when the file cannot be read.
    """
    try:
        img = load_rgb(path)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the trigger image '{path}' (trigger.image): {err}") from None
    height = max(1, round(img.height * width / img.width))
    return np.asarray(img.resize((width, height), Image.BICUBIC), dtype=np.uint8).copy()


def build_trigger(cfg) -> np.ndarray:
    """The trigger of a ``TriggerConfig`` (``trigger.image`` or the procedural pattern)."""
    if cfg.image is not None:
        return image_trigger(cfg.image, cfg.width)
    return procedural_trigger(cfg.width, cfg.cells, cfg.seed)


def trigger_sha256(trigger: np.ndarray) -> str:
    """SHA-256 (hex) of the trigger's shape (``"HxWx3"``, ASCII) followed by its uint8 pixels,
    row-major: an identity that does not depend on how an image file encodes it."""
    head = "x".join(str(n) for n in trigger.shape).encode()
    return hashlib.sha256(
        head + np.ascontiguousarray(trigger, dtype=np.uint8).tobytes()
    ).hexdigest()


def corner_range(side: int, extent: int, band: Sequence[float]) -> tuple[int, int]:
    """The range ``[lo, hi]`` of top-left coordinates along a side of ``side`` pixels for a
    trigger of ``extent`` pixels: ``lo = floor(band[0] * side)``, ``hi = floor(band[1] * side)
    - extent`` (the trigger stays inside the band). ``hi < lo`` means it does not fit."""
    return int(band[0] * side), int(band[1] * side) - extent


def draw_box(
    size: tuple[int, int], trigger_shape: tuple[int, ...], band: Sequence[float], rng
) -> Box | None:
    """A uniformly random box for a trigger of ``trigger_shape`` (H x W x 3) in an image of
    ``size`` (W, H), inside ``band``; ``None`` when it does not fit. ``rng``: a NumPy
    ``Generator`` (x is drawn first, then y)."""
    h, w = trigger_shape[:2]
    x_lo, x_hi = corner_range(size[0], w, band)
    y_lo, y_hi = corner_range(size[1], h, band)
    if x_hi < x_lo or y_hi < y_lo:
        return None
    x = int(rng.integers(x_lo, x_hi + 1))
    y = int(rng.integers(y_lo, y_hi + 1))
    return x, y, w, h


def does_not_fit(where: str, size: tuple[int, int], trigger: np.ndarray, band, key: str) -> str:
    """The one-line message for a trigger that does not fit into an image's band."""
    h, w = trigger.shape[:2]
    return (
        f"the {w} x {h} px trigger does not fit into {where} ({size[0]} x {size[1]} px) inside "
        f"the band {list(band)} ({key}); lower trigger.width or widen the band"
    )


def paste(img: Image.Image, trigger: np.ndarray, box: Box, opacity: float) -> Image.Image:
    """``img`` (RGB) with ``trigger`` blended into ``box``; pixels outside it unchanged.

    Inside the box ``out = round(opacity * trigger + (1 - opacity) * img)`` in float64,
    rounded half to even and stored as uint8; ``opacity = 1`` copies the trigger's pixels.
    (Saha et al.'s code calls ``1 - opacity`` ``alpha``: the base image's weight.)
    """
    x, y, w, h = box
    out = np.array(img.convert("RGB"), dtype=np.uint8)
    region = out[y : y + h, x : x + w].astype(np.float64)
    blended = opacity * trigger.astype(np.float64) + (1.0 - opacity) * region
    out[y : y + h, x : x + w] = np.rint(blended).astype(np.uint8)
    return Image.fromarray(out)
