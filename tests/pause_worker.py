"""Train a tiny config and pause at a given step until a signal arrives (for test_resume.py).

Usage: ``python pause_worker.py METHOD OUTPUT_DIR RUN_NAME PAUSE_STEP MARKER [key=value ...]``.
During the batch that makes optimiser step PAUSE_STEP the run writes MARKER and waits: SIGTERM
lets it stop after that batch (checkpoint, exit status 143), SIGKILL ends it at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402

from ssl_lib.config import config_from_dict  # noqa: E402
from ssl_lib.train import SigtermSync, train  # noqa: E402

WAIT_LIMIT_S = 300.0  # only so that a forgotten process ends by itself


class PauseAt(pl.Callback):
    """At the start of the batch that makes step ``step``: write ``marker`` and wait until the
    run has received SIGTERM."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step - 1:
            return
        sigterm = next(c for c in trainer.callbacks if isinstance(c, SigtermSync))
        self.marker.write_text(str(self.step))
        waited = 0.0
        while not sigterm.requested and waited < WAIT_LIMIT_S:
            time.sleep(0.02)
            waited += 0.02


def main(argv: list[str]) -> None:
    method, output_dir, name, step, marker, *overrides = argv
    cfg = config_from_dict(
        tiny_config(method), [*overrides, f"run.output_dir={output_dir}", f"run.name={name}"]
    )
    train(cfg, callbacks=[PauseAt(int(step), Path(marker))])


if __name__ == "__main__":
    main(sys.argv[1:])
