"""The defence recipe schema (``ssl-lib defend patchsearch|filter``), with its checks.

Loaded like an evaluation recipe (``ssl_lib.config.load_defend_config``): inheritance,
overrides and errors that name the file and the key. Defaults are the values of PatchSearch's
code and paper (Tejankar et al., CVPR 2023, Sec. 3-4) on ImageNet-100 at 224 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import DictConfig

from ssl_lib.schema import Layer, Section, merge_layers, require


@dataclass
class DefendDataConfig(Section):
    """The training images searched for poisons.

    ``dataset``: ``image_folder`` (``root/<class>/<image>``), ``file_list`` (``file_list``
    lines ``path [label]`` under ``root``; absolute paths are read as they are) or ``null``:
    the data the checkpoint was trained on (its recipe's ``data`` section), which must then be
    an image folder or a file list. ``image_size``: ``null`` = the checkpoint's; another size
    is refused. Images are resized and centre-cropped as for evaluation (``eval`` view).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"dataset": ("image_folder", "file_list")}

    dataset: str | None = None
    root: str | None = None
    file_list: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    num_workers: int = 4
    max_image_pixels: int | None = 89_478_485


@dataclass
class PatchSearchConfig(Section):
    """The iterative search (PatchSearch Sec. 3.2; code defaults).

    ``num_clusters`` k-means clusters (faiss, ``kmeans_iters`` iterations) of the L2-normalised
    centre-crop features; ``test_images``: images nearest to their centroids used to score a
    candidate (``null`` = one per cluster); ``window``: side of the cut-out patch in pixels at
    224 px, scaled by ``image_size / 224``; ``samples_per_iteration`` unscored members of each
    remaining cluster are scored per round, then the ``remove_fraction`` least poisonous
    clusters (at least one) are dropped. ``batch_size``: pasted images per forward pass.
    ``top_patches``: number of best-scored windows saved. ``device``: ``auto`` = CUDA when
    available.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"kmeans_backend": ("faiss", "torch", "auto")}

    num_clusters: int = 1000
    kmeans_iters: int = 20
    kmeans_backend: str = "faiss"
    test_images: int | None = None
    window: int = 60
    samples_per_iteration: int = 2
    remove_fraction: float = 0.25
    batch_size: int = 256
    top_patches: int = 100
    device: str = "auto"
    progress_bar: bool = True
    seed: int = 0

    def check(self) -> None:
        super().check()
        for key in (
            "num_clusters",
            "kmeans_iters",
            "window",
            "samples_per_iteration",
            "batch_size",
            "top_patches",
        ):
            value = getattr(self, key)
            require(value >= 1, key, f"must be >= 1, got {value}")
        require(
            self.test_images is None or self.test_images >= 1,
            "test_images",
            f"must be >= 1 or null (one per cluster), got {self.test_images}",
        )
        require(
            0 < self.remove_fraction < 1,
            "remove_fraction",
            f"must lie in (0, 1), got {self.remove_fraction}",
        )


@dataclass
class FilterConfig(Section):
    """The poison classifier ensemble (PatchSearch Sec. 3.3; code defaults).

    ``ensemble`` ResNets with one BasicBlock per stage, 2-way, from scratch. Training images:
    all but the ``top_p`` best-scored fraction and the ``val_size`` lowest-scored ones; each
    sample is, with probability 1/2, a positive with one of the ``topk_patches`` best patches
    pasted (side uniform in ``patch_side`` pixels at 224 px, at least ``border`` pixels from
    the edges, both scaled by ``image_size / 224``). Validation: the ``val_size`` best-scored
    images (positives) and the ``val_size`` lowest-scored ones (negatives); F1 every
    ``eval_every`` iterations, stop once ``round(100 F1)`` is unchanged for ``patience``
    evaluations. SGD with cosine decay over ``iterations``.
    """

    ensemble: int = 5
    topk_patches: int = 20
    top_p: float = 0.10
    val_size: int = 20
    patch_side: list[int] = field(default_factory=lambda: [20, 80])
    border: int = 10
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    iterations: int = 2000
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_every: int = 20
    patience: int = 10
    seed: int = 0

    def check(self) -> None:
        super().check()
        for key in (
            "ensemble",
            "topk_patches",
            "val_size",
            "iterations",
            "batch_size",
            "eval_every",
            "patience",
        ):
            value = getattr(self, key)
            require(value >= 1, key, f"must be >= 1, got {value}")
        require(0 <= self.top_p < 1, "top_p", f"must lie in [0, 1), got {self.top_p}")
        lo, hi = (list(self.patch_side) + [0, 0])[:2]
        require(
            len(self.patch_side) == 2 and 1 <= lo < hi,
            "patch_side",
            f"must be [min, max) with 1 <= min < max, got {list(self.patch_side)}",
        )


@dataclass
class DefendConfig(Section):
    """A defence recipe.

    ``manifest``: the ground truth, the output folder of ``ssl-lib poison make`` or its
    ``manifest.json`` (``null``: none; the metrics are then left out). ``output``: the
    results folder (``null`` = ``<run folder>/defend/patchsearch_<checkpoint>``; a numbered
    name if it exists).
    """

    data: DefendDataConfig = field(default_factory=DefendDataConfig)
    patchsearch: PatchSearchConfig = field(default_factory=PatchSearchConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    manifest: str | None = None
    output: str | None = None


def build_defend_config(layers: Sequence[Layer], overrides: Sequence[str] = ()) -> DictConfig:
    """Validate and merge raw defence layers (and overrides) into one ``DefendConfig``."""
    return merge_layers(DefendConfig(), layers, overrides)
