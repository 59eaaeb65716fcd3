"""The Lightning data module behind every training run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ssl_lib.backdoor.poison import PoisonedDataset
from ssl_lib.data.augment import SPECS, photometric_batch, spec_for_size
from ssl_lib.data.dali import DaliLoader
from ssl_lib.data.datasets import (
    DataError,
    IndexedDataset,
    build_base_dataset,
    labelled_mask,
    subsample,
)
from ssl_lib.data.sampling import (
    MIN_BATCH,
    SETTINGS,
    EpochSampler,
    ResumableDataLoader,
    restore_position,
)
from ssl_lib.data.transforms import MultiView


def local_batch_size(batch_size: int, world_size: int) -> int:
    """The per-process share of the global ``data.batch_size`` over ``world_size`` processes.

    Raises :class:`DataError` when it does not split evenly.
    """
    if batch_size % world_size:
        raise DataError(
            f"data.batch_size={batch_size} (global) does not divide evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    return batch_size // world_size


class SSLDataModule(pl.LightningDataModule):
    """Training data for a ``data`` config section: ``(views, label, index)`` batches.

    ``data.batch_size`` is the global batch; each of the ``world_size`` processes loads
    ``batch_size / world_size`` samples per step. A last batch of an epoch that would give each
    process one sample is dropped (a warning says so once), as ``data.drop_last`` drops any
    incomplete one; :attr:`dropped_samples` counts the samples of an epoch left out, and the
    methods log it as ``train/dropped_samples``.
    """

    def __init__(self, data_cfg, seed: int = 0) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.train_set: IndexedDataset | None = None
        self._labelled: torch.Tensor | None = None
        self._loader: ResumableDataLoader | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's data position
        #: samples of each epoch that no process trains on (set by :meth:`train_dataloader`)
        self.dropped_samples: int | None = None

    def build_train_set(self) -> IndexedDataset:
        """The indexed, multi-view training set (built once)."""
        if self.train_set is None:
            base = build_base_dataset(self.cfg)
            if self.cfg.poison is not None:  # on the fly, before any subset is taken
                base = PoisonedDataset(base, self.cfg.poison)
            base = subsample(base, self.cfg.max_samples, self.seed)
            views = MultiView(self.cfg.views, self.cfg.image_size, self.cfg.augment_on)
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
        return local_batch_size(self.cfg.batch_size, world_size)

    def sampler(self, world_size: int = 1, rank: int = 0) -> EpochSampler:
        """The :class:`EpochSampler` of process ``rank``: its share of every epoch."""
        return EpochSampler(
            len(self.build_train_set()),
            self.local_batch_size(world_size),
            self.seed,
            rank,
            world_size,
            drop_last=self.cfg.drop_last,
            min_last_batch=MIN_BATCH,
        )

    def check(self, world_size: int = 1) -> None:
        """Build the training set and check the batch fits it (before any run folder exists).

        Raises :class:`DataError` when the global batch does not split evenly over
        ``world_size`` processes, or when an epoch would hold no batch to train on.
        """
        ds = self.build_train_set()
        batch = self.local_batch_size(world_size)
        if self.cfg.drop_last and batch > len(ds) // world_size:
            raise DataError(
                f"data.batch_size={self.cfg.batch_size} is larger than the dataset "
                f"({len(ds)} samples): no full batch could be formed. Lower data.batch_size, "
                "or set data.drop_last=false."
            )
        if len(self.sampler(world_size)) == 0:  # under 2 samples per process, batches of more
            raise DataError(
                f"the dataset ({len(ds)} samples) gives each of {world_size} process(es) fewer "
                f"than {MIN_BATCH} samples per epoch, and a batch of one sample cannot train "
                f"BatchNorm: use at least {MIN_BATCH * world_size} samples"
            )
        self.labelled_mask()

    def train_dataloader(self) -> DataLoader | DaliLoader:
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
        method = trainer.lightning_module if trainer is not None else None
        if hasattr(method, "check_batch"):  # the world size is certain only now
            method.check_batch(batch, world)
        rank = trainer.global_rank if trainer is not None else 0
        sampler = self.sampler(world, rank)
        self.dropped_samples = sampler.dropped
        left_out = []
        if len(ds) % world and not self.cfg.drop_last:
            left_out.append(f"{len(ds) % world} so that the {world} processes get equal shares")
        if sampler.short_batch_dropped:
            left_out.append(
                f"{world} that would make a last batch of one sample per process, which "
                "BatchNorm cannot train on"
            )
        if left_out:
            rank_zero_warn(
                f"each epoch trains on {len(ds) - sampler.dropped} of {len(ds)} samples "
                f"(data.batch_size={self.cfg.batch_size} over {world} process(es)): it leaves "
                f"out {' and '.join(left_out)}; counted as train/dropped_samples"
            )
        if self._restored is not None:
            restore_position(sampler, self._restored)
            self._restored = None
        elif trainer is not None:
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        if self.cfg.loader == "dali":
            self._loader = self._dali_loader(ds, sampler, batch)
            return self._loader
        self._loader = ResumableDataLoader(
            ds,
            sampler,
            position=self.position,
            batch_size=batch,  # the sampler drops what data.drop_last drops
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            # Its own generator: starting an epoch must not draw from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._loader

    def _dali_loader(self, ds: IndexedDataset, sampler: EpochSampler, batch: int) -> DaliLoader:
        """``data.loader: dali``: DALI decodes and crops on the training GPU (on the CPU when
        training runs there)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return DaliLoader(
            ds,
            sampler,
            self.position,
            self.cfg.views,
            self.cfg.image_size,
            batch,
            num_threads=self.cfg.num_workers,
            device_id=device.index if device is not None and device.type == "cuda" else None,
            max_image_pixels=self.cfg.max_image_pixels,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``data.augment_on: device``, finish the views on the training device.

        The loader workers send each view as uint8 crops with their photometric parameters
        (drawn from the sample's seed, so a resumed run sees the same views); here the
        photometric part runs batched (:func:`~ssl_lib.data.augment.photometric_batch`).
        Batches of finished views pass unchanged.
        """
        views = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if not isinstance(views, list) or not views or not isinstance(views[0], dict):
            return batch
        specs = [spec_for_size(SPECS[name], self.cfg.image_size) for name in self.cfg.views]
        finished = [
            photometric_batch(view["image"], view["params"], spec)
            for view, spec in zip(views, specs, strict=True)
        ]
        return (finished, *batch[1:])

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
