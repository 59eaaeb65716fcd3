"""Method banks in checkpoints and under a real 2-process gloo group.

The DDP test drives each method's training step by hand (EMA update, ``compute_loss``,
gradient all-reduce, SGD step) in two processes, which exercises exactly the collective paths
Lightning's DDP would (all-gathered enqueue, cross-rank shuffle-BN) at a fraction of its
start-up cost.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config

from ssl_lib.config import config_from_dict
from ssl_lib.data import SSLDataModule
from ssl_lib.methods import base, build_method, load_method
from ssl_lib.train import build_strategy

WORLD, GLOBAL_BATCH, STEPS = 2, 16, 4
METHODS = {
    "moco": {"bank_size": 40},
    "isd": {"bank_size": 40},
    "msf": {"bank_size": 40, "k": 3, "bank_dtype": "fp16"},
}


def method_config(name: str):
    return config_from_dict(
        tiny_config(name, method=METHODS[name], data={"batch_size": GLOBAL_BATCH})
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bank_survives_checkpoint_round_trip(tmp_path: Path, name: str):
    pl.seed_everything(0, verbose=False)
    cfg = method_config(name)
    model = build_method(cfg)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=SSLDataModule(cfg.data))
    assert int(model.bank.num_seen) == 2 * GLOBAL_BATCH
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_method(str(tmp_path / "last.ckpt"))
    assert type(loaded) is type(model)
    for key, value in model.bank.state_dict().items():
        restored = loaded.bank.state_dict()[key]
        assert restored.dtype == value.dtype and torch.equal(restored, value), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, port: int, out: str, name: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        shuffles = []
        real_shuffle = base.shuffle_batch
        base.shuffle_batch = lambda x: shuffles.append(x.shape[0]) or real_shuffle(x)
        torch.manual_seed(0)  # same initial weights on both ranks
        model = build_method(method_config(name))
        model.log = lambda *args, **kwargs: None  # no Trainer here
        model.current_ema_momentum = lambda: 0.9
        params = [p for m in model.trainable_modules() for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        local = GLOBAL_BATCH // WORLD
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)
            views = [torch.randn(local, 3, 32, 32, generator=g) for _ in range(2)]
            labels = torch.randint(0, 4, (local,), generator=g)
            model.update_target()
            loss, _ = model.compute_loss(views, labels, torch.arange(local))
            opt.zero_grad()
            loss.backward()
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            opt.step()
            model.flush_enqueue()  # what the Trainer does after the optimiser step
        result = {"state": model.state_dict(), "shuffles": shuffles}
        if rank == 0:
            torch.save(
                {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()},
                Path(out) / "method.ckpt",
            )
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ddp_ranks_hold_identical_banks(tmp_path: Path, name: str):
    mp.spawn(_train, args=(_free_port(), str(tmp_path), name), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in results:  # the target's batch was shuffled across ranks at every step
        assert res["shuffles"] == [GLOBAL_BATCH // WORLD] * STEPS
    states = [res["state"] for res in results]
    bank_keys = [k for k in states[0] if k.startswith("bank.")]
    for key in bank_keys:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["bank.num_seen"]) == STEPS * GLOBAL_BATCH
    assert (states[0]["bank.labels"] >= 0).sum() == min(40, STEPS * GLOBAL_BATCH)
    # averaged gradients keep the online weights in step too
    for key in states[0]:
        if key.startswith(("backbone.", "projector.")) and "running" not in key:
            torch.testing.assert_close(states[0][key], states[1][key], msg=key)
    loaded = load_method(str(tmp_path / "method.ckpt"))  # loads in one process
    for key in bank_keys:
        assert torch.equal(loaded.state_dict()[key], states[0][key]), key


@pytest.mark.parametrize("name, start", [("ddp", "popen"), ("ddp_spawn", "spawn")])
def test_ddp_strategy_skips_buffer_broadcast(name: str, start: str):
    strategy = build_strategy(name)
    assert strategy._ddp_kwargs == {"broadcast_buffers": False}
    assert strategy._start_method == start
    assert build_strategy("auto") == "auto"
