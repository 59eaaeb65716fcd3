"""Safe checkpoints: atomic writes, and one clear error line for unusable checkpoint files."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error
from omegaconf import OmegaConf

import ssl_lib.checkpoints as checkpoints
from ssl_lib.checkpoints import atomic_save, check_resumable, read_checkpoint
from ssl_lib.methods import build_method
from ssl_lib.train import train


def crash_on_call(monkeypatch, n: int) -> None:
    """Make the ``n``-th torch.save of a checkpoint write a few bytes, then fail."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(5)}, path)
    before = path.read_bytes()
    crash_on_call(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": 2, "w": torch.zeros(5)}, path)
    assert path.read_bytes() == before
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_crash_while_training_writes_a_checkpoint_keeps_the_last_one(
    make_config, tmp_path, monkeypatch
):
    cfg = make_config(
        "byol",
        [f"run.output_dir={tmp_path}", "trainer.checkpoint_every_n_steps=1"],
    )
    crash_on_call(monkeypatch, 2)  # the checkpoint after step 2
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    ckpt = tmp_path / "test" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 1
    check_resumable(ckpt, "byol")  # still a full training checkpoint
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]


@pytest.fixture
def bad_checkpoints(make_config, tmp_path) -> dict:
    """A run folder and unusable checkpoint files, with what the error must say of each."""
    cfg = make_config("byol")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    weights = run_dir / "checkpoints" / "weights.ckpt"  # what ssl-lib eval accepts
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save(
        {"hyper_parameters": {"config": config}, "state_dict": build_method(cfg).state_dict()},
        weights,
    )
    files = {
        "empty": (b"", "is empty (0 bytes)"),
        "truncated": (weights.read_bytes()[:3000], "cannot be read (truncated"),
        "text": (b"step: 10\nloss: 0.5\n", "cannot be read (truncated or not a torch file)"),
    }
    paths = {}
    for name, (data, expected) in files.items():
        paths[name] = (run_dir / "checkpoints" / f"{name}.ckpt", expected)
        paths[name][0].write_bytes(data)
    foreign = run_dir / "checkpoints" / "foreign.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    paths["foreign"] = (foreign, "not written by ssl-lib train")
    return {"run_dir": run_dir, "weights": weights, "files": paths}


def test_resume_from_an_unusable_checkpoint_gives_one_line(bad_checkpoints, capsys):
    for path, expected in bad_checkpoints["files"].values():
        err = one_line_error(capsys, "train", "--resume", str(path))
        assert f"checkpoint '{path}'" in err and expected in err, err
    err = one_line_error(capsys, "train", "--resume", str(bad_checkpoints["weights"]))
    assert "holds no training state" in err and "optimizer_states" in err
    # a run folder whose last.ckpt is damaged names that file
    run_dir = bad_checkpoints["run_dir"]
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(bad_checkpoints["files"]["truncated"][0].read_bytes())
    err = one_line_error(capsys, "train", "--resume", str(run_dir))
    assert f"checkpoint '{last}' cannot be read (truncated" in err
    assert not (run_dir / "tensorboard").exists()  # nothing started


def test_evaluating_an_unusable_checkpoint_gives_one_line(bad_checkpoints, capsys):
    data = ["data.dataset=synthetic", "data.image_size=32", "features.progress_bar=false"]
    for protocol in ("knn", "linear"):
        for path, expected in bad_checkpoints["files"].values():
            err = one_line_error(capsys, "eval", protocol, str(path), *data)
            assert f"checkpoint '{path}'" in err and expected in err, err
