"""The run schema: typed config sections, their checks, and merging layers into them.

Every config section is a dataclass. Merging a layer (a recipe file, a dict, the command-line
overrides) into the structured schema refuses unknown keys and wrong types, naming the layer.
Values of the right type that cannot be used (a name outside the section's choices, a number
out of range, a registry name that does not exist) are refused afterwards by the section's own
:meth:`Section.check`, run by :func:`merge_layers` on the merged config, which names the layer
that set the key. Each method's section lives beside the method (``ssl_lib.methods``) and the
evaluation sections under ``ssl_lib.eval.config``; this module imports neither.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_lib.data.augment import SPECS
from ssl_lib.data.dali import DALI_MISSING, dali_available
from ssl_lib.data.transforms import AUGMENT_ON, VIEWS
from ssl_lib.models.backbones import BACKBONES, image_size_problem
from ssl_lib.models.heads import MLPConfig

Layer = tuple[str, DictConfig]  # (where it comes from, its raw values)
OVERRIDE_SOURCE = "command-line override"


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the source, the key and the fix."""


class InvalidValue(Exception):
    """Raised by :meth:`Section.check`: ``keys[0]`` (relative to the section) has a value the
    section cannot use; ``problem`` completes the sentence ``"<key> <problem>"``. The error
    names the layer that last set any of ``keys`` (the other keys are those the value was
    checked against)."""

    def __init__(self, keys: str | tuple[str, ...], problem: str) -> None:
        super().__init__(problem)
        self.keys = (keys,) if isinstance(keys, str) else keys
        self.problem = problem


def require(ok: bool, keys: str | tuple[str, ...], problem: str) -> None:
    """Raise :class:`InvalidValue` for ``keys`` unless ``ok``."""
    if not ok:
        raise InvalidValue(keys, problem)


def require_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """``value`` of ``key`` must be one of ``allowed`` (the error suggests the closest)."""
    if value is not None and value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise InvalidValue(key, f"does not accept '{value}'.{hint} Choose from {list(allowed)}")


class Section:
    """Base of every config dataclass.

    ``CHOICES`` maps a field to its accepted values; a subclass adds its own (they merge along
    the class hierarchy). Subclasses with more rules override :meth:`check`, call
    ``super().check()`` and raise :class:`InvalidValue` (see :func:`require`).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {}

    def check(self) -> None:
        """Raise :class:`InvalidValue` for a value this section cannot use."""
        for cls in type(self).__mro__:
            for key, allowed in vars(cls).get("CHOICES", {}).items():
                require_choice(key, getattr(self, key), allowed)


# ------------------------------------------------------------------ the run schema
@dataclass
class MethodConfig(Section):
    """Fields every method has; each method extends this with its own hyper-parameters
    (``ssl_lib.methods``)."""

    name: str = "byol"


@dataclass
class RunSection(Section):
    """Where the run folder goes and the global seed."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class SyntheticConfig(Section):
    """The procedurally generated default dataset (see ``ssl_lib.data.synthetic``)."""

    num_samples: int = 2000
    num_classes: int = 10
    seed: int = 0


def _check_band(key: str, band: Sequence[float]) -> None:
    require(
        len(band) == 2 and 0 <= band[0] < band[1] <= 1,
        key,
        f"must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the image side), got {list(band)}",
    )


@dataclass
class TriggerConfig(Section):
    """The patch trigger of a backdoor attack (``ssl_lib.backdoor``; docs/backdoor.md).

    ``image``: the user's trigger image (resized to ``width`` pixels, aspect kept); ``null``:
    a seeded procedural pattern (a ``cells`` x ``cells`` grid of random colours, blurred) drawn
    from ``seed``. ``opacity``: the trigger's weight inside the patch, 1 = it replaces the
    pixels; it is ``1 - alpha`` of Saha et al.'s code, whose ``alpha`` is the base image's
    weight.
    """

    image: str | None = None
    seed: int = 0
    cells: int = 4
    width: int = 50
    opacity: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.width >= 1, "width", f"must be >= 1 pixel, got {self.width}")
        require(self.cells >= 1, "cells", f"must be >= 1, got {self.cells}")
        require(0 < self.opacity <= 1, "opacity", f"must lie in (0, 1], got {self.opacity}")


@dataclass
class PoisonSpec(Section):
    """A patch-trigger poisoning of the training images (``ssl_lib.backdoor``).

    ``targeted``: only images of class ``target`` (a class name or label) are candidates; else
    every image is. ``rate``: the fraction of the candidates that get the trigger, in (0, 1].
    ``train_band`` / ``val_band``: the trigger's top-left corner lies uniformly in
    ``[lo * W, hi * W - width]`` (same for y), on training images at their native size and on
    validation images after Resize + CenterCrop. ``seed`` draws the poisoned images and boxes.
    """

    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    targeted: bool = True
    target: str | None = None
    rate: float = 0.5
    train_band: list[float] = field(default_factory=lambda: [0.25, 0.75])
    val_band: list[float] = field(default_factory=lambda: [0.10, 0.90])
    seed: int = 0

    def check(self) -> None:
        super().check()
        require(0 < self.rate <= 1, "rate", f"must lie in (0, 1], got {self.rate}")
        require(
            self.target is not None or not self.targeted,
            "target",
            "must name the target class (name or label) of a targeted attack, or set "
            "targeted: false",
        )
        _check_band("train_band", self.train_band)
        _check_band("val_band", self.val_band)


@dataclass
class DataConfig(Section):
    """Training data.

    ``dataset``: ``synthetic`` | ``image_folder`` (ImageNet layout, ``root`` = the train folder)
    | ``file_list`` (``file_list`` lines ``relative/path [label]`` under ``root``) | ``cifar10``
    | ``cifar100`` (torchvision; downloads only with ``download: true``).
    ``views``: view pipeline names; for asymmetric methods views[0] goes to the online
    (student / query) network and views[1] to the target (teacher / key) network.
    ``batch_size`` is the global batch, split evenly over all processes.
    ``labelled_subset`` / ``labelled_fraction`` (semi-supervised methods only): which training
    images keep their label, as a file of image paths relative to ``root`` (or bare file names,
    like the SimCLR ImageNet subsets) or as a seeded class-balanced fraction.
    ``max_image_pixels``: image files with more pixels are refused as unreadable (PIL's
    decompression-bomb guard; ``null``: no limit).
    ``extra_roots``: further folders where ``file_list`` looks for a relative path not found
    under ``root`` (absolute paths in a list are used as they are).
    ``poison``: poison the training images on the fly (:class:`PoisonSpec`; docs/backdoor.md).
    ``augment_on``: where the photometric part of the views runs: ``workers`` (per image in the
    loader workers) or ``device`` (batched on the training device; the workers crop and flip);
    see docs/data_pipeline.md.
    ``loader``: who reads, decodes and crops the training images: ``torch`` (DataLoader
    workers) or ``dali`` (NVIDIA DALI, ``pip install ssl_lib[dali]``; image files only, with
    ``augment_on: device``); see docs/data_pipeline.md.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "dataset": ("synthetic", "image_folder", "file_list", "cifar10", "cifar100"),
        "augment_on": AUGMENT_ON,
        "loader": ("torch", "dali"),
    }

    dataset: str = "synthetic"
    root: str | None = None
    file_list: str | None = None
    download: bool = False
    image_size: int = 224
    views: list[str] = field(default_factory=lambda: ["strong", "weak"])
    batch_size: int = 256
    num_workers: int = 4
    max_samples: int | None = None
    skip_corrupt: bool = False
    max_image_pixels: int | None = 89_478_485
    drop_last: bool = True
    labelled_subset: str | None = None
    labelled_fraction: float | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    extra_roots: list[str] = field(default_factory=list)
    poison: PoisonSpec | None = None
    augment_on: str = "workers"
    loader: str = "torch"

    def check(self) -> None:
        super().check()
        for name in self.views:
            require_registered("views", VIEWS, name)
        if self.loader == "dali":
            self._check_dali()

    def _check_dali(self) -> None:
        require(
            self.dataset in ("image_folder", "file_list"),
            ("loader", "dataset"),
            f"dali reads image files: it needs data.dataset image_folder or file_list, not "
            f"'{self.dataset}'",
        )
        require(
            self.augment_on == "device",
            ("loader", "augment_on"),
            "dali crops and flips; the photometric part runs on the device: set "
            "data.augment_on=device",
        )
        require(
            self.poison is None,
            ("loader", "poison"),
            "dali reads the image files as they are: data.poison needs data.loader=torch",
        )
        missing = [name for name in self.views if name not in SPECS]
        require(
            not missing,
            ("loader", "views"),
            f"dali makes only the views {sorted(SPECS)}, not {missing}",
        )
        require(dali_available(), "loader", DALI_MISSING)


@dataclass
class ModelConfig(Section):
    """Backbone name (see ``ssl-lib backbones``) and the MLP heads; ``null`` removes a head."""

    backbone: str = "resnet50"
    projector: MLPConfig | None = field(default_factory=MLPConfig)
    predictor: MLPConfig | None = field(default_factory=MLPConfig)

    def check(self) -> None:
        super().check()
        if not self.backbone.startswith("timm:"):  # timm checks its own names when building
            require_registered("backbone", BACKBONES, self.backbone)


@dataclass
class OptimConfig(Section):
    """Optimiser and learning-rate schedule.

    ``schedule``: ``cosine_epoch`` (UMBC: per-epoch cosine, 1-based, no warm-up),
    ``warmup_cosine`` (per-step linear warm-up then cosine to ``final_lr_ratio`` x lr),
    ``step`` (x ``gamma`` at each epoch in ``milestones``) or ``constant``.
    ``lr_scaling: linear`` multiplies ``lr`` (and ``lr_biases``) by global batch / 256.
    ``exclude_bias_and_norm`` removes weight decay (and LARS adaptation) from 1-D parameters;
    ``lr_biases`` gives those parameters their own learning rate.
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "name": ("sgd", "lars"),
        "schedule": ("cosine_epoch", "warmup_cosine", "step", "constant"),
        "lr_scaling": ("none", "linear"),
    }

    name: str = "sgd"
    lr: float = 0.05
    lr_biases: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    exclude_bias_and_norm: bool = False
    lars_trust_coefficient: float = 0.001
    lr_scaling: str = "none"
    schedule: str = "cosine_epoch"
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.2


@dataclass
class TrainerConfig(Section):
    """Lightning Trainer settings and checkpointing."""

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"nonfinite": ("stop", "skip")}

    max_epochs: int = 200
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    checkpoint_every_n_epochs: int = 10
    checkpoint_every_n_steps: int = 0
    nonfinite: str = "stop"
    limit_train_batches: Any = None
    progress_bar: bool = True
    collective_timeout_s: float = 1800.0
    sigterm_grace_s: float = 60.0

    def check(self) -> None:
        super().check()
        require(
            self.max_epochs >= 1,
            "max_epochs",
            "must be >= 1 (it sets the length of the LR and EMA schedules), got "
            f"{self.max_epochs}; use trainer.max_steps to stop earlier",
        )
        require(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            f"must be -1 (no limit) or >= 1, got {self.max_steps}",
        )
        require(
            self.checkpoint_every_n_steps >= 0,
            "checkpoint_every_n_steps",
            f"must be >= 0 (0 = off), got {self.checkpoint_every_n_steps}",
        )
        for key in ("collective_timeout_s", "sigterm_grace_s"):
            value = getattr(self, key)
            require(value > 0, key, f"must be > 0 seconds, got {value}")


@dataclass
class MonitorConfig(Section):
    """Evaluation during pretraining (``ssl_lib.eval.monitors``); needs labelled data.

    ``knn_every_n_epochs``: kNN accuracy (majority vote over ``knn_k`` neighbours, eval
    transform) of ``knn_val_samples`` images against a bank of ``knn_train_samples`` images,
    every N epochs (0 = off). ``online_linear``: a linear classifier trained on the detached
    backbone features of views[0] with its own optimiser (learning rate ``online_linear_lr``).
    """

    knn_every_n_epochs: int = 0
    knn_train_samples: int = 1000
    knn_val_samples: int = 500
    knn_k: int = 20
    knn_batch_size: int = 256
    online_linear: bool = False
    online_linear_lr: float = 0.1


@dataclass
class RunConfig(Section):
    """The whole training recipe; ``method`` holds the chosen method's own dataclass."""

    run: RunSection = field(default_factory=RunSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self) -> None:
        super().check()
        problem = image_size_problem(self.model.backbone, self.data.image_size)
        require(problem is None, ("data.image_size", "model.backbone"), f"{problem}")


def require_registered(key: str, registry: Any, name: str) -> None:
    """``name`` of ``key`` must be registered in ``registry`` (the error lists the names)."""
    try:
        registry.get(name)
    except KeyError as err:
        raise InvalidValue(key, f"does not accept '{name}': {err.args[0]}") from None


# ------------------------------------------------------------------ merging and checking
def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings as one layer (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.1)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {err}") from None


def _keys_at(schema: DictConfig, dotted: str) -> list[str]:
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _merge_layer(schema: DictConfig, source: str, layer: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "")
        message = str(err).splitlines()[0]
        if "not in" in message and key:
            accepted = _keys_at(schema, key)
            leaf = key.split(".")[-1]
            close = difflib.get_close_matches(leaf, accepted, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{key}'.{hint} Accepted here: {', '.join(accepted)}"
            ) from None
        raise ConfigError(f"{source}: invalid value for '{key}': {message}") from None


def _sets(values: Any, dotted: str) -> bool:
    """Whether the plain nested dict ``values`` holds the dotted key."""
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _check_sections(cfg: DictConfig, layers: Sequence[Layer]) -> None:
    """Run every section's :meth:`Section.check`; name the layer that set the bad key."""
    plain = [(source, OmegaConf.to_container(raw, resolve=False)) for source, raw in layers]

    def visit(section: Any, prefix: str) -> None:
        if isinstance(section, Section):
            try:
                section.check()
            except InvalidValue as err:
                keys = [prefix + key for key in err.keys]
                setters = [s for s, values in plain if any(_sets(values, k) for k in keys)]
                source = setters[-1] if setters else "defaults"
                raise ConfigError(f"{source}: {keys[0]} {err.problem}") from None
        if dataclasses.is_dataclass(section):
            for f in dataclasses.fields(section):
                visit(getattr(section, f.name), f"{prefix}{f.name}.")

    visit(OmegaConf.to_object(cfg), "")


def merge_layers(schema: Any, layers: Sequence[Layer], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``layers`` (first to last, then the ``key=value`` ``overrides``) into the
    structured ``schema`` (a :class:`Section` dataclass instance) and check every section.

    Raises :class:`ConfigError` naming the layer and the key: unknown keys and wrong types as
    each layer is merged, values a section cannot use once all are merged.
    """
    layers = list(layers)
    # An override of one element of a list (method.teachers.0.path=...) is applied to the
    # merged config: a merge of the dict that from_dotlist makes of it cannot reach into lists.
    in_list = [o for o in overrides if any(p.isdigit() for p in o.split("=", 1)[0].split("."))]
    plain = [o for o in overrides if o not in in_list]
    if plain:
        layers.append((OVERRIDE_SOURCE, parse_overrides(plain)))
    cfg = OmegaConf.structured(schema)
    for source, raw in layers:
        cfg = _merge_layer(cfg, source, raw)
    for item in in_list:
        key, value = item.split("=", 1)
        try:
            OmegaConf.update(cfg, key, parse_overrides([f"v={value}"]).v, merge=True)
        except OmegaConfBaseException as err:
            message = str(err).splitlines()[0]
            raise ConfigError(f"{OVERRIDE_SOURCE} '{item}': {message}") from None
    if in_list:
        layers.append((OVERRIDE_SOURCE, parse_overrides(in_list)))
    _check_sections(cfg, layers)
    return cfg


def build_run_config(
    method_config: type[MethodConfig], layers: Sequence[Layer], overrides: Sequence[str] = ()
) -> DictConfig:
    """A checked training config whose ``method`` section is ``method_config``."""
    return merge_layers(RunConfig(method=method_config()), layers, overrides)
