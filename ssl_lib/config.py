"""Loading training and evaluation recipes: YAML files, inheritance, overrides.

A recipe is a YAML file. It may name the recipe(s) it extends with ``base:`` (a path relative
to the file, or a shipped recipe name such as ``imagenet/msf``; or a list of them); the
child's values win. ``key=value`` overrides from the command line are applied last. Every
layer is merged into one schema (``ssl_lib.schema``): the run schema with the ``method``
section replaced by the chosen method's own dataclass, or the evaluation schema
(``ssl_lib.eval.config``), so unknown keys, wrong types and values a section cannot use fail
before any work starts, naming the file (or override) and the key.

This module sits above the methods: it imports the method registry to find the dataclass that
``method.name`` selects. The methods import the schema, never this module.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_lib.defend.config import build_defend_config
from ssl_lib.eval.config import EvalConfig, build_eval_config
from ssl_lib.methods import METHODS
from ssl_lib.schema import (
    OVERRIDE_SOURCE,
    ConfigError,
    DataConfig,
    Layer,
    MethodConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    RunConfig,
    RunSection,
    SyntheticConfig,
    TrainerConfig,
    build_run_config,
    parse_overrides,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "RunConfig",
    "RunSection",
    "SyntheticConfig",
    "TrainerConfig",
    "build_config",
    "build_eval_config",
    "config_from_dict",
    "list_recipes",
    "load_config",
    "load_defend_config",
    "load_data_config",
    "load_eval_config",
    "resolve_recipe",
]

# The shipped recipes are package data. The package is installed unzipped (``zip_safe = False``
# in setup.cfg), so this is a real folder, where bases are found by their relative paths.
RECIPES_DIR = Path(resources.files("ssl_lib").joinpath("recipes"))
EVAL_RECIPES = "eval"
DEFEND_RECIPES = "defend"
POISON_RECIPES = "poison"


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


def recipe_kind(name: str) -> str:
    """``eval``, ``defend`` or ``poison`` for shipped recipes in those folders (``ssl-lib eval``,
    ``ssl-lib defend``, ``ssl-lib poison make``), else ``train``."""
    first = Path(name).parts[0]
    return first if first in (EVAL_RECIPES, DEFEND_RECIPES, POISON_RECIPES) else "train"


def list_recipes(kind: str | None = None) -> list[str]:
    """Shipped recipe names (relative to ``ssl_lib/recipes/``, without ``.yaml``); names
    starting with ``_`` (bases that are not recipes on their own) are left out.

    ``kind``: ``train``, ``eval``, ``defend`` or ``poison`` keeps only that kind
    (:func:`recipe_kind`); ``None`` lists all.
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
    return [n for n in names if recipe_kind(n) == kind]


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


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The recipe and its bases, base first, each as (source, raw config)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: recipe inheritance loops back to itself")
    raw = _load_yaml(path)
    bases = raw.pop("base", None)
    layers: list[Layer] = []
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


def build_config(layers: list[Layer], overrides: list[str] = ()) -> DictConfig:
    """Validate and merge raw layers (and ``key=value`` overrides) into one typed config."""
    layers, overrides = list(layers), list(overrides)
    probe = list(layers)
    if overrides:
        parse_overrides(overrides)  # malformed overrides fail first
        named = [o for o in overrides if o.split("=", 1)[0] == "method.name"]
        probe.append((OVERRIDE_SOURCE, parse_overrides(named)))
    name = OmegaConf.select(OmegaConf.merge(*[raw for _, raw in probe]), "method.name")
    if name is None:
        source = OVERRIDE_SOURCE if overrides else layers[-1][0]
        raise ConfigError(
            f"{source}: no method.name given. Available methods: {', '.join(METHODS)}"
        )
    try:
        method_cls = METHODS.get(str(name))
    except KeyError as err:
        raise ConfigError(f"method.name: {err.args[0]}") from None
    return build_run_config(method_cls.config_class, layers, overrides)


def load_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a recipe (path or shipped name) with its bases and overrides, fully validated."""
    return build_config(_layers(resolve_recipe(recipe)), overrides)


def config_from_dict(values: dict, overrides: list[str] = ()) -> DictConfig:
    """Build a validated config from a Python dict (library use, tests)."""
    return build_config([("config dict", OmegaConf.create(values))], overrides)


def load_data_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """The ``run`` and ``data`` sections of a training recipe (the other sections are not
    read, so a recipe whose method needs files that do not exist yet still loads); for
    commands that work on a recipe's training set (``ssl-lib cache-features``)."""
    layers = [
        (source, OmegaConf.create({k: raw[k] for k in ("run", "data") if k in raw}))
        for source, raw in _layers(resolve_recipe(recipe))
    ]
    return build_run_config(MethodConfig, layers, overrides)


def load_eval_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load an evaluation recipe (path or shipped name such as ``eval/knn_umbc``)."""
    return build_eval_config(_layers(resolve_recipe(recipe)), overrides)


def load_defend_config(recipe: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a defence recipe (path or shipped name such as ``defend/patchsearch``)."""
    return build_defend_config(_layers(resolve_recipe(recipe)), overrides)
