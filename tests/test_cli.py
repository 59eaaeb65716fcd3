"""The ``ssl-lib`` command: listing, training on real images, resuming, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_main

from ssl_lib.methods import load_method


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_lib.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_listings():
    out = cli("methods")
    assert out.returncode == 0 and "byol" in out.stdout.split()
    out = cli("recipes")
    assert "demo/byol" in out.stdout.split() and "imagenet/byol_asym" in out.stdout.split()
    assert "resnet18_cifar" in cli("backbones").stdout.split()


def test_train_on_real_images_then_resume(tmp_path, cifar10_root, capsys):
    common = [
        "data.dataset=image_folder",
        f"data.root={cifar10_root / 'train'}",
        "data.max_samples=96",
        "data.batch_size=32",
        "data.num_workers=0",
        "model.backbone=tiny_cnn",
        "model.projector.hidden_dim=32",
        "model.projector.out_dim=16",
        "model.predictor.hidden_dim=32",
        "model.predictor.out_dim=16",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        f"run.output_dir={tmp_path}",
        "run.name=cifar",
    ]
    assert run_main("train", "demo/byol", "trainer.max_epochs=1", *common) == 0
    run_dir = tmp_path / "cifar"
    out = capsys.readouterr().out
    assert f"run folder:   {run_dir}" in out and "last.ckpt" in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tensorboard").iterdir())

    assert run_main("train", "--resume", str(run_dir), "trainer.max_epochs=2") == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    assert all("train/loss" in r for r in history)
    model = load_method(str(run_dir / "checkpoints" / "last.ckpt"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.backbone.feat_dim)
    # a second run of the same name never overwrites the first
    assert run_main("train", "demo/byol", "trainer.max_epochs=1", *common) == 0
    assert (tmp_path / "cifar_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["demo/byol", "optim.lrr=1"], "unknown key 'optim.lrr'. Did you mean 'lr'"),
        (["demo/byol", "optim.lr=fast"], "invalid value for 'optim.lr'"),
        (["demo/byol", "method.name=nope"], "unknown method 'nope'"),
        (["demo/byol", "model.backbone=resnet"], "unknown backbone 'resnet'"),
        (
            ["demo/byol", "data.dataset=image_folder", "data.root=/no/such/dir"],
            "data folder '/no/such/dir' does not exist",
        ),
        (["demo/byol", "data.batch_size=4096"], "larger than the dataset"),
        (["--resume", "/no/such/run"], "no such run folder"),
        (["demo/byol", "trainer.max_epochs=0"], "trainer.max_epochs must be >= 1"),
        (["demo/byol", "trainer.max_steps=0"], "trainer.max_steps must be -1 (no limit) or >= 1"),
        (
            ["demo/byol", "trainer.collective_timeout_s=0"],
            "trainer.collective_timeout_s must be > 0",
        ),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, expected):
    out = cli("train", *args, f"run.output_dir={tmp_path}", "trainer.accelerator=cpu")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl-lib: error:"), out.stderr[-2000:]
    assert expected in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written for a run that could not start


def test_every_process_of_a_run_uses_rank_0s_folder(tmp_path, monkeypatch):
    """Lightning's DDP children inherit the folder; torchrun / SLURM ranks read rank 0's marker."""
    from ssl_lib.config import config_from_dict
    from ssl_lib.train import RUN_DIR_ENV, run_dir_for_process

    cfg = config_from_dict({"method": {"name": "byol"}, "run": {"output_dir": str(tmp_path)}})
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    first = run_dir_for_process(cfg)  # one process: a new folder each time
    assert first == tmp_path / "run" and run_dir_for_process(cfg) == tmp_path / "run_1"
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started from the last one
    assert run_dir_for_process(cfg) == tmp_path / "run_1"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    rank0 = run_dir_for_process(cfg)
    assert rank0 == tmp_path / "run_2" and rank0.is_dir()
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert run_dir_for_process(cfg) == rank0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "run",
        "run_1",
        "run_2",
    ]


def test_max_steps_stops_exactly_and_resume_continues_the_epoch(tmp_path, capsys):
    """9 steps per epoch: a stop at step 5 resumes at batch 5 of epoch 0 and ends at step 18
    equal to the run that never stopped; a stop at step 10 stops at step 10."""
    common = [
        "model.backbone=tiny_cnn",
        "model.projector.hidden_dim=32",
        "model.projector.out_dim=16",
        "model.predictor.hidden_dim=32",
        "model.predictor.out_dim=16",
        "data.synthetic.num_samples=144",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_n_epochs=1",
        "trainer.progress_bar=false",
        f"run.output_dir={tmp_path}",
    ]
    assert run_main("train", "demo/byol", *common, "run.name=full") == 0
    assert run_main("train", "demo/byol", *common, "run.name=part", "trainer.max_steps=5") == 0
    part = tmp_path / "part"
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["last.ckpt"]
    assert run_main("train", "--resume", str(part)) == 2  # max_steps=5 is already reached
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ssl-lib: error: checkpoint") and "trainer.max_steps=5" in err[-1]
    assert run_main("train", "--resume", str(part), "trainer.max_steps=10") == 0
    assert torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    assert "stopped at trainer.max_steps=10 (global step 10, epoch 1)" in capsys.readouterr().out
    assert run_main("train", "--resume", str(part), "trainer.max_steps=-1") == 0
    names = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert names == ["epoch0000.ckpt", "epoch0001.ckpt", "last.ckpt"]
    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)
        for r in (tmp_path / "full", part)
    )
    assert a["global_step"] == b["global_step"] == 18
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
