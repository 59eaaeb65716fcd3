"""``ssl-lib cache-features TEACHER DATA_RECIPE OUT``: the command behind the teacher cache."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ssl_lib.config import load_data_config
from ssl_lib.distill.cache import write_cache
from ssl_lib.distill.teacher import TeacherConfig, build_teacher
from ssl_lib.schema import ConfigError, merge_layers

YAML_SUFFIXES = (".yaml", ".yml")


def load_teacher_spec(teacher: str) -> DictConfig:
    """A teacher spec from a YAML file of :class:`TeacherConfig` fields, or, for any other
    path, ``{kind: ssl_lib, path: teacher}`` (a checkpoint written by ``ssl-lib train``)."""
    if Path(teacher).suffix in YAML_SUFFIXES:
        if not Path(teacher).is_file():
            raise ConfigError(f"teacher spec '{teacher}' does not exist")
        spec = merge_layers(TeacherConfig(), [(teacher, OmegaConf.load(teacher))])
    else:
        spec = OmegaConf.structured(TeacherConfig(kind="ssl_lib", path=teacher))
    if spec.cache is not None:
        raise ConfigError(f"teacher spec '{teacher}': cache must be null to write a cache")
    return spec


def cache_features(
    teacher: str, recipe: str, out: str, overrides: list[str] = (), progress: bool = True
) -> Path:
    """Write the teacher cache of ``recipe``'s training set (its ``data`` and ``run.seed``;
    ``overrides`` of those sections) into ``out`` (see
    :func:`ssl_lib.distill.cache.write_cache`); every check runs before anything is written."""
    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise ConfigError(f"OUT '{out}' exists and is not an empty folder; choose another path")
    spec = load_teacher_spec(teacher)
    cfg = load_data_config(recipe, list(overrides))
    built = build_teacher(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_cache(built, cfg.data, out_path, cfg.run.seed, device, progress)
