"""``SSLMethod``: the LightningModule every method extends.

It owns the networks (backbone, optional projector / predictor, optional EMA target with
shuffle-BN), the optimiser and the learning-rate / EMA schedules, and the memory bank of bank
methods; ``forward(x)`` gives the backbone features. A method implements
:meth:`SSLMethod.compute_loss`: how the views flow and which pure loss applies.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from lightly.models.utils import update_momentum
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssl_lib.distributed import shuffle_batch, unshuffle_batch, world_size
from ssl_lib.memory import MemoryBank
from ssl_lib.methods.nonfinite import NonFiniteGuard, NonFiniteLossError
from ssl_lib.models import MLPConfig, build_backbone, build_mlp, one_sample_batchnorms
from ssl_lib.optim import build_optimizer, ema_momentum, lr_factor
from ssl_lib.rng import CHECKPOINT_KEY, RNGStateCheckpoint
from ssl_lib.schema import ConfigError, MethodConfig, build_run_config

__all__ = ["BankMethodConfig", "NonFiniteLossError", "SSLMethod", "TargetMethodConfig"]


@dataclass
class TargetMethodConfig(MethodConfig):
    """Methods with an EMA target (backbone + projector parameters).

    ``ema_schedule``: ``constant`` (UMBC code: m fixed) or ``cosine`` (BYOL: m rises from
    ``ema_momentum`` to ``ema_final`` over training, per step). ``shuffle_bn`` shuffles the
    target's batch across all ranks before its forward pass (MoCo / UMBC shuffle-BN).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {"ema_schedule": ("constant", "cosine")}

    ema_momentum: float = 0.99
    ema_schedule: str = "constant"
    ema_final: float = 1.0
    shuffle_bn: bool = True


@dataclass
class BankMethodConfig(TargetMethodConfig):
    """Methods with an EMA target and a memory bank of target embeddings (MoCo, ISD, MSF, CMSF).

    ``bank_size``: rows K (any size; writes wrap around). ``bank_dtype``: storage precision
    (``fp32`` / ``fp16`` / ``bf16``; search and losses are float32). ``search_backend``:
    nearest-neighbour backend of the bank (``auto`` / ``torch`` / ``faiss``).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "bank_dtype": ("fp32", "fp16", "bf16"),
        "search_backend": ("auto", "torch", "faiss"),
    }

    bank_size: int = 65536
    bank_dtype: str = "fp32"
    search_backend: str = "auto"


class SSLMethod(pl.LightningModule):
    """Base class. Subclasses set ``config_class`` and implement ``compute_loss``.

    One training step, in this order:

    1. EMA update of the target (:meth:`update_target`), with the momentum of this step. It
       runs before the target's forward pass, as in the UMBC code, which equals running it right
       after the previous optimiser step.
    2. Forward passes and loss (:meth:`compute_loss`). MSF and CMSF enqueue the step's targets
       into the bank here, before their search; MoCo and ISD hand theirs to
       :meth:`enqueue_after_step`.
    3. The non-finite check (``trainer.nonfinite``, :class:`NonFiniteGuard`) and logging.
    4. Backward pass (Lightning). A skipped batch then drops its gradients and takes back its
       other writes (:meth:`on_before_optimizer_step`).
    5. Optimiser step, then the bank flush of the rows held by :meth:`enqueue_after_step`, then
       the per-step learning-rate schedule (:meth:`optimizer_step`).

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
        if isinstance(config, DictConfig):
            cfg = config
        else:  # e.g. the config saved in a checkpoint
            cfg = build_run_config(self.config_class, [("config dict", OmegaConf.create(config))])
        self.cfg = cfg
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
        self._pending_enqueue: tuple[Tensor, dict[str, Tensor]] | None = None
        self.nonfinite = NonFiniteGuard(
            cfg.trainer.nonfinite, self, [self.target] if self.uses_target else []
        )

    @classmethod
    def prepare_config(cls, cfg: DictConfig, datamodule: Any) -> None:
        """Fill config values that come from the training data, before the method is built.

        Called by :func:`ssl_lib.train.train` after the data were checked, so the resolved
        values land in the run's ``config.yaml`` and checkpoint (e.g. the dataset size that
        sizes CMSF's per-image caches). Raises ``ConfigError`` when data and config disagree.
        """

    def check_batch(self, per_process: int, world: int) -> None:
        """Raise ``ConfigError`` if per-process batches of ``per_process`` samples (``world``
        processes) cannot train this method: one sample with BatchNorm in training."""
        if per_process >= 2:
            return
        trained = list(self.trainable_modules())
        if self.uses_target:
            trained.append(self.target)
        layers = one_sample_batchnorms(self, trained, self.backbone, self.cfg.data.image_size)
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
        """Write the rows held by :meth:`enqueue_after_step`."""
        pending, self._pending_enqueue = self._pending_enqueue, None
        if pending is not None:
            self.bank.enqueue(pending[0], **pending[1])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Write rows still held: none under Lightning's automatic optimisation, which calls
        :meth:`optimizer_step` every batch; those of a loop that steps the optimiser itself."""
        self.flush_enqueue()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the pending bank rows and the per-step LR schedule.

        Both happen here rather than at the end of the batch so that a checkpoint written at the
        end of a batch (every N steps) already holds them: resuming from it is exact.
        """
        super().optimizer_step(*args, **kwargs)
        if self.nonfinite.skipping:
            self._pending_enqueue = None
        self.flush_enqueue()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """A no-op: :meth:`optimizer_step` steps the schedule."""

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
        self.nonfinite.begin_step()
        if self.uses_target:
            self.update_target()
        loss, extra = self.compute_loss(views, labels, index)
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        skipped = self.nonfinite.check(loss, where, extra, self._trainer)
        if self.cfg.trainer.nonfinite == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite.skipped))
        if skipped:
            return loss  # the backward pass runs; then on_before_optimizer_step undoes the batch
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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """For a skipped batch: no gradients for the optimiser, and the EMA target, BatchNorm
        statistics and banks as they were before the batch (restored only now, after the
        backward pass, which may still need them)."""
        self.nonfinite.before_optimizer_step(optimizer)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the skipped-batch count with the run."""
        checkpoint.setdefault(CHECKPOINT_KEY, {})["nonfinite_skipped"] = self.nonfinite.skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY, {})
        self.nonfinite.skipped = int(state.get("nonfinite_skipped", 0))

    def on_train_start(self) -> None:
        """Settle the searched banks' backends; every process runs this hook together."""
        per_process = self.cfg.data.batch_size // self.trainer.world_size
        for bank, k in self.searched_banks():
            bank.choose_backend(per_process, k)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Random generators' states in every checkpoint, for an exact resume."""
        return [RNGStateCheckpoint()]

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
