"""Online monitors: they log kNN and linear accuracy, leave training untouched, need labels."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ssl_lib.eval.monitors import KNNMonitor, OnlineLinearMonitor
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


# --- Reported accuracies come from evidence only ----------------------------------------------


class FakeModule:
    """What the monitors use of a LightningModule: device, backbone and ``log``."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.backbone = torch.nn.Identity()
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs) -> None:
        self.logged[name] = float(value)


def online_linear_acc(weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> float:
    """The accuracy one training step of the online monitor logs for a fixed head."""
    module = FakeModule()
    monitor = OnlineLinearMonitor(feat_dim=weight.shape[1], num_classes=weight.shape[0], lr=0.0)
    monitor.on_fit_start(None, module)
    with torch.no_grad():
        monitor.classifier.weight.copy_(weight)
        monitor.classifier.bias.copy_(bias)
    views = [torch.randn(len(labels), weight.shape[1])]
    batch = (views, labels, torch.arange(len(labels)))
    monitor.on_train_batch_start(None, module, batch, 0)
    module.backbone(views[0])  # the method's own forward pass, seen by the hook
    monitor.on_train_batch_end(None, module, None, batch, 0)
    return module.logged["monitor/online_linear_acc"]


def test_online_linear_accuracy_gives_tied_logits_no_credit():
    labels = torch.zeros(8, dtype=torch.int64)
    # All-zero logits: argmax would name class 0 and score every sample of class 0.
    assert online_linear_acc(torch.zeros(4, 3), torch.zeros(4), labels) == 0.0
    # Classes 0 and 2 share the largest logit: no credit for either.
    assert online_linear_acc(torch.zeros(4, 3), torch.tensor([1.0, 0, 1, 0]), labels) == 0.0
    # A strict maximum for the label is a hit.
    assert online_linear_acc(torch.zeros(4, 3), torch.tensor([2.0, 0, 1, 0]), labels) == 100.0


def knn_monitor_log(bank, bank_labels, queries, query_labels, num_classes, k) -> dict:
    cfg = OmegaConf.create({"knn_every_n_epochs": 1, "knn_k": k, "knn_batch_size": 8})
    monitor = KNNMonitor([], [], num_classes, cfg, image_size=8)
    sets = {"bank": (bank, bank_labels), "queries": (queries, query_labels)}
    monitor.sets = {"bank": "bank", "queries": "queries"}
    monitor._features = lambda trainer, module, name: sets[name]
    module = FakeModule()
    monitor.on_train_epoch_end(SimpleNamespace(current_epoch=0), module)
    return module.logged


def test_knn_monitor_top5_counts_only_voted_classes():
    # The example: every query's single neighbour votes for a wrong class.
    labels = (torch.arange(100) % 10 + 1) % 10
    logged = knn_monitor_log(
        torch.eye(10), torch.arange(10), torch.eye(10).repeat(10, 1), labels, 10, 1
    )
    assert logged == {"monitor/knn_top1": 0.0, "monitor/knn_top5": 0.0}
    # With 3 classes there is no top-5 to log.
    logged = knn_monitor_log(torch.eye(3), torch.arange(3), torch.eye(3), torch.arange(3), 3, 1)
    assert logged == {"monitor/knn_top1": 100.0}
