"""NaN / Inf losses: stop with a clear message and the last good checkpoint, or skip the batch."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_config
from omegaconf import OmegaConf

import ssl_lib.train
from ssl_lib.cli import main
from ssl_lib.methods import METHODS
from ssl_lib.methods.msf import MSF
from ssl_lib.train import train

MSF_SMALL = ["method.bank_size=48", "method.k=3"]


def inject_nan(monkeypatch, steps: set[int], cls: type = MSF) -> None:
    """The method's loss becomes NaN at the given global steps (after its real forward pass)."""
    real = cls.compute_loss

    def compute_loss(self, views, labels, index):
        loss, extra = real(self, views, labels, index)
        if self.global_step in steps:
            loss = loss * float("nan")
        return loss, extra

    monkeypatch.setattr(cls, "compute_loss", compute_loss)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "msf.yaml"
    OmegaConf.save(OmegaConf.create(tiny_config("msf")), recipe)
    written: list[tuple[int, bytes]] = []
    real_save = ssl_lib.train.LastCheckpoint._save

    def save(self, trainer):
        real_save(self, trainer)
        written.append((trainer.global_step, self.path.read_bytes()))

    monkeypatch.setattr(ssl_lib.train.LastCheckpoint, "_save", save)
    inject_nan(monkeypatch, {2})
    args = [*MSF_SMALL, "trainer.checkpoint_every_n_steps=1", f"run.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exc:
        main(["train", str(recipe), *args])
    assert exc.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    ckpt = tmp_path / "test" / "checkpoints" / "last.ckpt"
    line = lines[0]
    assert line.startswith("ssl-lib: error: non-finite loss at global step 2 (epoch 0, batch 2)")
    assert "loss=nan; loss terms: purity=" in line
    assert f"Last good checkpoint: '{ckpt}' (global step 2)" in line
    assert "trainer.nonfinite=skip" in line
    # checkpoints after steps 1 and 2, none of the failed step: last.ckpt is the one of step 2
    assert [step for step, _ in written] == [1, 2]
    assert ckpt.read_bytes() == written[-1][1]


class StateRecorder(pl.Callback):
    """Copies of every tensor of the method and the optimiser before and after each batch."""

    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []

    @staticmethod
    def state(pl_module) -> dict:
        tensors = {}
        for key, value in pl_module.state_dict().items():  # a cache's extra state is a dict
            parts = value.items() if isinstance(value, dict) else [("", value)]
            tensors |= {f"{key}.{p}".rstrip("."): t.clone() for p, t in parts}
        opt = pl_module.optimizers().optimizer.state_dict()["state"]
        tensors |= {f"opt.{k}": v["momentum_buffer"].clone() for k, v in opt.items()}
        return tensors

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.before.append(self.state(pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(self.state(pl_module))


def changed(a: dict, b: dict) -> list[str]:
    return [k for k in b if k not in a or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("method", ["msf", "isd", "cmsf_2q"])
def test_skip_mode_skips_the_batch_without_changing_anything(
    method, make_config, tmp_path, monkeypatch
):
    """MSF writes its bank before the loss; ISD's loss reads the bank in the backward pass;
    CMSF-2Q also writes its per-image cache."""
    small = ["method.bank_size=48"] if method == "isd" else MSF_SMALL
    cfg = make_config(method, [*small, "trainer.nonfinite=skip", f"run.output_dir={tmp_path}"])
    inject_nan(monkeypatch, {2}, METHODS.get(method))
    rec = StateRecorder()
    with pytest.warns(UserWarning, match="skipping the batch: non-finite loss at global step 2"):
        run_dir = train(cfg, callbacks=[rec])
    assert len(rec.after) == 4
    # batch 2: no parameter, EMA target, BN statistic, bank row, pointer or momentum changed
    assert changed(rec.before[2], rec.after[2]) == []
    # the other batches do change all of those (the check above can fail)
    moved = changed(rec.before[1], rec.after[1])
    for key in ("backbone.stages.0.0.weight", "target.backbone.stages.0.0.weight"):
        assert key in moved
    assert {"bank.embeddings", "bank.ptr", "bank.num_seen"} <= set(moved)
    if method == "cmsf_2q":
        cache = {f"cache._extra_state.{p}" for p in ("data", "next_slot", "visits")}
        assert cache <= set(moved)
    assert any(k.startswith("opt.") for k in moved)
    assert changed(rec.before[3], rec.after[3])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ssl_lib"]["nonfinite_skipped"] == 1
    assert ckpt["global_step"] == 4  # a skipped batch still counts as a step of the schedules
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["train/nonfinite_skipped"] == 1.0
    values = ckpt["state_dict"].values()
    tensors = [t for v in values for t in (v.values() if isinstance(v, dict) else [v])]
    floats = [v for v in tensors if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in floats)
