"""Taking back what one training step wrote outside the optimiser (``trainer.nonfinite: skip``).

A step changes more than the trained parameters: the EMA target, BatchNorm statistics, memory
banks and per-image caches. Banks and caches can be large (K x D rows, N x D caches), so they
do not copy themselves: they implement :class:`Undoable` and journal only the rows a step
overwrites. Everything else is small enough to copy (:class:`StepUndo`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Undoable(ABC):
    """State that journals its own writes, so that they can be taken back.

    Between :meth:`record_undo` and :meth:`stop_undo` the implementer remembers what each write
    overwrites; ``stop_undo(revert=True)`` restores the state it had at :meth:`record_undo`.
    :class:`StepUndo` finds implementers among a module's submodules by this base class.
    """

    @abstractmethod
    def record_undo(self) -> None:
        """Start remembering what each write overwrites."""

    @abstractmethod
    def stop_undo(self, revert: bool) -> None:
        """Stop remembering; with ``revert`` restore the state at :meth:`record_undo`."""


class StepUndo:
    """Everything one step changes in ``module`` besides what the optimiser updates.

    :meth:`begin` starts the journals of the :class:`Undoable` submodules and copies every
    other buffer of ``module`` (BatchNorm statistics) and the parameters of ``frozen``, the
    submodules that change outside the optimiser (the EMA target); :meth:`end` stops the
    journals and, with ``revert``, restores all of it. The optimiser's own state is not covered:
    a skipped step leaves it unchanged by giving it no gradients.
    """

    def __init__(self, module: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
        self.module = module
        self.frozen = list(frozen)
        self._copies: list[tuple[Tensor, Tensor]] | None = None

    def _journaled(self) -> list[Undoable]:
        return [m for m in self.module.modules() if isinstance(m, Undoable)]

    @torch.no_grad()
    def begin(self) -> None:
        journaled = self._journaled()
        covered = {id(t) for m in journaled for t in m.buffers()}  # type: ignore[attr-defined]
        tensors = [t for t in self.module.buffers() if id(t) not in covered]
        tensors += [p for m in self.frozen for p in m.parameters()]
        for m in journaled:
            m.record_undo()
        self._copies = [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def end(self, revert: bool) -> None:
        copies, self._copies = self._copies, None
        for m in self._journaled():
            m.stop_undo(revert)
        if revert and copies is not None:
            for tensor, saved in copies:
                tensor.copy_(saved)
