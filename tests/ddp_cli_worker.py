"""``ssl-lib`` under test: records every torch.distributed collective each process calls.

Run as ``python ddp_cli_worker.py TRACE_DIR [ssl-lib arguments...]``. Lightning's ``ddp``
launcher restarts this same script for the other ranks, so every process is traced: each
appends ``name numel`` lines to ``TRACE_DIR/rank<R>.txt`` and writes its pid to
``TRACE_DIR/pid<R>``. With ``SSL_LIB_TEST_STALL_RANK=R`` process R stops answering (it sleeps)
at its first epoch end, the way a diverged or stuck process would, after writing
``TRACE_DIR/stalled``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
)


def _numel(args: tuple) -> int:
    first = args[0] if args else None
    if isinstance(first, torch.Tensor):
        return first.numel()
    if isinstance(first, list) and first and isinstance(first[0], torch.Tensor):
        return sum(t.numel() for t in first)
    return -1


def _traced(name: str, fn):
    def call(*args, **kwargs):
        rank = dist.get_rank()
        with open(TRACE / f"rank{rank}.txt", "a") as f:
            f.write(f"{name} {_numel(args)}\n")
        return fn(*args, **kwargs)

    return call


def _stall_at_epoch_end(rank: int) -> None:
    import pytorch_lightning as pl

    original = pl.Callback.on_train_epoch_end

    class Stall(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.global_rank == rank:
                (TRACE / "stalled").write_text(str(os.getpid()))
                time.sleep(3600)
            original(self, trainer, pl_module)

    import ssl_lib.train as train_module

    real_train = train_module.train

    def train(cfg, run_dir=None, resume_from=None, callbacks=()):
        return real_train(cfg, run_dir, resume_from, [Stall(), *callbacks])

    train_module.train = train


if __name__ == "__main__":
    TRACE = Path(sys.argv[1])
    TRACE.mkdir(parents=True, exist_ok=True)
    for name in COLLECTIVES:
        wrapped = _traced(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    rank = os.environ.get("LOCAL_RANK", "0")
    (TRACE / f"pid{rank}").write_text(str(os.getpid()))
    if "SSL_LIB_TEST_STALL_RANK" in os.environ:
        _stall_at_epoch_end(int(os.environ["SSL_LIB_TEST_STALL_RANK"]))
    from ssl_lib.cli import main

    main(sys.argv[2:])
