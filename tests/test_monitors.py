"""Online monitors: they log kNN and linear accuracy, leave training untouched, need labels."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from PIL import Image

from ssl_lib.methods import load_method
from ssl_lib.train import train

MONITORS = {
    "knn_every_n_epochs": 2,
    "knn_train_samples": 48,
    "knn_val_samples": 32,
    "knn_k": 5,
    "online_linear": True,
}


def run(make_config, tmp_path, name, **sections):
    cfg = make_config(
        run={"output_dir": str(tmp_path), "name": name},
        trainer={"max_epochs": 2, "accelerator": "cpu", "progress_bar": False},
        **sections,
    )
    return train(cfg)


def test_monitors_log_and_do_not_change_training(make_config, tmp_path):
    with_monitors = run(make_config, tmp_path, "on", monitor=MONITORS)
    history = json.loads((with_monitors / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    assert "monitor/knn_top1" not in history[0]  # measured every second epoch only
    for key in ("knn_top1", "knn_top5", "online_linear_acc", "online_linear_loss"):
        assert 0 <= history[1][f"monitor/{key}"] <= (100 if "loss" not in key else 10), key
    assert 0 <= history[0]["monitor/online_linear_acc"] <= 100
    events = b"".join(p.read_bytes() for p in (with_monitors / "tensorboard").glob("events*"))
    assert b"monitor/knn_top1" in events and b"monitor/online_linear_acc" in events

    # Same seed without monitors: identical weights, so the monitors changed no gradient,
    # no BatchNorm statistic, no EMA target and no random stream of the training.
    without = run(make_config, tmp_path, "off")
    a = load_method(str(with_monitors / "checkpoints" / "last.ckpt")).state_dict()
    b = load_method(str(without / "checkpoints" / "last.ckpt")).state_dict()
    assert a.keys() == b.keys()  # the online classifier is not part of the method
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_monitors_are_off_without_labels(make_config, tmp_path, caplog):
    folder = tmp_path / "unlabelled" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        run_dir = run(
            make_config,
            tmp_path,
            "nolabels",
            data={"dataset": "image_folder", "root": str(folder.parent)},
            monitor=MONITORS,
        )
    assert "no labels" in caplog.text and "monitors are off" in caplog.text
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert not any(key.startswith("monitor/") for record in history for key in record)
