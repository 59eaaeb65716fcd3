"""What a run prints besides its own lines: third-party noise left out, progress bars.

* :func:`silence_known_noise`: drops a few specific messages of the libraries underneath that
  say nothing about the user's run, each matched by its text and origin (listed below with the
  reason). Every other warning, in particular those about the user's data or config, still shows.
* :func:`progress`: a tqdm bar with rate and ETA for long work outside the training loop
  (feature extraction, k-means, linear probes). It is drawn on the first process only, when
  stderr is a terminal and ``ssl-lib --quiet`` was not given (:func:`set_quiet`).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable
from typing import TypeVar

import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")

# Log records dropped: (logger, message regex, why).
_LOG_NOISE = (
    (
        "pytorch_lightning.utilities.rank_zero",
        r"Tip: .*\blit(logger|models)\b",
        "Lightning advertises its cloud products (litlogger, litmodels) on every run",
    ),
    (
        "pytorch_lightning.utilities.rank_zero",
        r"^Loading `train_dataloader` to estimate number of stepping batches",
        "Lightning explains how it counts the steps that size the LR schedule; nothing to do",
    ),
)
# Warnings ignored: (message regex, category, module regex, why).
_WARNING_NOISE = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"pytorch_lightning\.utilities\._pytree",
        "Lightning's own use of a torch API that torch deprecates; no user code involved",
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        UserWarning,
        r"pytorch_lightning\.callbacks\.model_checkpoint",
        "a resumed run writes into its own checkpoints/ folder by design (new runs get a new one)",
    ),
)


class _DropMessages(logging.Filter):
    """Rejects the records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_noise() -> None:
    """Install the filters of ``_LOG_NOISE`` and ``_WARNING_NOISE`` (idempotent)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in _LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for message, category, module, _why in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


_quiet = False


def set_quiet(quiet: bool) -> None:
    """``ssl-lib --quiet``: no progress bars at all (training's included)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether :func:`set_quiet` turned the progress bars off."""
    return _quiet


def progress(iterable: Iterable[T], desc: str, enabled: bool = True) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar (rate and ETA when its length is known) on stderr.

    The bar is drawn only when ``enabled``, not quiet, stderr is a terminal (no control
    characters in log files) and this is the first process of a distributed group; it is
    removed when the loop ends.
    """
    first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    show = enabled and not _quiet and sys.stderr.isatty() and first
    return tqdm(iterable, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
