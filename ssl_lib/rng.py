"""The random generators' states in checkpoints, so that a resumed run draws what the
uninterrupted run would have drawn (dropout, blockwise training's noise, anything seeded
globally). Data order and augmentations do not depend on them (``ssl_lib.data.sampling``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

CHECKPOINT_KEY = "ssl_lib"  # the checkpoint entry that also holds the method's own counters


def collect_rng_states() -> dict[str, Any]:
    """The states of torch (CPU and current CUDA device), numpy and ``random`` generators.

    Tensors and plain values only, so the checkpoint loads with ``weights_only``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStateCheckpoint(pl.Callback):
    """Saves the generators' states with every checkpoint (``checkpoint["ssl_lib"]
    ["rng_states"]``) and restores them when a resumed run starts training.

    The restore waits for ``on_train_start``, just before the first batch: whatever Lightning
    and the other hooks draw while setting the run up must not shift the restored streams.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["rng_states"] = collect_rng_states()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored = checkpoint.get(CHECKPOINT_KEY, {}).get("rng_states")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is not None:
            set_rng_states(self._restored)
            self._restored = None
