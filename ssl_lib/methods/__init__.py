"""Methods, one file each on the ``SSLMethod`` base, registered by name."""

from ssl_lib.checkpoints import read_checkpoint
from ssl_lib.data.module import local_batch_size
from ssl_lib.methods import (  # noqa: F401  (registers the methods)
    barlow_twins,
    blockwise,
    byol,
    cmsf,
    cmsf_semi,
    compress,
    isd,
    moco,
    msf,
    simreg,
)
from ssl_lib.methods.base import SSLMethod
from ssl_lib.methods.registry import METHODS
from ssl_lib.schema import ConfigError

__all__ = [
    "METHODS",
    "SSLMethod",
    "build_method",
    "configured_world_size",
    "load_method",
    "prepare_config",
]


def prepare_config(cfg, datamodule) -> None:
    """Let the configured method fill values that depend on the training data (in place)."""
    METHODS.get(cfg.method.name).prepare_config(cfg, datamodule)


def build_method(cfg) -> SSLMethod:
    """Instantiate the method named by ``cfg.method.name`` from a validated config.

    A setting the method rejects (a ``ValueError`` from its checks, e.g. a bank too small for
    the batch) is raised as a ``ConfigError`` with the same message. With the number of
    processes known from ``trainer.devices`` x ``trainer.num_nodes``, the global
    ``data.batch_size`` must split evenly over them (``DataError``) and leave each process a
    batch the method can train on (``ConfigError``: one sample with BatchNorm in training).
    """
    try:
        method = METHODS.get(cfg.method.name)(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    world = configured_world_size(cfg.trainer)
    batch = cfg.data.batch_size
    if world is None and batch == 1:
        world = 1  # whatever the number of processes, a batch of 1 is one sample each
    if world is not None:  # else the data module checks once the Trainer has started
        method.check_batch(local_batch_size(batch, world), world)
    return method


def configured_world_size(trainer_cfg) -> int | None:
    """Processes a ``trainer`` config section starts: ``devices x num_nodes``.

    ``None`` when Lightning decides at start-up (``devices: auto`` or ``-1`` on an accelerator
    other than ``cpu``); the data module checks the batch again once the Trainer runs.
    """
    devices = trainer_cfg.devices
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            devices = [d for d in text.split(",") if d.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        elif text == "auto":
            devices = -1
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        if devices > 0:
            return devices * trainer_cfg.num_nodes
        if devices == -1 and trainer_cfg.accelerator == "cpu":
            return trainer_cfg.num_nodes  # Lightning runs one CPU process per node
        return None
    try:
        return len(devices) * trainer_cfg.num_nodes  # a list of device ids
    except TypeError:
        return None


def load_method(checkpoint_path: str, map_location: str = "cpu") -> SSLMethod:
    """Load any method from a checkpoint written by ``ssl-lib train``."""
    ckpt = read_checkpoint(checkpoint_path, map_location)
    config = ckpt["hyper_parameters"]["config"]
    method = METHODS.get(config["method"]["name"])(config)
    method.load_state_dict(ckpt["state_dict"])
    return method
