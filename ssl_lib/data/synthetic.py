"""A procedurally generated image dataset: the embedded default (no download).

Each class is a texture pattern (stripes, checkerboard, dots, rings, ...). Every image draws its
class's pattern in a colour pair taken from a small palette shared by all classes, with a random
period and phase and pixel noise. Colour is the dominant nuisance: a randomly initialised
network mostly sees colour and does little better than chance, while colour says nothing about
the class. Features invariant to what the augmentations vary (crops change period and phase,
colour jitter and grayscale change colour) leave the texture, which separates the classes. The
patterns are chosen so that no class is the mirror image of another (horizontal flips keep every
class).
Images are a pure function of ``(seed, index)``: deterministic and worker-safe.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

PATTERNS = (
    "h_stripes",
    "v_stripes",
    "checker",
    "diamonds",
    "dots",
    "grid",
    "rings",
    "waves",
    "bricks",
    "blotches",
)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, p: float, rng: np.random.Generator):
    """Binary pattern over pixel coordinates ``u`` (x) and ``v`` (y) with period ``p``."""
    two_pi = 2 * np.pi
    if kind == "h_stripes":
        return np.sin(two_pi * v / p) > 0
    if kind == "v_stripes":
        return np.sin(two_pi * u / p) > 0
    if kind == "checker":
        return np.sin(two_pi * u / p) * np.sin(two_pi * v / p) > 0
    if kind == "diamonds":
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return np.sin(two_pi * a / p) * np.sin(two_pi * b / p) > 0
    if kind == "dots":
        return (np.mod(u, p) - p / 2) ** 2 + (np.mod(v, p) - p / 2) ** 2 < (0.3 * p) ** 2
    if kind == "grid":
        return (np.mod(u, p) < 0.25 * p) | (np.mod(v, p) < 0.25 * p)
    if kind == "rings":
        cx, cy = rng.uniform(-0.5, 1.5, 2) * u.shape[0]
        return np.sin(two_pi * np.hypot(u - cx, v - cy) / p) > 0
    if kind == "waves":
        return np.sin(two_pi * (v + 0.35 * p * np.sin(two_pi * u / (1.5 * p))) / p) > 0
    if kind == "bricks":
        row = np.floor(v / p)
        shift = np.where(np.mod(row, 2) == 0, 0.0, p)
        return (np.mod(v, p) < 0.2 * p) | (np.mod(u + shift, 2 * p) < 0.2 * p)
    if kind == "blotches":
        cells = max(2, int(round(u.shape[0] / p)))
        low = rng.normal(size=(cells + 1, cells + 1))
        img = Image.fromarray(low.astype(np.float32), mode="F").resize(u.shape[::-1], Image.BICUBIC)
        arr = np.asarray(img)
        return arr > np.median(arr)
    raise ValueError(f"unknown pattern '{kind}'")


# Colour pairs shared by every class: colour tells which group an image belongs to, but not
# which instance or which class, as in natural images where many objects share colours.
PALETTE = (
    ((230, 60, 50), (40, 40, 120)),
    ((250, 220, 60), (30, 110, 40)),
    ((70, 170, 230), (120, 30, 60)),
    ((240, 240, 240), (60, 60, 60)),
    ((230, 120, 200), (20, 80, 80)),
    ((140, 220, 120), (90, 40, 140)),
    ((250, 150, 40), (30, 60, 160)),
    ((180, 180, 90), (100, 20, 20)),
)


def render_pattern(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one sample of class ``kind`` at ``size`` x ``size`` pixels."""
    period = rng.uniform(0.15, 0.3) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0, period, 2)[:, None, None]
    mask = _pattern(kind, x, y, period, rng)
    pair = np.asarray(PALETTE[rng.integers(len(PALETTE))], dtype=np.float64)
    if rng.random() < 0.5:
        pair = pair[::-1]
    c0, c1 = pair + rng.normal(0, 12, (2, 3))
    img = np.where(mask[..., None], c1, c0) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


class SyntheticPatterns(Dataset):
    """``num_samples`` images of ``num_classes`` texture classes; item ``i`` is ``(image, label)``.

    Labels are balanced (``i % num_classes``); the image depends only on ``(seed, i)``.
    """

    def __init__(
        self, num_samples: int = 2000, num_classes: int = 10, image_size: int = 32, seed: int = 0
    ) -> None:
        if not 2 <= num_classes <= len(PATTERNS):
            raise ValueError(
                f"synthetic num_classes must be in 2..{len(PATTERNS)}, got {num_classes}"
            )
        if num_samples < 1:
            raise ValueError(f"synthetic num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.classes = list(PATTERNS[:num_classes])
        self.targets = [i % num_classes for i in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, index])
        return render_pattern(self.classes[label], self.image_size, rng), label
