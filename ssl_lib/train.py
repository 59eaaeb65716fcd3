"""Running a recipe: the run folder, the Trainer, checkpoints, TensorBoard and metrics JSON.

A run folder holds everything about one run::

    runs/<name>/config.yaml          resolved config (what actually ran)
    runs/<name>/checkpoints/         last.ckpt (every epoch, every N steps, on SIGTERM) and
                                     epochNNNN.ckpt every N epochs; all written atomically
    runs/<name>/tensorboard/         TensorBoard event files
    runs/<name>/metrics.json         per-epoch history, the final values, wall time, images/s
    runs/<name>/plots/               loss, LR and monitors over the epochs (PNG, at the end)
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, Strategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_lib import console, report
from ssl_lib.checkpoints import (
    CheckpointError,
    atomic_save,
    check_resumable,
    read_checkpoint,
)
from ssl_lib.config import ConfigError, build_config
from ssl_lib.data import SSLDataModule
from ssl_lib.distributed import is_dist
from ssl_lib.eval.monitors import build_monitors
from ssl_lib.files import atomic_write_text, run_folder_of, unused_path
from ssl_lib.methods import build_method, prepare_config
from ssl_lib.methods.base import NonFiniteLossError

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a run ended by SIGTERM


class MetricsJSON(pl.Callback):
    """Writes ``metrics.json``: one record per epoch, the latest values and the run's totals.

    Every process reads ``trainer.callback_metrics`` at each epoch end: reading it reduces the
    metrics logged with ``sync_dist`` across processes, a collective that each process must
    join. Only the first process writes the file. Every process keeps the history in memory
    (:attr:`history`), which the end of the run reads without any collective.

    Totals: ``wall_time_s`` is the wall-clock time of the training loop (monitors and
    checkpoints included, start-up not), ``images`` the training images of all processes, and
    ``images_per_s`` their ratio. Both counts are saved in checkpoints, so a resumed run adds
    to them from the checkpoint on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[dict] = []
        if path.is_file():  # resuming: keep the earlier epochs
            self.history = json.loads(path.read_text()).get("history", [])
        self.images = 0
        self._earlier_s = 0.0  # wall time before this process started training (resume)
        self._start: float | None = None

    def wall_time_s(self) -> float:
        """Training wall time so far, earlier sessions of a resumed run included (seconds)."""
        now = time.monotonic() - self._start if self._start is not None else 0.0
        return self._earlier_s + now

    def totals(self) -> dict[str, float]:
        """``wall_time_s``, ``images`` and ``images_per_s`` (0 before any time has passed)."""
        wall = self.wall_time_s()
        rate = self.images / wall if wall > 0 else 0.0
        return {"wall_time_s": wall, "images": self.images, "images_per_s": rate}

    def write(self) -> dict[str, float]:
        """Write the file (first process only; at every epoch end and at the run's end).

        Returns the totals written (see :meth:`totals`).
        """
        totals = self.totals()
        final = self.history[-1] if self.history else {}
        content = {"history": self.history, "final": final, **totals}
        atomic_write_text(self.path, json.dumps(content, indent=2))
        return totals

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        views = batch[0]  # (views, labels, dataset indices); every process has as many images
        self.images += views[0].shape[0] * trainer.world_size

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
        record["wall_time_s"] = self.wall_time_s()
        self.history = [r for r in self.history if r["epoch"] < trainer.current_epoch] + [record]
        if trainer.is_global_zero:
            self.write()

    def state_dict(self) -> dict[str, float]:
        return {"wall_time_s": self.wall_time_s(), "images": self.images}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._earlier_s = float(state_dict.get("wall_time_s", 0.0))
        self.images = int(state_dict.get("images", 0))


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's bar showing ``loss`` (this step's) and ``knn_top1`` (the latest kNN
    monitor, percent, once measured), without the logger's version number ``v_num``."""

    SHOWN = {"train/loss": ("loss", "{:.4f}"), "monitor/knn_top1": ("knn_top1", "{:.1f}")}

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        # Lightning's documented way to change the bar's values. The first process alone draws
        # the bar; the epoch's metrics it reads were already computed on every process by
        # MetricsJSON (which comes before it), so reading them here is no collective.
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        shown = {}
        for key, value in items.items():
            name, form = self.SHOWN.get(key, (key, None))
            shown[name] = form.format(value) if form else value
        return shown


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
        # weights_only=False (a full checkpoint) is also Lightning's default, given explicitly
        # so that Lightning does not log that it defaults to it at every save.
        trainer.save_checkpoint(self.path, weights_only=False)
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


class SigtermSync(pl.Callback):
    """Answers a SIGTERM on every process after the same batch.

    Lightning's own handler broadcasts from inside the signal handler and each process checks
    its own flag at the epoch end, so a SIGTERM that reaches one process (or reaches them at
    different moments) can leave the processes in different collectives, waiting forever. Here
    the handler only sets a flag; after every batch all processes combine their flags with one
    all-reduce and, if any was set, all stop after that batch through Lightning's SIGTERM path
    (checkpoint, status 143).
    """

    def __init__(self) -> None:
        self.requested = False  # this process received SIGTERM
        self.stopping = False  # some process did: the run stops after this batch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before training starts; this replaces them for
        # the rest of the fit (Lightning restores the original handlers at teardown).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        flag = self.requested
        if is_dist():
            tensor = torch.tensor([float(flag)], device=pl_module.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        if flag:
            self.stopping = True
            trainer._signal_connector.received_sigterm = True


class StepLimit(pl.Callback):
    """``trainer.max_steps``: stop after that many optimiser steps, as a pause, not an end.

    Lightning's own ``max_steps`` ends the epoch in progress: its epoch-end hooks run (k-means,
    monitors, epoch checkpoints) and the epoch counts as done, so a run resumed from there
    skips the rest of that epoch. Here a limit reached within an epoch stops the run the way
    SIGTERM does, after the batch in progress and before any epoch-end work; the
    ``last.ckpt`` written then resumes at the next batch. A limit reached at the last batch of
    an epoch lets that epoch end normally.
    """

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.reached = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.max_steps < 0 or trainer.global_step < self.max_steps:
            return
        self.reached = True
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer.should_stop = True
        else:
            # Lightning's only way out of an epoch that skips its epoch-end hooks is the
            # SIGTERM path, checked right after this batch's bookkeeping on every process.
            trainer._signal_connector.received_sigterm = True


class SigtermWatchdog:
    """Ends the process when a SIGTERM is not answered within ``grace_s`` seconds.

    Lightning answers SIGTERM between two batches. A process blocked in a collective that
    another process never joins never gets there: Python runs signal handlers only in the main
    thread, between bytecodes. The C-level handler still writes the signal number to the wakeup
    file descriptor, which a daemon thread reads here; if the run has not stopped
    ``grace_s`` seconds later, the thread prints one line, calls ``on_expire`` (which ends the
    processes this one launched) and exits with status 143.
    """

    def __init__(
        self, grace_s: float, last_checkpoint: Path, on_expire: Callable[[], None] = lambda: None
    ) -> None:
        self.grace_s = grace_s
        self.last_checkpoint = last_checkpoint
        self.on_expire = on_expire
        self.received = False
        self._read_fd = self._write_fd = -1
        self._previous_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> SigtermWatchdog:
        if threading.current_thread() is not threading.main_thread():
            return self  # wakeup descriptors belong to the main thread; no watchdog then
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="ssl-lib-sigterm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous_fd is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        self._done.set()
        os.write(self._write_fd, b"\0")  # wakes a thread still waiting for a signal
        self._thread.join()
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _watch(self) -> None:
        while not self._done.is_set():
            data = os.read(self._read_fd, 64)
            if signal.SIGTERM in data and not self._done.is_set():
                self.received = True
                if not self._done.wait(self.grace_s):
                    print(
                        f"ssl-lib: error: SIGTERM not answered within trainer.sigterm_grace_s="
                        f"{self.grace_s:g} s (a process is blocked, e.g. waiting for another "
                        f"process); exiting without a new checkpoint. Last checkpoint: "
                        f"{_describe_checkpoint(self.last_checkpoint)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.on_expire()
                    os._exit(SIGTERM_EXIT_CODE)


class CollectiveTimeoutError(RuntimeError):
    """A collective across processes did not complete in ``trainer.collective_timeout_s``."""


def _kill_launched_processes(trainer: pl.Trainer) -> None:
    """SIGKILL the ranks this process started (Lightning's ``ddp`` launcher), if any: they
    cannot finish a run their peer has left."""
    launcher = trainer.strategy.launcher
    if launcher is not None and hasattr(launcher, "kill"):
        launcher.kill(signal.SIGKILL)


def _is_collective_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a process group's timeout (gloo and NCCL word it differently)."""
    text = str(err).lower()
    is_backend_error = isinstance(err, getattr(dist, "DistBackendError", ())) or isinstance(
        err, RuntimeError
    )
    return is_dist() and is_backend_error and ("timed out" in text or "timeout" in text)


def new_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/name``, or ``name_1``, ``name_2``... so an earlier run is never overwritten."""
    return unused_path(Path(cfg.run.output_dir) / cfg.run.name, keep_suffix=False)


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
        run_dir = run_folder_of(path)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"no config.yaml in '{run_dir}' (the run folder of '{path}')")
        return run_dir, path
    raise ConfigError(f"--resume '{target}': no such run folder or checkpoint")


def build_strategy(name: str, collective_timeout_s: float = 1800.0) -> str | Strategy:
    """``trainer.strategy``; ``ddp`` / ``ddp_spawn`` without DDP's per-step buffer broadcast.

    Memory banks are kept identical on every rank by all-gathered writes, so broadcasting them
    from rank 0 before every forward pass would only copy K x D floats per step for nothing.
    Collectives that do not complete within ``collective_timeout_s`` seconds raise instead of
    waiting forever (the process group's timeout).
    """
    if name in ("ddp", "ddp_spawn"):
        start = "spawn" if name == "ddp_spawn" else "popen"
        return DDPStrategy(
            start_method=start,
            broadcast_buffers=False,
            timeout=timedelta(seconds=collective_timeout_s),
        )
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
    exits with status 143; a collective across processes that times out raises
    :class:`CollectiveTimeoutError`. ``trainer.max_steps`` stops the run after that step with
    a ``last.ckpt`` that resumes exactly (see :class:`StepLimit`).
    """
    t = cfg.trainer
    console.silence_known_noise()
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
    step_limit = StepLimit(t.max_steps)
    sigterm = SigtermSync()
    metrics = MetricsJSON(run_dir / "metrics.json")
    progress_bar = t.progress_bar and not console.is_quiet()
    callbacks = [
        step_limit,  # first: it decides before the other callbacks see the batch's end
        sigterm,
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch{epoch:04d}",
            auto_insert_metric_name=False,
            every_n_epochs=t.checkpoint_every_n_epochs,
            save_top_k=-1,
        ),
        *build_monitors(cfg, datamodule.build_train_set(), method.backbone.feat_dim),
        metrics,  # after the monitors: it records their values
        # after the monitors too: its checkpoints include their updates of the batch or epoch
        LastCheckpoint(ckpt_dir / "last.ckpt", t.checkpoint_every_n_steps),
        *([TrainingProgressBar()] if progress_bar else []),  # after MetricsJSON (see there)
        *callbacks,
    ]
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"),
        callbacks=callbacks,
        max_epochs=t.max_epochs,
        max_steps=-1,  # StepLimit stops the run; the schedules span max_epochs
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy, t.collective_timeout_s),
        precision=t.precision,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module's EpochSampler splits the data
    )
    last = ckpt_dir / "last.ckpt"
    watchdog = SigtermWatchdog(t.sigterm_grace_s, last, lambda: _kill_launched_processes(trainer))
    try:
        with watchdog:
            trainer.fit(
                method, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None
            )
    except NonFiniteLossError as err:
        last_good = _describe_checkpoint(last)
        raise NonFiniteLossError(f"{err}. Last good checkpoint: {last_good}") from None
    except SIGTERMException:
        if step_limit.reached and not sigterm.stopping:
            reason = f"stopped at trainer.max_steps={t.max_steps}"
            _finish(trainer, reason, run_dir, last, metrics)
            return run_dir
        if trainer.is_global_zero:
            print(
                f"ssl-lib: stopped by SIGTERM at global step {trainer.global_step}; checkpoint "
                f"{last} written; continue with: ssl-lib train --resume {run_dir}",
                file=sys.stderr,
            )
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except Exception as err:
        if not _is_collective_timeout(err):
            raise
        _kill_launched_processes(trainer)
        raise CollectiveTimeoutError(
            f"a collective across processes did not complete within "
            f"trainer.collective_timeout_s={t.collective_timeout_s:g} s (another process stopped "
            f"or took another code path). Last checkpoint: {_describe_checkpoint(last)}"
        ) from None
    _finish(trainer, None, run_dir, last, metrics)
    return run_dir


def _finish(
    trainer: pl.Trainer, reason: str | None, run_dir: Path, last: Path, metrics: MetricsJSON
) -> None:
    """End of a run that stopped as planned, on the first process only: the totals into
    ``metrics.json``, the plots, then the end-of-run lines.

    Everything comes from what ``metrics`` holds in memory: reading
    ``trainer.callback_metrics`` here would be a collective the other processes never join.
    """
    if not trainer.is_global_zero:
        return
    totals = metrics.write()
    try:
        plots = report.write_run_plots(run_dir, metrics.history)
    except Exception as err:  # the trained run and its checkpoints matter more than a picture
        print(f"ssl-lib: warning: could not write the plots: {err}", file=sys.stderr)
        plots = []
    _print_stop(trainer, reason, run_dir, last, metrics.history, totals, plots)


def _print_stop(
    trainer: pl.Trainer,
    reason: str | None,
    run_dir: Path,
    last: Path,
    history: list[dict],
    totals: dict[str, float],
    plots: list[Path],
) -> None:
    """The end-of-run lines: why it stopped (if early), what was trained, how fast, the last and
    best monitor values, and where the run's files are."""
    if reason is not None:
        print(
            f"{reason} (global step {trainer.global_step}, epoch {trainer.current_epoch}); "
            f"continue with: ssl-lib train --resume {run_dir} trainer.max_steps=-1"
        )
    epochs = history[-1]["epoch"] + 1 if history else 0
    print(
        f"trained:      {epochs} epochs, {trainer.global_step} steps in "
        f"{report.format_duration(totals['wall_time_s'])} ({totals['images_per_s']:.0f} images/s)"
    )
    for label, key in (("kNN top-1:", report.KNN_TOP1), ("linear acc:", report.LINEAR_ACC)):
        s = report.summarize(history, key)
        if s is not None:
            print(
                f"{label:<13} final {s.final:.2f} % (epoch {s.final_epoch}), "
                f"best {s.best:.2f} % (epoch {s.best_epoch})"
            )
    if plots:
        print(f"plots:        {plots[0].parent} ({', '.join(p.name for p in plots)})")
    print(f"run folder:   {run_dir}")
    print(f"config:       {run_dir / 'config.yaml'}")
    print(f"checkpoint:   {last}")
    print(f"metrics:      {run_dir / 'metrics.json'}")
    print(f"tensorboard:  tensorboard --logdir {run_dir / 'tensorboard'}")


# Overrides that leave a resumed run identical to one that never stopped.
EXACT_RESUME_KEYS = (
    "trainer.max_steps",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps",
    "trainer.checkpoint_every_n_epochs",
    "trainer.collective_timeout_s",
    "trainer.sigterm_grace_s",
    "data.num_workers",
    "run.output_dir",
)
# Settings the saved data position depends on (see ssl_lib.data.sampling.restore_position).
DATA_POSITION_KEYS = (
    "run.seed",
    "data.batch_size",
    "data.max_samples",
    "trainer.devices",
    "trainer.num_nodes",
)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: cfg}


def check_resume(ckpt: Path, saved: dict, cfg: DictConfig) -> str | None:
    """Why resuming ``ckpt`` with ``cfg`` cannot train, as a :class:`ConfigError`; else a one-line
    note when the continued run will differ from one that never stopped (``None`` if exact).

    ``saved`` is the checkpoint's config (the run as it was when the checkpoint was written).
    """
    state = read_checkpoint(ckpt, mmap=True)
    step, position = state["global_step"], state.get("SSLDataModule", {})
    t = cfg.trainer
    if t.max_steps != -1 and step >= t.max_steps:
        raise ConfigError(
            f"checkpoint '{ckpt}' is at global step {step}, which trainer.max_steps="
            f"{t.max_steps} already reaches; continue with trainer.max_steps=-1 or a larger value"
        )
    epochs_done = position.get("epoch", state.get("epoch", 0)) + bool(position.get("epoch_done"))
    if epochs_done >= t.max_epochs:
        raise ConfigError(
            f"checkpoint '{ckpt}' has completed {epochs_done} epochs, which trainer.max_epochs="
            f"{t.max_epochs} already reaches; raise trainer.max_epochs to train longer"
        )
    before, after = _flat(saved), _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        key
        for key in before.keys() | after.keys()
        if before.get(key) != after.get(key) and key not in EXACT_RESUME_KEYS
    )
    if not changed:
        return None
    what = "the run continues from the saved state with the new values"
    if "trainer.max_epochs" in changed:
        what += "; the LR and EMA schedules now span the new trainer.max_epochs from this step"
    if any(key in changed for key in DATA_POSITION_KEYS):
        what += f"; the data order restarts at the first batch of epoch {position.get('epoch', 0)}"
    return (
        f"resume: {', '.join(f'{k}={after.get(k)!r} (was {before.get(k)!r})' for k in changed)} "
        f"differ from the checkpoint's run, so the result will not be identical to a run that "
        f"never stopped: {what}"
    )


def resume(target: str, overrides: list[str] = ()) -> Path:
    """Continue a run from its folder's last checkpoint (or a given checkpoint).

    Overrides that make an exact continuation impossible are named in one line on stderr,
    with what happens instead; a limit the checkpoint already reaches is a :class:`ConfigError`.
    """
    run_dir, ckpt = find_resume(target)
    source = str(run_dir / "config.yaml")
    cfg = build_config([(source, OmegaConf.load(source))], overrides)
    check_resumable(ckpt, cfg.method.name)
    saved = read_checkpoint(ckpt, mmap=True)["hyper_parameters"]["config"]
    note = check_resume(ckpt, saved, cfg)
    if note is not None and _launcher_rank() == 0:
        print(f"ssl-lib: {note}", file=sys.stderr)
    if overrides:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    return train(cfg, run_dir=run_dir, resume_from=ckpt)
