"""Deterministic, resumable data order and per-sample augmentation seeds.

Training data order and augmentations are pure functions of the run seed, so a run stopped at
any batch and resumed continues exactly where it stopped, whatever ``data.num_workers``:

* :class:`EpochSampler` draws the permutation of an epoch from ``(seed, epoch)`` and yields
  ``(epoch, index)`` keys; on resume it skips the batches the stopped run had consumed.
* :class:`~ssl_lib.data.datasets.IndexedDataset` turns an ``(epoch, index)`` key into a seed for
  each view with :func:`mix_seed`; the view's transforms run under :func:`seeded_rng`
  (``data.augment_on: workers``) or draw all its random parameters from a ``random.Random`` of
  that seed (``device``, :mod:`ssl_lib.data.augment`), so augmentations depend neither on
  worker processes nor on their RNGs.
* :class:`ResumableDataLoader` exposes the sampler position to Lightning, which stores it in
  checkpoints (``loops.fit_loop.state_dict.combined_loader``) and restores it mid-epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK64 = (1 << 64) - 1
MIN_BATCH = 2  # the fewest samples per process that BatchNorm can train on
ORDER_STREAM = 1  # stream tags keep the seeds of different uses apart
VIEW_STREAM = 2


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (order matters): a splitmix64 chain."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


@contextmanager
def seeded_rng(seed: int, numpy: bool = False) -> Iterator[None]:
    """Run a block with torch's CPU generator (and with ``numpy``, numpy's global generator)
    seeded from ``seed``; restore them after.

    The caller's generators are left exactly as they were, so data loading in the training
    process never shifts the random stream of training itself. Only the generators a view's
    transforms read are seeded: torchvision's transforms read torch's CPU generator, lightly's
    blur and solarisation numpy's. ``torch.manual_seed`` is not called: it also seeds every
    accelerator's generators, and with numpy's state copies it made the seeding cost about
    250 us per view; this costs about 10 us without numpy.
    """
    generator = torch.default_generator
    torch_state = generator.get_state()
    np_state = np.random.get_state() if numpy else None
    generator.manual_seed(seed)
    if numpy:
        np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        if np_state is not None:
            np.random.set_state(np_state)


class EpochSampler(Sampler[tuple[int, int]]):
    """This process's share of a per-epoch permutation, as ``(epoch, index)`` keys.

    The permutation of epoch ``e`` is drawn from ``(seed, e)``; with ``world_size`` processes
    it is cut to a multiple of ``world_size`` (dropping at most ``world_size - 1`` samples) and
    process ``rank`` takes every ``world_size``-th item from ``rank`` on. :meth:`resume_at`
    makes the next pass over epoch ``e`` start after ``batches`` batches of ``batch_size``.

    The share's last, incomplete batch of ``batch_size`` is dropped too when ``drop_last`` is
    set, or when it would hold fewer than ``min_last_batch`` samples (``2``: no batch of one
    sample, which BatchNorm cannot train on). The shares of all processes have the same length,
    so every process runs the same number of steps with batches of the same size; which
    samples are dropped changes with the epoch's permutation. :attr:`dropped` counts the
    samples of an epoch that no process yields.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        min_last_batch: int = 1,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need samples and a batch size, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.min_last_batch = min_last_batch
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        share = num_samples // world_size
        rest = share % batch_size
        #: whether the share's last batch is dropped for being shorter than ``min_last_batch``
        self.short_batch_dropped = 0 < rest < min_last_batch and not drop_last
        self._length = share - rest if rest and (drop_last or rest < min_last_batch) else share

    @property
    def dropped(self) -> int:
        """Samples of an epoch that no process yields (the same number every epoch)."""
        return self.num_samples - self.world_size * self._length

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (Lightning calls this at the start of every epoch)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches the next time epoch ``epoch`` is iterated."""
        self._resume = (int(epoch), int(batches))

    def order(self, epoch: int) -> list[int]:
        """This process's dataset indices of ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, ORDER_STREAM, epoch))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        usable = self.num_samples - self.num_samples % self.world_size
        return perm[self.rank : usable : self.world_size][: self._length].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1] * self.batch_size
        self._resume = None
        return iter([(epoch, i) for i in self.order(epoch)[start:]])

    def __len__(self) -> int:
        return self._length


def batch_bounds(num_samples: int, batch_size: int, min_batch: int = MIN_BATCH) -> list[range]:
    """Consecutive batches ``range(start, stop)`` covering ``0 .. num_samples - 1``.

    Batches hold ``batch_size`` samples; a last one of fewer than ``min_batch`` samples joins
    the batch before it (which then holds up to ``batch_size + min_batch - 1``), so no sample
    is left out and no batch is too short for BatchNorm, unless ``num_samples`` itself is
    below ``min_batch`` (one short batch then) or ``batch_size`` is. Raises ``ValueError``
    for ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = list(range(0, num_samples, batch_size))
    if len(starts) > 1 and num_samples - starts[-1] < min_batch:
        starts.pop()
    return [range(a, b) for a, b in zip(starts, [*starts[1:], num_samples], strict=False)]


SETTINGS = ("seed", "batch_size", "num_samples", "world_size")


def restore_position(sampler: EpochSampler, state: dict[str, Any]) -> None:
    """Point ``sampler`` at the batch after a saved position (see :class:`ResumableDataLoader`).

    A position saved at the end of an epoch continues with the next epoch; one saved within an
    epoch continues that epoch after its consumed batches. A position taken with other settings
    (seed, batch size, dataset size, number of processes) is ignored with a warning.
    """
    if any(state.get(key) != getattr(sampler, key) for key in SETTINGS):
        warnings.warn(
            "the checkpoint's data position was taken with another seed, batch size, dataset "
            "size or number of processes; the resumed run starts its epoch from the first batch",
            stacklevel=2,
        )
        sampler.set_epoch(state.get("epoch", 0))
        return
    if state["epoch_done"]:
        sampler.set_epoch(state["epoch"] + 1)
    else:
        sampler.set_epoch(state["epoch"])
        sampler.resume_at(state["epoch"], state["batches_done"])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position goes into checkpoints.

    ``position`` returns the position to save: the sampler's settings, its ``epoch``, the
    ``batches_done`` in it and whether the epoch is done (the loader cannot count batches
    itself: they are fetched ahead). ``len()`` stays the full epoch; after a mid-epoch restore
    the first pass yields only the remaining batches, as Lightning expects of a stateful loader.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        position: Callable[[], dict[str, Any]],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        """The data position (Lightning stores it with the fit loop)."""
        return self.position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after a saved position."""
        restore_position(self.sampler, state)  # type: ignore[arg-type]
