"""What a run shows: a quiet console with a summary, plots, ``ssl-lib plot`` / ``runs``, and
progress bars on long work outside the training loop."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import run_main
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_lib import console
from ssl_lib.eval.features import extract_features
from ssl_lib.memory.kmeans import kmeans
from ssl_lib.report import format_duration
from ssl_lib.train import resume, train

ROOT = Path(__file__).resolve().parents[1]
SMALL_DEMO = [
    "data.synthetic.num_samples=256",  # 4 steps of 64 per epoch
    "data.num_workers=0",
    "monitor.knn_train_samples=128",
    "monitor.knn_val_samples=64",
]
NOISE = ("Tip:", "litlogger", "litmodels", "lightning.ai", "weights_only", "_pytree", "LeafSpec")
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "ssl_lib.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Two real ``ssl-lib train demo/msf`` runs: ``a`` as a user runs it (2 epochs), ``b`` with
    ``--quiet``, 1 epoch and no online linear monitor."""
    out = tmp_path_factory.mktemp("runs")
    a = cli("train", "demo/msf", *SMALL_DEMO, "trainer.max_epochs=2", f"run.output_dir={out}")
    assert a.returncode == 0, a.stderr[-3000:]
    b = cli(
        "--quiet",
        "train",
        "demo/msf",
        *SMALL_DEMO,
        "trainer.max_epochs=1",
        "monitor.online_linear=false",
        f"run.output_dir={out}",
        "run.name=quiet",
    )
    assert b.returncode == 0, b.stderr[-3000:]
    return {"root": out, "a": out / "demo_msf", "b": out / "quiet", "out_a": a, "out_b": b}


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def best_and_final(history: list[dict], key: str) -> tuple[float, int, float, int]:
    measured = [(r[key], r["epoch"]) for r in history if key in r]
    best = max(measured, key=lambda m: m[0])  # max keeps the first of equal values
    return measured[-1][0], measured[-1][1], best[0], best[1]


def test_console_is_quiet_and_ends_with_a_summary(demo):
    proc, run = demo["out_a"], demo["a"]
    console_text = proc.stdout + proc.stderr
    for noise in (*NOISE, "v_num"):
        assert noise not in console_text, noise
    # a real warning about the config still shows: 4 batches per epoch, logged every 5 steps
    assert "smaller than the logging interval" in proc.stderr
    bar = [line for line in re.split(r"[\r\n]", proc.stdout) if line.startswith("Epoch 1")]
    assert bar and all("loss=" in line and "knn_top1=" in line for line in bar)

    m = metrics(run)
    history = m["history"]
    assert m["images"] == 2 * 256  # two epochs of 256 images
    assert m["wall_time_s"] > 0 and m["images_per_s"] == pytest.approx(512 / m["wall_time_s"])
    lines = proc.stdout.splitlines()
    trained = [line for line in lines if line.startswith("trained:")]
    took = format_duration(m["wall_time_s"])
    assert trained == [
        f"trained:      2 epochs, 8 steps in {took} ({m['images_per_s']:.0f} images/s)"
    ]
    for label, key in (
        ("kNN top-1:", "monitor/knn_top1"),
        ("linear acc:", "monitor/online_linear_acc"),
    ):
        final, final_epoch, best, best_epoch = best_and_final(history, key)
        expected = (
            f"{label:<13} final {final:.2f} % (epoch {final_epoch}), "
            f"best {best:.2f} % (epoch {best_epoch})"
        )
        assert [line for line in lines if line.startswith(label)] == [expected]
    for start in ("plots:", "run folder:", "config:", "checkpoint:", "metrics:", "tensorboard:"):
        assert sum(line.startswith(start) for line in lines) == 1, start
    assert f"run folder:   {run}" in lines


def test_quiet_shows_no_progress_bar(demo):
    proc = demo["out_b"]
    assert "Epoch 0" not in proc.stdout and "it/s" not in proc.stdout + proc.stderr
    assert "trained:      1 epochs, 4 steps" in proc.stdout
    assert "linear acc:" not in proc.stdout  # the online linear monitor was off


def test_metrics_json_holds_epoch_means_and_wall_time(demo):
    history = metrics(demo["a"])["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    for key in ("train/loss_epoch", "train/lr_epoch", "wall_time_s"):
        assert all(isinstance(r[key], float) for r in history), key
    assert history[0]["wall_time_s"] < history[1]["wall_time_s"]


def colour_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    """Pixels within a small distance of ``colour`` in the PNG at ``path`` (checked first)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(colour)).sum(axis=2) < 40).sum())


def test_every_run_writes_its_plots(demo):
    names = ["knn_top1.png", "loss.png", "lr.png", "online_linear_acc.png"]
    assert sorted(p.name for p in (demo["a"] / "plots").iterdir()) == names
    for name in names:
        assert colour_pixels(demo["a"] / "plots" / name, BLUE) > 100, name  # a drawn curve
    # no online linear monitor, no curve for it
    assert sorted(p.name for p in (demo["b"] / "plots").iterdir()) == names[:3]


def test_plot_overlays_runs_and_runs_lists_them(demo, tmp_path, capsys):
    out = tmp_path / "fig" / "both.png"
    assert run_main("plot", str(demo["a"]), str(demo["b"]), "--out", str(out)) == 0
    assert capsys.readouterr().out == f"plot:         {out}\n"
    assert colour_pixels(out, BLUE) > 100 and colour_pixels(out, ORANGE) > 100

    assert run_main("runs", str(demo["root"])) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "run",
        "method",
        "backbone",
        "epochs",
        "kNN",
        "final",
        "kNN",
        "best",
        "linear",
        "final",
        "linear",
        "best",
        "wall",
        "time",
    ]
    assert [row.split()[:4] for row in rows] == [
        ["demo_msf", "msf", "tiny_cnn", "2/2"],
        ["quiet", "msf", "tiny_cnn", "1/1"],
    ]
    for row, run in zip(rows, ("a", "b"), strict=True):
        history = metrics(demo[run])["history"]
        final, _, best, _ = best_and_final(history, "monitor/knn_top1")
        assert row.split()[4:6] == [f"{final:.2f}", f"{best:.2f}"]
    assert rows[1].split()[6:8] == ["-", "-"]  # no online linear monitor in run b


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["plot", "{tmp}", "--out", "{tmp}/x.png"], "is not a run folder"),
        (["plot", "{tmp}/nothing", "--out", "{tmp}/x.png"], "is not a run folder"),
        (["plot", "{started}", "--out", "{tmp}/x.png"], "has no metrics.json yet"),
        (["plot", "{corrupt}", "--out", "{tmp}/x.png"], "metrics.json': Expecting"),
        (["plot", "{run}", "--out", "{tmp}/x.xyz"], "unknown image format"),
        (["runs", "{tmp}"], "no run folders in"),
        (["runs", "{tmp}/nothing"], "is not a folder"),
    ],
)
def test_bad_input_gives_one_line(demo, tmp_path, capsys, args, expected):
    started = tmp_path / "started"  # a run whose first epoch has not ended
    started.mkdir()
    (started / "config.yaml").write_text((demo["a"] / "config.yaml").read_text())
    corrupt = tmp_path / "corrupt"  # a metrics.json cut short
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text((demo["a"] / "config.yaml").read_text())
    (corrupt / "metrics.json").write_text('{"history": [')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("a: 1\n")  # not a training run's config
    names = {"tmp": tmp_path / "other", "started": started, "corrupt": corrupt, "run": demo["a"]}
    assert run_main(*(a.format(**names) for a in args)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl-lib: error:") and expected in lines[0]
    assert not list(tmp_path.rglob("x.*"))


class StepRecorder(pl.Callback):
    """The loss and learning rate of every training step."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        self.losses.setdefault(epoch, []).append(float(outputs["loss"]))
        # the LR this step used: the schedule has already stepped to the next one
        self.lrs.setdefault(epoch, []).append(self.lr)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def test_epoch_means_and_totals_survive_a_resume(make_config, tmp_path):
    cfg = make_config(
        "byol",
        run={"output_dir": str(tmp_path), "name": "r"},
        optim={"schedule": "warmup_cosine"},  # an LR that changes every step
        trainer={"max_epochs": 1, "accelerator": "cpu", "progress_bar": False},
    )
    rec = StepRecorder()
    run_dir = train(cfg, callbacks=[rec])
    first = metrics(run_dir)
    assert first["images"] == 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume(str(run_dir), ["trainer.max_epochs=2"])
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    m = metrics(run_dir)
    assert m["images"] == 128  # counted on from the checkpoint
    assert m["wall_time_s"] > first["wall_time_s"]
    record = m["history"][0]
    assert record["train/loss_epoch"] == pytest.approx(np.mean(rec.losses[0]), rel=1e-5)
    assert record["train/lr_epoch"] == pytest.approx(np.mean(rec.lrs[0]), rel=1e-5)
    assert len(set(rec.lrs[0])) > 1  # so the mean differs from the last step's value
    assert record["train/lr_epoch"] != pytest.approx(record["train/lr"])
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss.png", "lr.png"]


def test_known_noise_is_filtered_and_nothing_else(monkeypatch):
    console.silence_known_noise()
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def shown(message: str) -> bool:
        record = log.makeRecord(log.name, logging.INFO, __file__, 1, message, None, None)
        return bool(log.filter(record))

    assert not shown("💡 Tip: For seamless cloud logging, try installing [litlogger](...)")
    assert not shown("💡 Tip: For seamless cloud uploads, try installing [litmodels](...)")
    assert shown("GPU available: False, used: False")
    assert shown("Tip: lower data.batch_size")

    deprecation = "`isinstance(treespec, LeafSpec)` is deprecated, use ... instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.silence_known_noise()  # in front of "always"
        for message, module in (
            (deprecation, "pytorch_lightning.utilities._pytree"),  # dropped
            (deprecation, "my_code"),  # same text from elsewhere: kept
            ("data.root has 3 images", "pytorch_lightning.utilities._pytree"),
        ):
            warnings.warn_explicit(message, FutureWarning, "f.py", 1, module=module)
    assert [(str(w.message), w.filename) for w in caught] == [
        (deprecation, "f.py"),
        ("data.root has 3 images", "f.py"),
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
@pytest.mark.parametrize("quiet", [True, False])
def test_progress_bars_of_long_work(monkeypatch, tty, quiet):
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    console.set_quiet(quiet)
    try:
        data = TensorDataset(torch.randn(40, 3, 4, 4), torch.zeros(40), torch.arange(40))
        extract_features(torch.nn.Flatten(), DataLoader(data, batch_size=8), device="cpu")
        kmeans(torch.randn(50, 4), 3, iters=5, backend="torch")
    finally:
        console.set_quiet(False)
    text = stderr.getvalue()
    if tty and not quiet:  # batches done / total [elapsed<ETA, rate]
        assert re.search(r"features: .*\| 0/5 \[00:00<\?, \?it/s\]", text), text
        assert re.search(r"k-means: .*\| 0/5 \[00:00<\?, \?it/s\]", text), text
    else:
        assert text == ""
