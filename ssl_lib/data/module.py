"""The Lightning data module behind every training run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ssl_lib.data.datasets import (
    DataError,
    IndexedDataset,
    build_base_dataset,
    labelled_mask,
    subsample,
)
from ssl_lib.data.sampling import SETTINGS, EpochSampler, ResumableDataLoader, restore_position
from ssl_lib.data.transforms import MultiView


class SSLDataModule(pl.LightningDataModule):
    """Training data for a ``data`` config section: ``(views, label, index)`` batches.

    ``data.batch_size`` is the global batch; each of the ``world_size`` processes loads
    ``batch_size / world_size`` samples per step.
    """

    def __init__(self, data_cfg, seed: int = 0) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.train_set: IndexedDataset | None = None
        self._labelled: torch.Tensor | None = None
        self._loader: ResumableDataLoader | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's data position

    def build_train_set(self) -> IndexedDataset:
        """The indexed, multi-view training set (built once)."""
        if self.train_set is None:
            base = subsample(build_base_dataset(self.cfg), self.cfg.max_samples, self.seed)
            views = MultiView(self.cfg.views, self.cfg.image_size)
            self.train_set = IndexedDataset(base, views, self.seed)
        return self.train_set

    def labelled_mask(self) -> torch.Tensor | None:
        """Bool mask of the labelled training images (``None`` without a labelled subset)."""
        if self.cfg.labelled_subset is None and self.cfg.labelled_fraction is None:
            return None
        if self._labelled is None:
            self._labelled = labelled_mask(
                self.build_train_set().base,
                self.cfg.labelled_subset,
                self.cfg.labelled_fraction,
                root=self.cfg.root,
                seed=self.seed,
            )
        return self._labelled

    def setup(self, stage: str | None = None) -> None:
        self.build_train_set()

    def local_batch_size(self, world_size: int) -> int:
        """Per-process batch size; the global batch must split evenly."""
        if self.cfg.batch_size % world_size:
            raise DataError(
                f"data.batch_size={self.cfg.batch_size} (global) does not divide evenly over "
                f"{world_size} processes; use a multiple of {world_size}"
            )
        return self.cfg.batch_size // world_size

    def check(self, world_size: int = 1) -> None:
        """Build the training set and check the batch fits it (before any run folder exists)."""
        ds = self.build_train_set()
        batch = self.local_batch_size(world_size)
        if self.cfg.drop_last and batch > len(ds) // world_size:
            raise DataError(
                f"data.batch_size={self.cfg.batch_size} is larger than the dataset "
                f"({len(ds)} samples): no full batch could be formed. Lower data.batch_size, "
                "or set data.drop_last=false."
            )
        self.labelled_mask()

    def train_dataloader(self) -> DataLoader:
        """A resumable loader: order and augmentations are functions of the run seed.

        Each process reads its share of a per-epoch permutation (:class:`EpochSampler`, so the
        Trainer must not add a distributed sampler). The position is saved with checkpoints
        (:meth:`state_dict`) and restored here, before the first batch is drawn.
        """
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        self.check(world)
        ds = self.build_train_set()
        batch = self.local_batch_size(world)
        rank = trainer.global_rank if trainer is not None else 0
        sampler = EpochSampler(len(ds), batch, self.seed, rank, world)
        if self._restored is not None:
            restore_position(sampler, self._restored)
            self._restored = None
        elif trainer is not None:
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        self._loader = ResumableDataLoader(
            ds,
            sampler,
            position=self.position,
            batch_size=batch,
            drop_last=self.cfg.drop_last,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            # Its own generator: starting an epoch must not draw from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._loader

    def position(self) -> dict[str, Any]:
        """Where training is in the data: epoch, batches consumed, and the order's settings."""
        if self._loader is None:
            return {}
        sampler: EpochSampler = self._loader.sampler  # type: ignore[assignment]
        done, total = 0, len(self._loader)
        if self.trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            total = self.trainer.num_training_batches
        state = {key: getattr(sampler, key) for key in SETTINGS}
        return {**state, "epoch": sampler.epoch, "batches_done": done, "epoch_done": done >= total}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the data position."""
        return self.position()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the loader is built (Lightning restores data modules first)."""
        self._restored = state_dict or None
