"""The typed recipe schema, recipe loading with inheritance, overrides and validation.

A recipe is a YAML file. It may name the recipe(s) it extends with ``base:`` (a path relative
to the file, or a shipped recipe name such as ``imagenet/msf``; or a list of them); the child's
values win. ``key=value`` overrides from the
command line are applied last. Every layer is validated against one schema: the run schema
with the ``method`` section replaced by the chosen method's own dataclass, so unknown keys and
wrong types fail before any work starts, naming the file (or override) and the key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_lib.models.heads import MLPConfig

# The shipped recipes are package data. The package is installed unzipped (``zip_safe = False``
# in setup.cfg), so this is a real folder, where bases are found by their relative paths.
RECIPES_DIR = Path(resources.files("ssl_lib").joinpath("recipes"))
EVAL_RECIPES = "eval"


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the source, the key and the fix."""


@dataclass
class MethodConfig:
    """Fields every method has; each method extends this with its own hyper-parameters."""

    name: str = "byol"


@dataclass
class TargetMethodConfig(MethodConfig):
    """Methods with an EMA target (backbone + projector parameters).

    ``ema_schedule``: ``constant`` (UMBC code: m fixed) or ``cosine`` (BYOL: m rises from
    ``ema_momentum`` to ``ema_final`` over training, per step). ``shuffle_bn`` shuffles the
    target's batch across all ranks before its forward pass (MoCo / UMBC shuffle-BN).
    """

    ema_momentum: float = 0.99
    ema_schedule: str = "constant"
    ema_final: float = 1.0
    shuffle_bn: bool = True


@dataclass
class BankMethodConfig(TargetMethodConfig):
    """Methods with an EMA target and a memory bank of target embeddings (MoCo, ISD, MSF).

    ``bank_size``: rows K (any size; writes wrap around). ``bank_dtype``: storage precision
    (``fp32`` / ``fp16`` / ``bf16``; search and losses are float32). ``search_backend``:
    nearest-neighbour backend of the bank: ``torch``, ``faiss`` or ``auto`` (the faster of the
    two for the step's search, timed when training starts; ``ssl_lib.memory.search``).
    """

    bank_size: int = 65536
    bank_dtype: str = "fp32"
    search_backend: str = "auto"


@dataclass
class RunSection:
    """Where the run folder goes and the global seed."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class SyntheticConfig:
    """The procedurally generated default dataset (see ``ssl_lib.data.synthetic``)."""

    num_samples: int = 2000
    num_classes: int = 10
    seed: int = 0


@dataclass
class DataConfig:
    """Training data.

    ``dataset``: ``synthetic`` | ``image_folder`` (ImageNet layout, ``root`` = the train folder)
    | ``file_list`` (``file_list`` lines ``relative/path [label]`` under ``root``) | ``cifar10``
    | ``cifar100`` (torchvision's copy in the folder ``root``; downloaded there when missing
    only with ``download: true``).
    ``views``: view pipeline names; for asymmetric methods views[0] goes to the online
    (student / query) network and views[1] to the target (teacher / key) network.
    ``batch_size`` is the global batch, split evenly over all processes.
    ``labelled_subset`` / ``labelled_fraction`` (semi-supervised methods only): which training
    images keep their label, as a file of image paths relative to ``root`` (or bare file names,
    like the SimCLR ImageNet subsets) or as a seeded class-balanced fraction.
    ``max_image_pixels``: image files with more pixels are refused as unreadable (PIL's
    decompression-bomb guard; ``null``: no limit).
    """

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


@dataclass
class ModelConfig:
    """Backbone name (see ``ssl-lib backbones``) and the MLP heads; ``null`` removes a head."""

    backbone: str = "resnet50"
    projector: MLPConfig | None = field(default_factory=MLPConfig)
    predictor: MLPConfig | None = field(default_factory=MLPConfig)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    ``schedule``: ``cosine_epoch`` (UMBC: per-epoch cosine, 1-based, no warm-up),
    ``warmup_cosine`` (per-step linear warm-up then cosine to ``final_lr_ratio`` x lr),
    ``step`` (x ``gamma`` at each epoch in ``milestones``) or ``constant``.
    ``lr_scaling: linear`` multiplies ``lr`` (and ``lr_biases``) by global batch / 256.
    ``exclude_bias_and_norm`` removes weight decay (and LARS adaptation) from 1-D parameters;
    ``lr_biases`` gives those parameters their own learning rate.
    """

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
class TrainerConfig:
    """Lightning Trainer settings and checkpointing."""

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


@dataclass
class MonitorConfig:
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
class RunConfig:
    """The whole recipe."""

    run: RunSection = field(default_factory=RunSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


CHOICES: dict[str, list[str]] = {
    "data.dataset": ["synthetic", "image_folder", "file_list", "cifar10", "cifar100"],
    "optim.name": ["sgd", "lars"],
    "optim.schedule": ["cosine_epoch", "warmup_cosine", "step", "constant"],
    "optim.lr_scaling": ["none", "linear"],
    "method.ema_schedule": ["constant", "cosine"],
    "method.bank_dtype": ["fp32", "fp16", "bf16"],
    "method.search_backend": ["auto", "torch", "faiss"],
    "method.bank_init": ["rows", "columns"],
    "method.short_neighbours": ["fill", "valid_only"],
    "method.cache_device": ["model", "cpu"],
    "method.cache_dtype": ["fp32", "fp16", "bf16"],
    "method.kmeans_backend": ["auto", "faiss", "torch"],
    "trainer.nonfinite": ["stop", "skip"],
}


def _find(folder: Path, name: str) -> Path | None:
    """The recipe file ``name`` (with or without ``.yaml``) under ``folder``, if there is one."""
    for candidate in (folder / name, folder / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe given as a path, or as a shipped name such as ``demo/msf``.

    Raises :class:`ConfigError` naming the closest shipped names when it is neither.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = _find(RECIPES_DIR, str(recipe))
    if shipped is not None:
        return shipped
    names = list_recipes()
    close = difflib.get_close_matches(str(recipe), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"recipe '{recipe}' not found: not a file, and not a shipped recipe.{hint} "
        "Run `ssl-lib recipes` for the list."
    )


def is_eval_recipe(name: str) -> bool:
    """Shipped recipes under ``eval/`` are evaluation recipes (``EvalConfig``)."""
    return Path(name).parts[0] == EVAL_RECIPES


def list_recipes(kind: str | None = None) -> list[str]:
    """Shipped recipe names (relative to ``ssl_lib/recipes/``, without ``.yaml``); names
    starting with ``_`` (bases that are not recipes on their own) are left out.

    ``kind``: ``train`` or ``eval`` keeps only that kind; ``None`` lists both.
    """
    if not RECIPES_DIR.is_dir():
        return []
    names = sorted(
        str(p.relative_to(RECIPES_DIR).with_suffix(""))
        for p in RECIPES_DIR.rglob("*.yaml")
        if not p.name.startswith("_")
    )
    if kind is None:
        return names
    return [n for n in names if is_eval_recipe(n) == (kind == "eval")]


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got a list")
    return cfg


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The recipe and its bases, base first, each as (source, raw config)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: recipe inheritance loops back to itself")
    raw = _load_yaml(path)
    bases = raw.pop("base", None)
    layers: list[tuple[str, DictConfig]] = []
    for base in [bases] if isinstance(bases, str) else list(bases or []):
        found = _find(path.parent, str(base)) or _find(RECIPES_DIR, str(base))
        if found is None:
            raise ConfigError(
                f"{path}: base recipe '{base}' not found: no file {path.parent / base}, and "
                "not a shipped recipe (ssl-lib recipes lists them)"
            )
        base_path = found.resolve()
        layers += _layers(base_path, seen + (path,))
    layers.append((str(path), raw))
    return layers


def _parse_overrides(overrides: list[str]) -> DictConfig:
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


def _check_choices(cfg: DictConfig, choices: dict[str, list[str]] = CHOICES) -> None:
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: '{value}' is not accepted.{hint} Choose from {allowed}")


def _check_names(cfg: DictConfig) -> None:
    from ssl_lib.data.transforms import VIEWS
    from ssl_lib.models.backbones import BACKBONES

    checks = [("model.backbone", BACKBONES, [cfg.model.backbone])]
    checks.append(("data.views", VIEWS, list(cfg.data.views)))
    for key, registry, names in checks:
        for name in names:
            if key == "model.backbone" and str(name).startswith("timm:"):
                continue
            try:
                registry.get(name)
            except KeyError as err:
                raise ConfigError(f"{key}: {err.args[0]}") from None


def build_config(layers: list[tuple[str, DictConfig]], overrides: list[str] = ()) -> DictConfig:
    """Validate and merge raw layers (and ``key=value`` overrides) into one typed config."""
    from ssl_lib.methods import METHODS  # methods register their config classes on import

    layers = list(layers)
    if overrides:
        layers.append(("command-line override", _parse_overrides(list(overrides))))
    name = OmegaConf.select(OmegaConf.merge(*[raw for _, raw in layers]), "method.name")
    if name is None:
        raise ConfigError(
            f"{layers[-1][0]}: no method.name given. Available methods: {', '.join(METHODS)}"
        )
    try:
        method_cls = METHODS.get(str(name))
    except KeyError as err:
        raise ConfigError(f"method.name: {err.args[0]}") from None
    cfg = OmegaConf.structured(RunConfig(method=method_cls.config_class()))
    for source, raw in layers:
        cfg = _merge_layer(cfg, source, raw)
    _check_choices(cfg)
    _check_names(cfg)
    return cfg


def load_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a recipe (path or shipped name) with its bases and overrides, fully validated."""
    return build_config(_layers(resolve_recipe(recipe)), overrides)


def config_from_dict(values: dict, overrides: list[str] = ()) -> DictConfig:
    """Build a validated config from a Python dict (library use, tests)."""
    return build_config([("config dict", OmegaConf.create(values))], overrides)


# ------------------------------------------------------------------ evaluation recipes
@dataclass
class EvalDataConfig:
    """Labelled data of an evaluation.

    ``dataset``: ``image_folder`` (``train_root`` and ``val_root`` hold the same class folders),
    ``cifar10`` / ``cifar100`` (torchvision copy in ``train_root``; its test split is the val
    set), or ``synthetic`` (the embedded textures; its evaluation split is the val set).
    ``labelled_subset``: a file list (``relative/path [label]`` under ``train_root``) that
    replaces the train set, for the 1 % / 10 % semi-supervised evaluations.
    ``max_train_samples`` / ``max_val_samples`` keep a seeded random subset (quick checks).
    ``max_image_pixels``: as ``data.max_image_pixels`` of a training recipe.
    """

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
class FeaturesConfig:
    """What is extracted and where it is cached.

    ``source``: ``backbone`` (the papers' protocols), ``projector`` (backbone + projector) or
    ``block:N`` (output of block N, for methods that offer ``block_features``).
    ``dtype``: storage of the extracted features, ``fp32`` or ``fp16``.
    ``cache_dir``: ``null`` = ``<run folder>/eval/features``. ``device``: ``auto`` = CUDA when
    available.
    """

    source: str = "backbone"
    dtype: str = "fp32"
    cache_dir: str | None = None
    device: str = "auto"
    progress_bar: bool = True


@dataclass
class KNNEvalConfig:
    """kNN classification (``ssl_lib.eval.knn.knn_evaluate``).

    ``backend``: the search backend, ``torch``, ``faiss`` or ``auto`` (the faster of the two,
    timed on the search's first blocks; ``ssl_lib.memory.search``).
    """

    ks: list[int] = field(default_factory=lambda: [1, 20])
    temperatures: list[float] = field(default_factory=lambda: [0.07, 0.1])
    votes: list[str] = field(default_factory=lambda: ["majority"])
    backend: str = "auto"
    seed: int = 0


@dataclass
class LinearEvalConfig:
    """Linear probe on the frozen backbone (``ssl_lib.eval.linear``).

    ``protocol``: ``umbc`` (L2-normalise + fixed standardisation + linear, augmented crops,
    features recomputed each step), ``moco`` (plain linear on raw features, augmented crops) or
    ``cached`` (UMBC head trained on cached centre-crop features; the learning rate is chosen
    from ``lr_grid`` on a held-out ``val_fraction`` of the train set, then the head is retrained
    on the whole train set). The LR is multiplied by ``gamma`` at each epoch in ``milestones``.
    """

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


@dataclass
class EvalConfig:
    """An evaluation recipe; ``output``: the results JSON (``null`` = ``<run>/eval/``)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KNNEvalConfig = field(default_factory=KNNEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    output: str | None = None


EVAL_CHOICES: dict[str, list[str]] = {
    "data.dataset": ["image_folder", "cifar10", "cifar100", "synthetic"],
    "features.dtype": ["fp32", "fp16"],
    "knn.backend": ["auto", "torch", "faiss"],
    "linear.protocol": ["umbc", "moco", "cached"],
}


def _check_eval(cfg: DictConfig) -> None:
    _check_choices(cfg, EVAL_CHOICES)
    source = cfg.features.source
    if source not in ("backbone", "projector") and not re.fullmatch(r"block:\d+", source):
        raise ConfigError(
            f"features.source: '{source}' is not accepted. Choose backbone, projector or block:N"
        )
    for vote in cfg.knn.votes:
        if vote not in ("majority", "weighted"):
            raise ConfigError(f"knn.votes: '{vote}' is not accepted. Choose majority or weighted")
    if not cfg.knn.ks or min(cfg.knn.ks) < 1:
        raise ConfigError(f"knn.ks must be positive integers, got {list(cfg.knn.ks)}")
    if not 0 < cfg.linear.val_fraction < 1:
        raise ConfigError(f"linear.val_fraction must lie in (0, 1), got {cfg.linear.val_fraction}")


def build_eval_config(
    layers: list[tuple[str, DictConfig]], overrides: list[str] = ()
) -> DictConfig:
    """Validate and merge raw evaluation layers (and overrides) into one ``EvalConfig``."""
    layers = list(layers)
    if overrides:
        layers.append(("command-line override", _parse_overrides(list(overrides))))
    cfg = OmegaConf.structured(EvalConfig)
    for source, raw in layers:
        cfg = _merge_layer(cfg, source, raw)
    _check_eval(cfg)
    return cfg


def load_eval_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load an evaluation recipe (path or shipped name such as ``eval/knn_umbc``)."""
    return build_eval_config(_layers(resolve_recipe(recipe)), overrides)
