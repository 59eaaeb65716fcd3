"""Per-image caches of target embeddings keyed by dataset index (CMSF-2Q and CMSF-KM).

A :class:`SampleCache` holds ``slots`` embeddings for each of the ``num_samples`` training
images. With one slot it keeps each image's latest embedding (CMSF-KM's pool); with two slots
it alternates between them on each visit, so after a write the *other* slot holds the image's
embedding from its previous visit (CMSF-2Q's pool).

The cache can be large (ImageNet, 2 slots x 1.28 M x 512 fp32 = 5.25 GB), so where it lives is
a choice: ``device="model"`` follows the LightningModule's device (the original keeps it on the
GPU), ``device="cpu"`` keeps it in host memory whatever the model's device, and ``dtype`` may be
fp16/bf16. It is saved in checkpoints through ``get_extra_state`` (not as a registered buffer, so
``module.to(device)`` never copies a CPU cache to the GPU). Writes receive all-gathered batches,
so every rank holds the same cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssl_lib.memory.bank import _storage_dtype
from ssl_lib.undo import Undoable

CACHE_DEVICES = ("model", "cpu")
CACHE_INITS = ("normal", "unit", "zeros")


class SampleCache(nn.Module, Undoable):
    """``slots x num_samples x dim`` embeddings of the training images, indexed by dataset index.

    ``init``: ``normal`` = unnormalised standard Gaussian rows (the CMSF-2Q original, whose
    first-epoch "previous" embeddings are such random vectors), ``unit`` = L2-normalised Gaussian
    rows, ``zeros``. ``visits`` counts the writes per image (saturating at 255), so callers can
    tell rows that were never written or written once.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        slots: int = 1,
        dtype: torch.dtype | str = torch.float32,
        device: str = "model",
        init: str = "normal",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ValueError(f"num_samples and dim must be >= 1, got {num_samples}, {dim}")
        if slots not in (1, 2):
            raise ValueError(f"slots must be 1 or 2, got {slots}")
        if device not in CACHE_DEVICES:
            raise ValueError(f"unknown cache device {device!r}; accepted: model, cpu")
        if init not in CACHE_INITS:
            raise ValueError(f"unknown cache init {init!r}; accepted: {', '.join(CACHE_INITS)}")
        self.num_samples, self.dim, self.slots = num_samples, dim, slots
        self.placement = device
        self.init = init
        self.seed = seed
        # Zero-size marker that follows module.to(); tells where "model" is.
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)
        gen = torch.Generator().manual_seed(seed)
        if init == "zeros":
            data = torch.zeros(slots, num_samples, dim)
        else:
            data = torch.randn(slots, num_samples, dim, generator=gen)
            if init == "unit":
                data = nn.functional.normalize(data, dim=-1)
        self.data: Tensor = data.to(_storage_dtype(dtype))
        self.next_slot: Tensor = torch.zeros(num_samples, dtype=torch.long)
        self.visits: Tensor = torch.zeros(num_samples, dtype=torch.uint8)
        self._journal: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        """Where the cache is held."""
        return torch.device("cpu") if self.placement == "cpu" else self._device_marker.device

    def _place(self) -> None:
        dev = self.device
        if self.data.device != dev:
            self.data = self.data.to(dev)
            self.next_slot = self.next_slot.to(dev)
            self.visits = self.visits.to(dev)

    def _index(self, index: Tensor) -> Tensor:
        self._place()
        return index.to(self.device, torch.long)

    @property
    def nbytes(self) -> int:
        """Bytes held (embeddings, slot pointers and visit counts)."""
        return (
            self.data.numel() * self.data.element_size()
            + self.next_slot.numel() * self.next_slot.element_size()
            + self.visits.numel()
        )

    # ------------------------------------------------------------------ access
    @torch.no_grad()
    def write(self, index: Tensor, x: Tensor) -> None:
        """Store ``x[i]`` for image ``index[i]`` (then, with two slots, switch its slot).

        ``index`` must not repeat (the rows of one global batch).
        """
        if x.shape != (index.shape[0], self.dim):
            raise ValueError(
                f"cache write expects ({index.shape[0]}, {self.dim}) rows, got {tuple(x.shape)}"
            )
        idx = self._index(index)
        # Checked where it costs no device sync (a CPU cache); the dataset size was checked
        # against method.num_samples when the run started.
        if idx.device.type == "cpu" and bool(((idx < 0) | (idx >= self.num_samples)).any()):
            raise ValueError(
                f"cache index out of range 0..{self.num_samples - 1}: the dataset is larger "
                "than the cache (method.num_samples)"
            )
        slot = self.next_slot[idx]
        if self._journal is not None:
            old = (idx, self.data[slot, idx].clone(), slot.clone(), self.visits[idx].clone())
            self._journal.append(old)
        self.data[slot, idx] = x.detach().to(self.device, self.data.dtype)
        if self.slots == 2:
            self.next_slot[idx] = 1 - slot
        self.visits[idx] = (self.visits[idx].long() + 1).clamp(max=255).to(torch.uint8)

    def record_undo(self) -> None:
        """Start remembering what :meth:`write` overwrites, so :meth:`stop_undo` can revert it."""
        self._journal = []

    @torch.no_grad()
    def stop_undo(self, revert: bool) -> None:
        """Stop remembering; with ``revert`` restore the cache as it was at :meth:`record_undo`
        (a skipped training batch must leave no trace)."""
        journal, self._journal = self._journal, None
        for idx, rows, slot, visits in reversed(journal or []) if revert else []:
            self.data[slot, idx] = rows
            self.next_slot[idx] = slot
            self.visits[idx] = visits

    def latest(self, index: Tensor) -> Tensor:
        """The most recent embedding of each image (float32, on the cache's device)."""
        idx = self._index(index)
        slot = (1 - self.next_slot[idx]) if self.slots == 2 else torch.zeros_like(idx)
        return self.data[slot, idx].float()

    def previous(self, index: Tensor) -> Tensor:
        """Two slots: each image's embedding from the visit before its latest (float32).

        This is the slot the next write will overwrite, i.e. ``pool[pool_qindex[n], n]`` of
        the original CMSF-2Q code after its toggle.
        """
        if self.slots != 2:
            raise ValueError("previous() needs a two-slot cache")
        idx = self._index(index)
        return self.data[self.next_slot[idx], idx].float()

    def all_latest(self) -> Tensor:
        """Latest embedding of every image, ``num_samples x dim`` float32 (for clustering)."""
        return self.latest(torch.arange(self.num_samples))

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "next_slot": self.next_slot,
            "visits": self.visits,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if tuple(data.shape) != (self.slots, self.num_samples, self.dim):
            raise ValueError(
                f"checkpointed cache has shape {tuple(data.shape)}, expected "
                f"{(self.slots, self.num_samples, self.dim)} (slots, images, dim): the checkpoint "
                "was trained on a different dataset size or embedding width"
            )
        dev = self.device
        self.data = data.to(dev, self.data.dtype).clone()
        self.next_slot = state["next_slot"].to(dev, torch.long).clone()
        self.visits = state["visits"].to(dev, torch.uint8).clone()

    def extra_repr(self) -> str:
        return (
            f"slots={self.slots}, num_samples={self.num_samples}, dim={self.dim}, "
            f"dtype={self.data.dtype}, device={self.placement!r}, init={self.init!r}"
        )
