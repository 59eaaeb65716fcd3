"""The ``ssl-lib poison make`` recipe schema and its loader.

Loaded like every recipe (``base:`` inheritance, ``key=value`` overrides, unknown keys, wrong
types and values out of range refused naming the file and the key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ssl_lib.config import _layers, resolve_recipe
from ssl_lib.schema import PoisonSpec, Section, merge_layers


@dataclass
class PoisonDataConfig(Section):
    """The clean data to poison: ImageNet-layout folders ``train_root`` and ``val_root``
    (``val_root`` may be ``null``: no patched validation set). ``image_size``: side of the
    patched validation images, after the evaluation geometry (Resize ``size / 0.875`` +
    CenterCrop ``size``; a plain resize + crop at 64 px and below), which they are saved at."""

    train_root: str | None = None
    val_root: str | None = None
    image_size: int = 224
    max_image_pixels: int | None = 89_478_485


@dataclass
class PoisonConfig(Section):
    """A ``poison make`` recipe; ``output``: the folder written (a free name beside it if it
    exists: ``out_1``, ...)."""

    data: PoisonDataConfig = field(default_factory=PoisonDataConfig)
    poison: PoisonSpec = field(default_factory=PoisonSpec)
    output: str = "poison"


def load_poison_config(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a ``poison make`` recipe (path or shipped name such as ``poison/cifar10_targeted``)."""
    return merge_layers(PoisonConfig(), _layers(resolve_recipe(recipe)), overrides)
