"""Writing checkpoints atomically; reading them with clear errors for truncated or foreign files."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ssl_lib.files import atomic_write

TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "global_step", "epoch")


class CheckpointError(ValueError):
    """The file is not a usable ssl_lib checkpoint; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`ssl_lib.files.atomic_write`: a crash or an error at any
    point leaves the previous file at ``path`` untouched."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(
    path: str | Path, map_location: str = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by ``ssl-lib train``; fail clearly on anything else.

    With ``mmap`` the tensors are mapped from the file instead of read (a cheap check).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read (truncated or not a torch file): "
            "it is not a torch zip archive"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read (truncated or not a torch file): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint '{path}' was not written by ssl-lib train (no ssl_lib config and "
            "state_dict inside)"
        )
    return ckpt


def check_resumable(path: str | Path, method_name: str) -> None:
    """Fail clearly unless ``path`` is a full training checkpoint of method ``method_name``."""
    ckpt = read_checkpoint(path, mmap=True)
    missing = [key for key in TRAINING_STATE if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' holds no training state (missing {', '.join(missing)}): "
            "it cannot resume a run; evaluate it with ssl-lib eval or start a new run"
        )
    written_by = ckpt["hyper_parameters"]["config"].get("method", {}).get("name")
    if written_by != method_name:
        raise CheckpointError(
            f"checkpoint '{path}' was written by method '{written_by}', but the run's config "
            f"says method.name={method_name}"
        )
