"""Reading checkpoints with clear errors for truncated or foreign files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """The file is not a usable ssl_lib checkpoint; the message says why."""


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``ssl-lib train``; fail clearly on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
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
