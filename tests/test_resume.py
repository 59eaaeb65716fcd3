"""Exact resume: a run stopped and resumed ends bit-identical to one that never stopped.

Every run here is 2 epochs of 4 steps of a tiny CNN on 64 synthetic images, writing last.ckpt
every 3 steps. A reference run per method records, for every step, the batch indices, a sum of
its views, the LR and the EMA momentum; its final checkpoint is the target. Runs are resumed
from a mid-epoch checkpoint (step 3 of 4), from an epoch-end one, after SIGTERM and after
SIGKILL, and must match the reference in every tensor and every recorded step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import teacher_override, tiny_config, write_tiny_teacher
from omegaconf import OmegaConf

from ssl_lib.config import config_from_dict
from ssl_lib.data import SSLDataModule
from ssl_lib.data.sampling import EpochSampler
from ssl_lib.train import SIGTERM_EXIT_CODE, train

WORKER = Path(__file__).resolve().parent / "pause_worker.py"
ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "trainer.max_epochs=2",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.log_every_n_steps=1",
]
EXTRA = {
    "byol": [],
    "moco": ["method.bank_size=48"],
    "isd": ["method.bank_size=48"],
    "msf": ["method.bank_size=48", "method.k=3"],
    "barlow_twins": ["model.predictor=null"],
    # block 0 in epoch 0, block 1 (block 0 frozen) in epoch 1; noise from the global RNG
    "blockwise_barlow_twins": [
        "model.predictor=null",
        "method.head_dim=16",
        "method.schedule=sequential",
        "method.epochs_per_block=1",
    ],
    # per-image caches, k-means after each epoch, pseudo-labeller rounds at batch 1 and epoch end
    "cmsf_2q": ["method.bank_size=48", "method.k=3", "method.k_prime=4"],
    "cmsf_km": ["method.bank_size=48", "method.k=3", "method.num_clusters=4"],
    # the EMA key encoder, two banks and the frozen teacher (written by the reference fixture)
    "compress": ["method.bank_size=48", "data.views=[weak]"],
    "cmsf_semi": [
        "method.bank_size=48",
        "method.k=3",
        "method.sup_cache_size=24",
        "method.pseudo_epochs=2",
        "method.pseudo_batch_size=8",
        "data.labelled_fraction=0.25",
    ],
}
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "ssl_lib")


def overrides(method: str, out: Path, name: str) -> list[str]:
    teacher = []
    if method == "compress":
        teacher = [teacher_override(write_tiny_teacher(out / "teacher.pt"))]
    return [*COMMON, *EXTRA[method], *teacher, f"run.output_dir={out}", f"run.name={name}"]


class Recorder(pl.Callback):
    """Per step: global step, batch indices, a sum of the views, LR and EMA momentum."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        views, _, index = batch
        lr = pl_module.optimizers().param_groups[0]["lr"]
        ema = pl_module.current_ema_momentum() if pl_module.uses_target else None
        total = [float(v.double().sum()) for v in views]
        self.steps.append((trainer.global_step, index.tolist(), total, lr, ema))


class KeepCheckpoints(pl.Callback):
    """Copies last.ckpt as written after each of ``steps`` (mid-epoch and epoch-end ones)."""

    def __init__(self, ckpt: Path, steps: tuple[int, ...], into: Path) -> None:
        self.ckpt, self.steps, self.into = ckpt, steps, into

    def _keep(self, trainer) -> None:
        if trainer.global_step in self.steps:
            self.into.mkdir(exist_ok=True)
            shutil.copy(self.ckpt, self.into / f"step{trainer.global_step}.ckpt")

    def on_train_batch_end(self, trainer, *args) -> None:
        self._keep(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._keep(trainer)  # the epoch-end last.ckpt (LastCheckpoint runs before)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per method (built once): the uninterrupted run's records, final and kept checkpoints."""
    cache: dict[str, dict] = {}

    def get(method: str) -> dict:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"ref_{method}")
            cfg = config_from_dict(tiny_config(method), overrides(method, out, "ref"))
            rec = Recorder()
            last = out / "ref" / "checkpoints" / "last.ckpt"
            keep = KeepCheckpoints(last, (3, 4, 6), out / "kept")
            run_dir = train(cfg, callbacks=[rec, keep])
            cache[method] = {
                "steps": rec.steps,
                "final": load(run_dir / "checkpoints" / "last.ckpt"),
                "kept": out / "kept",
                "config": run_dir / "config.yaml",
            }
        return cache[method]

    return get


def resume_and_compare(ref: dict, run_dir: Path, ckpt: Path, workers: int = 0) -> None:
    """Resume ``ckpt`` in ``run_dir`` (with ``workers`` loader processes) and check the rest of
    the run against ``ref`` (which loaded in the main process)."""
    from ssl_lib.config import build_config

    layers = [("config", OmegaConf.load(ref["config"]))]
    cfg = build_config(layers, [f"data.num_workers={workers}"])
    start = load(ckpt)["global_step"]
    rec = Recorder()
    train(cfg, run_dir=run_dir, resume_from=ckpt, callbacks=[rec])
    assert rec.steps and rec.steps[0][0] == start
    assert rec.steps == [s for s in ref["steps"] if s[0] >= start]  # data, views, LR, EMA
    final = load(run_dir / "checkpoints" / "last.ckpt")
    for key in COMPARED:  # weights, EMA target, banks, optimiser, schedule, RNG states
        assert_same(ref["final"][key], final[key], key)


@pytest.mark.parametrize(
    ("method", "step"),
    [
        ("byol", 3),
        ("moco", 3),
        ("isd", 3),
        ("msf", 3),
        ("barlow_twins", 3),
        ("blockwise_barlow_twins", 6),
        ("cmsf_2q", 6),
        ("cmsf_km", 6),
        ("cmsf_semi", 6),
        ("compress", 3),
    ],
)
def test_resume_mid_epoch_is_exact(method, step, reference, tmp_path):
    ref = reference(method)
    kept = ref["kept"] / f"step{step}.ckpt"
    position = load(kept)["SSLDataModule"]
    assert position["epoch"] == step // 4 and position["batches_done"] == step % 4
    assert not position["epoch_done"]
    resume_and_compare(ref, tmp_path / "run", kept)


def test_resume_at_epoch_end_is_exact(reference, tmp_path):
    ref = reference("byol")
    kept = ref["kept"] / "step4.ckpt"
    assert load(kept)["SSLDataModule"]["epoch_done"]
    resume_and_compare(ref, tmp_path / "run", kept, workers=2)


def start_worker(method: str, out: Path, marker: Path, step: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(WORKER), method, str(out), "run", str(step), str(marker)]
    return subprocess.Popen(
        [*args, *COMMON, *EXTRA[method]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(proc: subprocess.Popen, marker: Path) -> None:
    """Until the worker wrote its marker (fails if it exited first)."""
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("method", "sig", "step"),
    [("moco", signal.SIGTERM, 5), ("byol", signal.SIGKILL, 7)],
    ids=["term", "kill"],
)
def test_resume_after_a_signal_is_exact(method, sig, step, reference, tmp_path):
    ref = reference(method)
    marker = tmp_path / "paused"
    proc = start_worker(method, tmp_path, marker, step)
    try:
        wait_for(proc, marker)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if sig == signal.SIGTERM:
        # a clean stop: a checkpoint of the step it stopped after, one line, status 143
        assert proc.returncode == SIGTERM_EXIT_CODE, err[-3000:]
        assert f"stopped by SIGTERM at global step {step}; checkpoint {ckpt}" in err
        assert "Traceback" not in err
        assert load(ckpt)["global_step"] == step  # mid-epoch: step 1 of epoch 1
    else:
        # killed after step 7: the last checkpoint is the periodic one of step 6, intact
        assert proc.returncode == -signal.SIGKILL
        assert load(ckpt)["global_step"] == 6
        assert not list(ckpt.parent.glob(".*.tmp"))
    resume_and_compare(ref, run_dir, ckpt, workers=2 if sig == signal.SIGTERM else 0)


def test_data_order_and_views_depend_only_on_seed_epoch_and_index(make_config):
    """Same batches with 0 or 2 workers, for a resumed epoch, and no global RNG drawn."""
    cfg = make_config("byol")

    def batches(workers: int, epoch: int, skip: int = 0) -> list:
        dm = SSLDataModule(OmegaConf.merge(cfg.data, {"num_workers": workers}), seed=3)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        loader.sampler.resume_at(epoch, skip)
        return [(index, views) for views, _, index in loader]

    before = torch.get_rng_state()
    main = batches(0, epoch=1)
    assert torch.equal(torch.get_rng_state(), before)  # loading drew nothing from torch's RNG
    assert len(main) == 4
    for (i, v), (j, w) in zip(main, batches(2, epoch=1), strict=True):
        assert torch.equal(i, j) and all(torch.equal(a, b) for a, b in zip(v, w, strict=True))
    for (i, v), (j, w) in zip(main[2:], batches(0, epoch=1, skip=2), strict=True):
        assert torch.equal(i, j) and all(torch.equal(a, b) for a, b in zip(v, w, strict=True))
    other = batches(0, epoch=2)
    assert not torch.equal(other[0][0], main[0][0])  # a new order each epoch
    assert not torch.equal(main[0][1][0], main[0][1][1])  # the two views differ


def test_epoch_sampler_splits_and_skips():
    shards = [EpochSampler(10, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    keys = [list(s) for s in shards]
    indices = [i for k in keys for _, i in k]
    assert all(len(k) == 3 == len(s) for k, s in zip(keys, shards, strict=True))
    assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    again = EpochSampler(10, 2, seed=1, rank=1, world_size=3)
    again.resume_at(0, 1)
    assert list(again) == keys[1][2:]
    assert list(again) == keys[1]  # the skip applies to one pass only
    again.set_epoch(1)
    assert [e for e, _ in again] == [1, 1, 1] and list(again) != keys[1]


@pytest.mark.parametrize(
    ("method", "stop"),
    [("byol", 2), ("byol", 4), ("byol", 5), ("cmsf_km", 2)],
    ids=["byol-within-epoch0", "byol-at-epoch-end", "byol-within-epoch1", "cmsf_km-within-epoch0"],
)
def test_a_max_steps_stop_resumes_exactly(method, stop, reference, tmp_path):
    """trainer.max_steps stops after that step with nothing of the epoch end run (no k-means,
    no epoch checkpoint); resuming with max_steps=-1 ends equal to the run that never stopped."""
    ref = reference(method)
    extra = [f"trainer.max_steps={stop}", "trainer.checkpoint_every_n_epochs=1"]
    cfg = config_from_dict(tiny_config(method), [*overrides(method, tmp_path, "run"), *extra])
    run_dir = train(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    state = load(last)
    assert state["global_step"] == stop
    position = state["SSLDataModule"]
    assert (position["epoch"], position["batches_done"]) == (
        stop // 4 - (stop % 4 == 0),
        stop % 4 or 4,
    )
    assert position["epoch_done"] == (stop % 4 == 0)
    epochs_done = stop // 4
    expected = [f"epoch{e:04d}.ckpt" for e in range(epochs_done)] + ["last.ckpt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == expected
    resume_and_compare(ref, run_dir, last)


@pytest.mark.parametrize(
    ("kept", "extra", "outcome"),
    [
        ("step3", [], None),
        ("step3", ["trainer.max_steps=6", "data.num_workers=2"], None),
        ("step3", ["trainer.max_steps=3"], "which trainer.max_steps=3 already reaches"),
        ("step3", ["trainer.max_epochs=3"], "schedules now span the new trainer.max_epochs"),
        ("step3", ["data.batch_size=8"], "data order restarts at the first batch of epoch 0"),
        ("step3", ["run.seed=1"], "data order restarts"),
        ("step3", ["optim.lr=0.1"], "optim.lr=0.1 (was 0.05)"),
        ("step4", [], None),
        (
            "step6",
            ["trainer.max_epochs=1"],
            "completed 1 epochs, which trainer.max_epochs=1 already reaches",
        ),
        ("final", [], "completed 2 epochs, which trainer.max_epochs=2 already reaches"),
        ("final", ["trainer.max_epochs=3"], "schedules now span"),
    ],
)
def test_resume_says_when_it_cannot_be_exact(kept, extra, outcome, reference, tmp_path):
    """Stop reasons (a mid-epoch stop: max_steps, SIGTERM or a periodic checkpoint before a
    kill; an epoch end; max_epochs reached) against overrides of the limits and the data."""
    from ssl_lib.config import ConfigError, build_config
    from ssl_lib.train import check_resume

    ref = reference("byol")
    if kept == "final":
        ckpt = tmp_path / "final.ckpt"
        torch.save(ref["final"], ckpt)
    else:
        ckpt = ref["kept"] / f"{kept}.ckpt"
    cfg = build_config([("config", OmegaConf.load(ref["config"]))], extra)
    saved = load(ckpt)["hyper_parameters"]["config"]
    if outcome is None:
        assert check_resume(ckpt, saved, cfg) is None
    elif "already reaches" in outcome:
        with pytest.raises(ConfigError, match=outcome.replace("(", r"\(")):
            check_resume(ckpt, saved, cfg)
    else:
        note = check_resume(ckpt, saved, cfg)
        assert note is not None and outcome in note and "\n" not in note
        assert "will not be identical" in note
