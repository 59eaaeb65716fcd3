"""The evaluation recipe schema (``ssl-lib eval knn|linear|cluster|backdoor``), with its checks.

Loaded like a training recipe (``ssl_lib.config.load_eval_config``): inheritance, overrides
and errors that name the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import DictConfig

from ssl_lib.schema import Layer, Section, SyntheticConfig, merge_layers, require

FEATURE_SOURCE = re.compile(r"backbone|projector|block:\d+")


@dataclass
class EvalDataConfig(Section):
    """Labelled data of an evaluation.

    ``dataset``: ``image_folder`` (``train_root`` and ``val_root`` hold the same class folders),
    ``cifar10`` / ``cifar100`` (torchvision copy in ``train_root``; its test split is the val
    set), or ``synthetic`` (the embedded textures; its evaluation split is the val set).
    ``labelled_subset``: a file list (``relative/path [label]`` under ``train_root``) that
    replaces the train set, for the 1 % / 10 % semi-supervised evaluations.
    ``max_train_samples`` / ``max_val_samples`` keep a seeded random subset (quick checks).
    ``max_image_pixels``: as ``data.max_image_pixels`` of a training recipe.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "dataset": ("image_folder", "cifar10", "cifar100", "synthetic")
    }

    dataset: str = "image_folder"
    train_root: str | None = None
    val_root: str | None = None
    labelled_subset: str | None = None
    download: bool = False
    image_size: int = 224
    batch_size: int = 256
    num_workers: int = 4
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    max_image_pixels: int | None = 89_478_485
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class FeaturesConfig(Section):
    """What is extracted and where it is cached.

    ``source``: ``backbone`` (the papers' protocols), ``projector`` (backbone + projector) or
    ``block:N`` (output of block N, for methods that offer ``block_features``).
    ``dtype``: storage of the extracted features, ``fp32`` or ``fp16``.
    ``cache_dir``: ``null`` = ``<run folder>/eval/features``. ``device``: ``auto`` = CUDA when
    available.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"dtype": ("fp32", "fp16")}

    source: str = "backbone"
    dtype: str = "fp32"
    cache_dir: str | None = None
    device: str = "auto"
    progress_bar: bool = True

    def check(self) -> None:
        super().check()
        require(
            FEATURE_SOURCE.fullmatch(self.source) is not None,
            "source",
            f"does not accept '{self.source}'. Choose backbone, projector or block:N",
        )


@dataclass
class KNNEvalConfig(Section):
    """kNN classification (``ssl_lib.eval.knn.knn_evaluate``)."""

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"backend": ("auto", "torch", "faiss")}
    VOTES: ClassVar[tuple[str, ...]] = ("majority", "weighted")

    ks: list[int] = field(default_factory=lambda: [1, 20])
    temperatures: list[float] = field(default_factory=lambda: [0.07, 0.1])
    votes: list[str] = field(default_factory=lambda: ["majority"])
    backend: str = "auto"
    seed: int = 0

    def check(self) -> None:
        super().check()
        for vote in self.votes:
            require(
                vote in self.VOTES,
                "votes",
                f"does not accept '{vote}'. Choose from {list(self.VOTES)}",
            )
        require(
            bool(self.ks) and min(self.ks) >= 1,
            "ks",
            f"must be positive integers, got {list(self.ks)}",
        )


@dataclass
class LinearEvalConfig(Section):
    """Linear probe on the frozen backbone (``ssl_lib.eval.linear``).

    ``protocol``: ``umbc`` (L2-normalise + fixed standardisation + linear, augmented crops,
    features recomputed each step), ``moco`` (plain linear on raw features, augmented crops) or
    ``cached`` (UMBC head trained on cached centre-crop features; the learning rate is chosen
    from ``lr_grid`` on a held-out ``val_fraction`` of the train set, then the head is retrained
    on the whole train set). The LR is multiplied by ``gamma`` at each epoch in ``milestones``.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"protocol": ("umbc", "moco", "cached")}

    protocol: str = "cached"
    epochs: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [15, 30])
    gamma: float = 0.1
    batch_size: int = 256
    val_fraction: float = 0.1
    lr_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])
    seed: int = 0

    def check(self) -> None:
        super().check()
        require(
            0 < self.val_fraction < 1,
            "val_fraction",
            f"must lie in (0, 1), got {self.val_fraction}",
        )


@dataclass
class ClusterEvalConfig(Section):
    """Cluster alignment (``ssl_lib.eval.cluster.cluster_alignment``; CompRess, arXiv 2010.14713).

    ``num_clusters``: k-means clusters of the train features (``null`` = the number of
    classes). ``iters``: Lloyd iterations. ``score``: ``precision`` (overlap divided by the
    cluster's size, as CompRess) or ``count`` (the overlap itself) for the one-to-one matching.
    ``backend``: the k-means implementation of ``ssl_lib.memory.kmeans`` (``faiss`` as the
    original, ``torch`` or ``auto``).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "score": ("precision", "count"),
        "backend": ("faiss", "torch", "auto"),
    }

    num_clusters: int | None = None
    iters: int = 20
    score: str = "precision"
    backend: str = "faiss"
    seed: int = 0

    def check(self) -> None:
        super().check()
        require(
            self.num_clusters is None or self.num_clusters >= 1,
            "num_clusters",
            f"must be at least 1 (or null = the number of classes), got {self.num_clusters}",
        )
        require(self.iters >= 1, "iters", f"must be at least 1, got {self.iters}")


@dataclass
class BackdoorEvalConfig(Section):
    """``ssl-lib eval backdoor``: ``manifest`` (the ``poison make`` output folder or its
    ``manifest.json``), ``probe`` (``linear``: the ``linear`` section's protocol; ``knn``: a
    majority vote for each of ``knn.ks``) and how many patched examples the grid shows."""

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"probe": ("linear", "knn")}

    manifest: str | None = None
    probe: str = "linear"
    grid_examples: int = 16

    def check(self) -> None:
        super().check()
        require(self.grid_examples >= 1, "grid_examples", f"must be >= 1, got {self.grid_examples}")


@dataclass
class BlockDefenceConfig(Section):
    """Test-time patch blocking (``ssl-lib defend block``; ``ssl_lib.eval.blocking``).

    ``manifest``: the output folder of ``ssl-lib poison make`` (or its ``manifest.json``):
    its patched val images, their labels and its target. Or else ``patched_root``:
    trigger-pasted val images in class folders (true labels, the same class folders as the
    train set), already at ``data.image_size`` (used without resize or crop), with
    ``target_class``, the attack's target class folder (with a manifest only for an
    untargeted one). ``probe``: a probe file (or the ``ssl-lib eval backdoor`` folder holding
    ``linear_probe.pt``) of the same checkpoint's backbone features (``null``: a
    cached-feature probe is trained on ``data.train_root`` with the ``linear`` settings and
    saved). ``block_size`` / ``filter_size``: side (px) of the blocked
    square and of the box filter (``null``: 30 and 31 at 224 px, scaled with the image size).
    ``rollout``: ``gradient`` (attention-gradient rollout) or ``plain``; ``discard_ratio``:
    share of the lowest attention entries zeroed per block; ``column_quirk``: the column-wise
    normalisation of the published code (see ``ssl_lib.interpret.rollout.gradient_rollout``).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"rollout": ("gradient", "plain")}

    manifest: str | None = None
    patched_root: str | None = None
    target_class: str | None = None
    probe: str | None = None
    block_size: int | None = None
    filter_size: int | None = None
    rollout: str = "gradient"
    discard_ratio: float = 0.9
    column_quirk: bool = False

    def check(self) -> None:
        super().check()
        require(
            0 <= self.discard_ratio < 1,
            "discard_ratio",
            f"must lie in [0, 1), got {self.discard_ratio}",
        )
        if self.block_size is not None:
            require(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        if self.filter_size is not None:
            require(
                self.filter_size >= 1 and self.filter_size % 2 == 1,
                "filter_size",
                f"must be odd and >= 1 (a centred window), got {self.filter_size}",
            )


@dataclass
class EvalConfig(Section):
    """An evaluation recipe; ``output``: the results JSON (``null`` = ``<run>/eval/``)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KNNEvalConfig = field(default_factory=KNNEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    cluster: ClusterEvalConfig = field(default_factory=ClusterEvalConfig)
    backdoor: BackdoorEvalConfig = field(default_factory=BackdoorEvalConfig)
    block: BlockDefenceConfig = field(default_factory=BlockDefenceConfig)
    output: str | None = None


def build_eval_config(layers: Sequence[Layer], overrides: Sequence[str] = ()) -> DictConfig:
    """Validate and merge raw evaluation layers (and overrides) into one ``EvalConfig``."""
    return merge_layers(EvalConfig(), layers, overrides)
