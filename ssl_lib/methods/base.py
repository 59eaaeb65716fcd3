"""``SSLMethod``: the LightningModule every method extends.

It owns the backbone, the optional projector / predictor and the optional EMA target
(a copy of backbone + projector), and does everything the methods share: optimiser and
schedules, the EMA update with cross-process shuffle-BN for the target, the memory bank of
bank methods, logging and ``forward(x)`` = backbone features. A method implements
:meth:`SSLMethod.compute_loss` (how the views flow and which pure loss applies).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightly.models.utils import update_momentum
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from ssl_lib.config import ConfigError, MethodConfig, config_from_dict
from ssl_lib.distributed import shuffle_batch, unshuffle_batch, world_size
from ssl_lib.memory import MemoryBank
from ssl_lib.models import MLPConfig, build_backbone, build_mlp
from ssl_lib.optim import build_optimizer, ema_momentum, lr_factor


class SSLMethod(pl.LightningModule):
    """Base class. Subclasses set ``config_class`` and implement ``compute_loss``.

    Class attributes:
        config_class: the dataclass of the method's ``method:`` config section.
        needs_predictor: the method uses ``model.predictor``.
        uses_target: the method keeps an EMA target of backbone + projector.
    """

    config_class: type[MethodConfig] = MethodConfig
    needs_predictor: bool = False
    uses_target: bool = False

    def __init__(self, config: DictConfig | dict[str, Any]) -> None:
        super().__init__()
        cfg = config if isinstance(config, DictConfig) else config_from_dict(config)
        self.cfg = cfg
        self.nonfinite_skipped = 0  # batches skipped for a NaN / Inf loss (trainer.nonfinite)
        self._skip_step = False
        self._undo: list[tuple[Tensor, Tensor]] | None = None
        self._restored_rng: dict | None = None
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.backbone = build_backbone(cfg.model.backbone)
        proj_cfg = cfg.model.projector
        self.projector = self.build_projector(proj_cfg)
        self.embed_dim = proj_cfg.out_dim if proj_cfg else self.backbone.feat_dim
        self.predictor: nn.Module = nn.Identity()
        if self.needs_predictor:
            if cfg.model.predictor is None:
                raise ValueError(f"method '{cfg.method.name}' needs model.predictor (got null)")
            if cfg.model.predictor.out_dim != self.embed_dim:
                raise ValueError(
                    f"model.predictor.out_dim ({cfg.model.predictor.out_dim}) must equal the "
                    f"embedding dim {self.embed_dim} (model.projector.out_dim, or the backbone's "
                    "feature dim without a projector): predictions are compared with targets"
                )
            self.predictor = build_mlp(self.embed_dim, cfg.model.predictor)
        if self.uses_target:
            self.target = nn.ModuleDict(
                {
                    "backbone": copy.deepcopy(self.backbone),
                    "projector": copy.deepcopy(self.projector),
                }
            )
            self.target.requires_grad_(False)

    @classmethod
    def prepare_config(cls, cfg: DictConfig, datamodule: Any) -> None:
        """Fill config values that come from the training data, before the method is built.

        Called by :func:`ssl_lib.train.train` after the data were checked, so the resolved
        values land in the run's ``config.yaml`` and checkpoint (e.g. the dataset size that
        sizes CMSF's per-image caches). Raises ``ConfigError`` when data and config disagree.
        """

    # ----------------------------------------------------------------- batch size
    def batch_trained_modules(self) -> list[nn.Module]:
        """The modules that run in training mode on each training batch (target included)."""
        modules = list(self.trainable_modules())
        if self.uses_target:
            modules.append(self.target)
        return modules

    @torch.no_grad()
    def one_sample_batchnorms(self) -> list[str]:
        """Names of the BatchNorm layers that a per-process batch of one image cannot train.

        A BatchNorm in training mode needs more than one value per channel: every
        ``BatchNorm1d`` on feature vectors (projector, predictor and other heads) fails with
        one sample, and a ``BatchNorm2d`` of the backbone fails when its feature map is 1 x 1
        at ``data.image_size`` (found with one forward pass of the backbone on a 1-image
        batch, in eval mode, which changes no statistics).
        """
        names = {id(m): name for name, m in self.named_modules()}
        norms = [
            m
            for module in self.batch_trained_modules()
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        single: dict[int, bool] = {}

        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            single[id(module)] = x.numel() // max(x.shape[1], 1) <= 1

        hooks = [m.register_forward_pre_hook(record) for m in norms]
        modes = [(m, m.training) for m in self.backbone.modules()]
        try:
            size = self.cfg.data.image_size
            param = next(self.backbone.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            self.backbone.eval()(torch.zeros(1, 3, size, size, device=device))
        finally:
            for hook in hooks:
                hook.remove()
            for module, training in modes:
                module.training = training
        found = []
        for m in norms:
            # not reached by the backbone pass: a head's BatchNorm on (batch, features) rows
            rows = isinstance(m, (nn.BatchNorm1d, nn.SyncBatchNorm))
            name = names.get(id(m), type(m).__name__)
            if single.get(id(m), rows) and name not in found:
                found.append(name)
        return found

    def check_batch(self, per_process: int, world: int) -> None:
        """Raise ``ConfigError`` if per-process batches of ``per_process`` samples (``world``
        processes) cannot train this method: one sample with BatchNorm in training."""
        if per_process >= 2:
            return
        layers = self.one_sample_batchnorms()
        if layers:
            shown = ", ".join(layers[:3]) + (
                f" and {len(layers) - 3} more" if len(layers) > 3 else ""
            )
            raise ConfigError(
                f"data.batch_size={self.cfg.data.batch_size} gives each of {world} process(es) "
                f"batches of {per_process} sample, but the BatchNorm layers {shown} need at "
                f"least 2 samples per process in training: set data.batch_size to a multiple "
                f"of {world} of at least {2 * world}"
            )

    # ----------------------------------------------------------------- networks
    def build_projector(self, proj_cfg: MLPConfig | None) -> nn.Module:
        """The online projector on the backbone features (``nn.Identity`` for ``null``).

        Methods with several projectors (blockwise training: one per block) override this.
        """
        return build_mlp(self.backbone.feat_dim, proj_cfg) if proj_cfg else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features: what evaluators probe."""
        return self.backbone(x)

    def project(self, x: Tensor) -> Tensor:
        """Online backbone + projector."""
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def target_project(self, x: Tensor) -> Tensor:
        """Target (EMA) backbone + projector, without gradients, in train mode (own BN stats).

        With ``method.shuffle_bn`` and several processes, the global batch is shuffled across
        ranks before the forward pass and restored after it (MoCo's shuffle-BN), so the target's
        BN statistics come from a random subset of the global batch. In one process a shuffle
        would not change BN statistics, so none is done.
        """
        shuffle = self.cfg.method.shuffle_bn and world_size() > 1
        if shuffle:
            x, unshuffle_idx = shuffle_batch(x)
        z = self.target["projector"](self.target["backbone"](x))
        return unshuffle_batch(z, unshuffle_idx) if shuffle else z

    def build_bank(
        self, min_size: int, why: str, payloads: tuple[str, ...] = ("labels",)
    ) -> MemoryBank:
        """A memory bank of ``method.bank_size`` target embeddings with int64 ``payloads``.

        Its width is the embedding dim; it is a submodule, so checkpoints save it. ``min_size``
        is the least size the method can work with (``why`` explains it in the error).
        """
        m = self.cfg.method
        if m.bank_size < min_size:
            raise ValueError(f"method.bank_size ({m.bank_size}) must be >= {min_size}: {why}")
        return MemoryBank(
            m.bank_size,
            self.embed_dim,
            payloads=payloads,
            dtype=m.bank_dtype,
            backend=m.search_backend,
            seed=self.cfg.run.seed,
        )

    def searched_banks(self) -> list[tuple[MemoryBank, int]]:
        """``(bank, k)`` for each top-``k`` search of a bank that a training step makes.

        Their ``search_backend: auto`` is settled when training starts (:meth:`on_train_start`),
        on every process together. The base searches no bank.
        """
        return []

    def enqueue_after_step(self, rows: Tensor, **payloads: Tensor) -> None:
        """Enqueue ``rows`` into ``self.bank`` once the optimiser step is done.

        For methods whose loss reads the bank before this step's rows go in (ISD, MoCo): the
        backward pass still needs the bank as the loss saw it, so writing it later replaces the
        per-step copy of the whole bank the original code makes. The next step sees the rows.
        """
        self._pending_enqueue = (rows.detach(), payloads)

    def flush_enqueue(self) -> None:
        """Write the rows held by :meth:`enqueue_after_step` (called after each train batch)."""
        pending = getattr(self, "_pending_enqueue", None)
        if pending is not None:
            self._pending_enqueue = None
            self.bank.enqueue(pending[0], **pending[1])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.flush_enqueue()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the pending bank rows and the per-step LR schedule.

        Both happen here rather than at the end of the batch so that a checkpoint written at the
        end of a batch (every N steps) already holds them: resuming from it is exact.
        """
        super().optimizer_step(*args, **kwargs)
        if self._skip_step:
            self._pending_enqueue = None
        self.flush_enqueue()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """A no-op: :meth:`optimizer_step` steps the schedule."""

    def online_modules(self) -> list[nn.Module]:
        """The modules the target averages: backbone and projector."""
        return [self.backbone, self.projector]

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates (everything but the target)."""
        return [m for name, m in self.named_children() if name != "target"]

    # ----------------------------------------------------------------- training
    def compute_loss(
        self, views: list[Tensor], labels: Tensor, index: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the loss and extra values to log. Implemented by each method."""
        raise NotImplementedError

    @property
    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    def current_ema_momentum(self) -> float:
        m = self.cfg.method
        return ema_momentum(
            m.ema_schedule, m.ema_momentum, m.ema_final, self.global_step, self.total_steps
        )

    def update_target(self) -> None:
        """EMA step, run before the target's forward pass (as the UMBC code does)."""
        momentum = self.current_ema_momentum()
        # lightly's update_momentum averages parameters only, as the UMBC code does.
        update_momentum(self.backbone, self.target["backbone"], momentum)
        update_momentum(self.projector, self.target["projector"], momentum)
        self.log("train/ema_momentum", momentum)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views, labels, index = batch
        skip_mode = self.cfg.trainer.nonfinite == "skip"
        undo = self._begin_undo() if skip_mode else None
        if self.uses_target:
            self.update_target()
        loss, extra = self.compute_loss(views, labels, index)
        self._skip_step = False
        if self._loss_is_bad(loss):
            if not skip_mode:
                raise NonFiniteLossError(
                    f"{self._nonfinite_message(loss, extra, batch_idx)}. No optimiser step was "
                    "taken and no checkpoint of this state written. Lower optim.lr (or add a "
                    "warm-up), or set trainer.nonfinite=skip to skip such batches"
                )
            self._skip_batch(undo, loss, extra, batch_idx)
            return loss  # the backward pass runs; then on_before_optimizer_step undoes the batch
        if undo is not None:
            self._end_undo(undo, revert=False)
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
        batch_size = views[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for key, value in extra.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        lr = self.optimizers().param_groups[0]["lr"]
        self.log("train/lr", lr)
        # Means over the epoch (all processes) for metrics.json and the run's plots; the values
        # above are those of the epoch's last step there.
        epoch_mean = {"on_step": False, "on_epoch": True, "sync_dist": True}
        self.log("train/loss_epoch", loss, batch_size=batch_size, **epoch_mean)
        self.log("train/lr_epoch", lr, batch_size=batch_size, **epoch_mean)
        dropped = getattr(getattr(self._trainer, "datamodule", None), "dropped_samples", None)
        if dropped is not None:  # samples of each epoch no process trains on
            self.log("train/dropped_samples", float(dropped))
        return loss

    # ------------------------------------------------------- non-finite losses
    def _loss_is_bad(self, loss: Tensor) -> bool:
        """Whether the loss is NaN or infinite on any process (all processes agree)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is None:
            return bad
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    def _nonfinite_message(self, loss: Tensor, extra: dict[str, Tensor], batch_idx: int) -> str:
        terms = ", ".join(f"{k}={float(v):.6g}" for k, v in extra.items()) or "none"
        return (
            f"non-finite loss at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}): loss={float(loss):.6g}; loss terms: {terms}"
        )

    def _begin_undo(self) -> list[tuple[Tensor, Tensor]]:
        """Copies of what a forward pass and the EMA update change (banks and per-image caches
        keep a journal of their writes instead)."""
        banks = [m for m in self.modules() if hasattr(m, "record_undo")]  # banks and caches
        in_bank = {id(t) for b in banks for t in b.buffers()}
        tensors = [t for t in self.buffers() if id(t) not in in_bank]
        if self.uses_target:
            tensors += list(self.target.parameters())
        for bank in banks:
            bank.record_undo()
        return [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def _end_undo(self, undo: list[tuple[Tensor, Tensor]], revert: bool) -> None:
        for bank in (m for m in self.modules() if hasattr(m, "record_undo")):
            bank.stop_undo(revert)
        if revert:
            for tensor, copy in undo:
                tensor.copy_(copy)

    def _skip_batch(
        self, undo: list | None, loss: Tensor, extra: dict[str, Tensor], batch_idx: int
    ) -> None:
        """Skip mode: mark the batch; :meth:`on_before_optimizer_step` undoes it."""
        self._undo = undo
        self._pending_enqueue = None
        self._skip_step = True
        self.nonfinite_skipped += 1
        rank_zero_warn(f"skipping the batch: {self._nonfinite_message(loss, extra, batch_idx)}")
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """For a skipped batch: drop the gradients (the optimiser then changes nothing) and
        restore the EMA target, BatchNorm statistics and banks (after the backward pass, which
        may still need the tensors as they were)."""
        if not self._skip_step:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if self._undo is not None:
            self._end_undo(self._undo, revert=True)
            self._undo = None

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random generators' states and the skipped-batch count with the run."""
        checkpoint["ssl_lib"] = {
            "rng_states": collect_rng_states(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ssl_lib", {})
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self._restored_rng = state.get("rng_states")

    def on_train_start(self) -> None:
        """Settle the searched banks' backends (every process runs this hook together), then
        restore the random generators of a resumed run just before its first batch."""
        per_process = self.cfg.data.batch_size // self.trainer.world_size
        for bank, k in self.searched_banks():
            bank.choose_backend(per_process, k)
        if self._restored_rng is not None:
            set_rng_states(self._restored_rng)
            self._restored_rng = None

    def configure_optimizers(self) -> dict:
        cfg = self.cfg.optim
        optimizer = build_optimizer(self.trainable_modules(), cfg, self.cfg.data.batch_size)
        total = self.total_steps  # also makes Lightning count the training batches
        steps_per_epoch = self.trainer.num_training_batches
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            steps_per_epoch = total
        max_epochs = max(1, -(-total // steps_per_epoch))

        def factor(step: int) -> float:
            return lr_factor(
                cfg.schedule,
                step,
                steps_per_epoch,
                max_epochs,
                warmup_epochs=cfg.warmup_epochs,
                final_ratio=cfg.final_lr_ratio,
                milestones=cfg.milestones,
                gamma=cfg.gamma,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``trainer.nonfinite: stop``); the message says where."""


def collect_rng_states() -> dict[str, Any]:
    """The states of torch (CPU and current CUDA device), numpy and ``random`` generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {  # tensors and plain values: loadable with weights_only
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


def neighbour_purity(neighbour_labels: Tensor, labels: Tensor) -> Tensor | None:
    """Share of neighbours (``B x k`` stored labels) whose label equals their query's label.

    Only queries with a known label (>= 0) count; ``None`` when there is none.
    """
    known = labels >= 0
    if not bool(known.any()):
        return None
    return (neighbour_labels[known] == labels[known].unsqueeze(1)).float().mean()
