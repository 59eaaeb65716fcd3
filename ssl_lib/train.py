"""Running a recipe: the run folder, the Trainer, checkpoints, TensorBoard and metrics JSON.

A run folder holds everything about one run::

    runs/<name>/config.yaml          resolved config (what actually ran)
    runs/<name>/checkpoints/         last.ckpt (every epoch, every N steps, on SIGTERM) and
                                     epochNNNN.ckpt every N epochs; all written atomically
    runs/<name>/tensorboard/         TensorBoard event files
    runs/<name>/metrics.json         per-epoch history and the final values
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, Strategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_lib.checkpoints import (
    CheckpointError,
    atomic_save,
    check_resumable,
    read_checkpoint,
)
from ssl_lib.config import ConfigError, build_config
from ssl_lib.data import SSLDataModule
from ssl_lib.eval.monitors import build_monitors
from ssl_lib.methods import build_method, prepare_config
from ssl_lib.methods.base import NonFiniteLossError

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a run ended by SIGTERM


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsJSON(pl.Callback):
    """Writes ``metrics.json``: one record per epoch plus the latest values."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[dict] = []
        if path.is_file():  # resuming: keep the earlier epochs
            self.history = json.loads(path.read_text()).get("history", [])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
        self.history = [r for r in self.history if r["epoch"] < trainer.current_epoch] + [record]
        atomic_write_text(
            self.path, json.dumps({"history": self.history, "final": record}, indent=2)
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes every checkpoint with :func:`atomic_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, path)


class LastCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` at every epoch end, every ``every_n_steps`` optimiser steps, when
    training ends, and when SIGTERM stops the run.

    Lightning stops a run that received SIGTERM between two batches by raising
    ``SIGTERMException``; the checkpoint written then resumes exactly at the next batch. Other
    exceptions (a NaN loss, a crash) write nothing: ``last.ckpt`` stays the last good state.
    """

    def __init__(self, path: Path, every_n_steps: int = 0) -> None:
        self.path = path
        self.every_n_steps = every_n_steps
        self._saved_step: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n, step = self.every_n_steps, trainer.global_step
        last_of_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if n > 0 and step > 0 and step % n == 0 and not last_of_epoch:
            self._save(trainer)  # the epoch end writes the last batch's checkpoint

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step:  # e.g. max_steps reached within an epoch
            self._save(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)


def new_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/name``, or ``name_1``, ``name_2``... so an earlier run is never overwritten."""
    base = Path(cfg.run.output_dir) / cfg.run.name
    path, n = base, 0
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


RUN_DIR_ENV = "SSL_LIB_RUN_DIR"
LAUNCH_WAIT_S = 600.0


def _launcher_rank() -> int:
    """This process's rank as set by a launcher (Lightning's DDP, torchrun, SLURM); 0 alone."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _launch_id() -> str | None:
    """An id shared by the processes of one external launch (torchrun or SLURM), if any."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun-" + os.environ["TORCHELASTIC_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def run_dir_for_process(cfg: DictConfig) -> Path:
    """The run folder, the same for every process of one run.

    Rank 0 picks a new folder (:func:`new_run_dir`). Processes that Lightning's DDP launcher
    starts inherit it through the environment; processes started by torchrun or SLURM read it
    from a marker file that rank 0 leaves in ``run.output_dir`` for their launch.
    """
    rank = _launcher_rank()
    if rank > 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    launch = _launch_id()
    marker = Path(cfg.run.output_dir) / f".{cfg.run.name}.{launch}.run_dir"
    if rank > 0 and launch is not None:
        deadline = time.monotonic() + LAUNCH_WAIT_S
        while not marker.is_file():
            if time.monotonic() > deadline:
                raise ConfigError(f"rank {rank}: rank 0 did not create the run folder ({marker})")
            time.sleep(0.5)
        return Path(marker.read_text().strip())
    run_dir = new_run_dir(cfg)
    run_dir.mkdir(parents=True)
    if launch is not None:
        atomic_write_text(marker, str(run_dir))
    os.environ[RUN_DIR_ENV] = str(run_dir)  # for the processes Lightning starts from this one
    return run_dir


def find_resume(target: str) -> tuple[Path, Path]:
    """(run folder, checkpoint) for ``--resume RUN_DIR`` or ``--resume path/to.ckpt``."""
    path = Path(target)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"run folder '{path}' has no checkpoints/last.ckpt to resume from")
        return path, ckpt
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"no config.yaml in '{run_dir}' (the run folder of '{path}')")
        return run_dir, path
    raise ConfigError(f"--resume '{target}': no such run folder or checkpoint")


def build_strategy(name: str) -> str | Strategy:
    """``trainer.strategy``; ``ddp`` / ``ddp_spawn`` without DDP's per-step buffer broadcast.

    Memory banks are kept identical on every rank by all-gathered writes, so broadcasting them
    from rank 0 before every forward pass would only copy K x D floats per step for nothing.
    """
    if name in ("ddp", "ddp_spawn"):
        start = "spawn" if name == "ddp_spawn" else "popen"
        return DDPStrategy(start_method=start, broadcast_buffers=False)
    return name


def _describe_checkpoint(path: Path) -> str:
    """``'path' (global step N)``, or why there is none."""
    if not path.is_file():
        return "none was written yet"
    try:
        step = read_checkpoint(path, mmap=True).get("global_step")
    except CheckpointError as err:
        return str(err)
    return f"'{path}' (global step {step})"


def train(
    cfg: DictConfig,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> Path:
    """Train ``cfg`` in ``run_dir`` (a new folder if ``None``); return the run folder.

    ``callbacks`` are added after the built-in ones. A NaN / Inf loss raises
    :class:`NonFiniteLossError` (``trainer.nonfinite: stop``); SIGTERM writes ``last.ckpt`` and
    exits with status 143.
    """
    if cfg.trainer.checkpoint_every_n_steps < 0:
        raise ConfigError(
            f"trainer.checkpoint_every_n_steps must be >= 0 (0 = off), got "
            f"{cfg.trainer.checkpoint_every_n_steps}"
        )
    if resume_from is not None:
        check_resumable(resume_from, cfg.method.name)
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = SSLDataModule(cfg.data, cfg.run.seed)
    datamodule.check()  # bad data fails here, before any run folder exists
    prepare_config(cfg, datamodule)  # data-dependent values (e.g. CMSF's dataset size)
    method = build_method(cfg)

    run_dir = run_dir if run_dir is not None else run_dir_for_process(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    ckpt_dir = run_dir / "checkpoints"
    t = cfg.trainer
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch{epoch:04d}",
            auto_insert_metric_name=False,
            every_n_epochs=t.checkpoint_every_n_epochs,
            save_top_k=-1,
        ),
        *build_monitors(cfg, datamodule.build_train_set(), method.backbone.feat_dim),
        MetricsJSON(run_dir / "metrics.json"),  # after the monitors: it records their values
        # after the monitors too: its checkpoints include their updates of the batch or epoch
        LastCheckpoint(ckpt_dir / "last.ckpt", t.checkpoint_every_n_steps),
        *callbacks,
    ]
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"),
        callbacks=callbacks,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy),
        precision=t.precision,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        enable_progress_bar=t.progress_bar,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module's EpochSampler splits the data
    )
    try:
        trainer.fit(
            method, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None
        )
    except NonFiniteLossError as err:
        last = _describe_checkpoint(ckpt_dir / "last.ckpt")
        raise NonFiniteLossError(f"{err}. Last good checkpoint: {last}") from None
    except SIGTERMException:
        if trainer.is_global_zero:
            print(
                f"ssl-lib: stopped by SIGTERM at global step {trainer.global_step}; checkpoint "
                f"{ckpt_dir / 'last.ckpt'} written; continue with: ssl-lib train --resume "
                f"{run_dir}",
                file=sys.stderr,
            )
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    if trainer.is_global_zero:
        print(f"run folder:   {run_dir}")
        print(f"config:       {run_dir / 'config.yaml'}")
        print(f"checkpoint:   {ckpt_dir / 'last.ckpt'}")
        print(f"metrics:      {run_dir / 'metrics.json'}")
        print(f"tensorboard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    return run_dir


def resume(target: str, overrides: list[str] = ()) -> Path:
    """Continue a run from its folder's last checkpoint (or a given checkpoint)."""
    run_dir, ckpt = find_resume(target)
    source = str(run_dir / "config.yaml")
    cfg = build_config([(source, OmegaConf.load(source))], overrides)
    if overrides:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    return train(cfg, run_dir=run_dir, resume_from=ckpt)
