"""Methods, one file each on the ``SSLMethod`` base, registered by name."""

from ssl_lib.methods import (  # noqa: F401  (registers the methods)
    barlow_twins,
    blockwise,
    byol,
    cmsf,
    cmsf_semi,
    isd,
    moco,
    msf,
)
from ssl_lib.methods.base import SSLMethod
from ssl_lib.methods.registry import METHODS

__all__ = ["METHODS", "SSLMethod", "build_method", "load_method", "prepare_config"]


def prepare_config(cfg, datamodule) -> None:
    """Let the configured method fill values that depend on the training data (in place)."""
    METHODS.get(cfg.method.name).prepare_config(cfg, datamodule)


def build_method(cfg) -> SSLMethod:
    """Instantiate the method named by ``cfg.method.name`` from a validated config.

    A setting the method rejects (a ``ValueError`` from its checks, e.g. a bank too small for
    the batch) is raised as a ``ConfigError`` with the same message.
    """
    from ssl_lib.config import ConfigError

    try:
        return METHODS.get(cfg.method.name)(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_method(checkpoint_path: str, map_location: str = "cpu") -> SSLMethod:
    """Load any method from a checkpoint written by ``ssl-lib train``."""
    from ssl_lib.checkpoints import read_checkpoint

    ckpt = read_checkpoint(checkpoint_path, map_location)
    config = ckpt["hyper_parameters"]["config"]
    method = METHODS.get(config["method"]["name"])(config)
    method.load_state_dict(ckpt["state_dict"])
    return method
