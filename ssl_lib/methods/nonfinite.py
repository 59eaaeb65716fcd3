"""NaN / Inf losses (``trainer.nonfinite``): stop with a clear message, or skip the batch.

A skipped batch changes nothing: its gradients are dropped before the optimiser step (so the
optimiser changes neither weights nor momentum), and what its forward pass and EMA update wrote
(target, BatchNorm statistics, banks, caches) is taken back after its backward pass, which may
still need those tensors as they were (:class:`ssl_lib.undo.StepUndo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from ssl_lib.undo import StepUndo


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``trainer.nonfinite: stop``); the message says where."""


class NonFiniteGuard:
    """Checks each step's loss on behalf of a method (``mode``: ``stop`` or ``skip``).

    The method calls :meth:`begin_step` before its step changes anything, :meth:`check` with
    the loss, and :meth:`before_optimizer_step` after the backward pass. ``frozen``: the
    submodules of ``module`` that change outside the optimiser (see :class:`StepUndo`).
    ``skipped`` counts the skipped batches (saved in checkpoints by the method).
    """

    def __init__(self, mode: str, module: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
        self.mode = mode
        self.skipped = 0
        self.skipping = False  # the current batch is being skipped
        self._undo = StepUndo(module, frozen) if mode == "skip" else None

    def begin_step(self) -> None:
        """Start recording what the step changes (skip mode)."""
        self.skipping = False
        if self._undo is not None:
            self._undo.begin()

    def check(self, loss: Tensor, where: str, terms: dict[str, Tensor], trainer: Any) -> bool:
        """Whether the step's ``loss`` is NaN / Inf on any process (all processes agree).

        ``stop`` mode raises :class:`NonFiniteLossError` then; ``skip`` mode warns, counts the
        batch and returns True (the caller returns the loss without using it). ``where`` and the
        loss ``terms`` go into the message.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer is not None:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            if self._undo is not None:
                self._undo.end(revert=False)
            return False
        value = float(loss.detach())
        shown = ", ".join(f"{k}={float(v):.6g}" for k, v in terms.items()) or "none"
        message = f"non-finite loss at {where}: loss={value:.6g}; loss terms: {shown}"
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"{message}. No optimiser step was taken and no checkpoint of this state "
                "written. Lower optim.lr (or add a warm-up), or set trainer.nonfinite=skip to "
                "skip such batches"
            )
        self.skipping = True
        self.skipped += 1
        rank_zero_warn(f"skipping the batch: {message}")
        return True

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """For a skipped batch: drop the gradients and take back the step's other writes."""
        if not self.skipping:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if self._undo is not None:
            self._undo.end(revert=True)
