"""The real ``ssl-lib train`` command on 2 CPU processes (``trainer.strategy=ddp``).

Every process runs under ``ddp_cli_worker.py``, which records each torch.distributed collective
it calls: a collective that only some processes call is what hangs a run, so the traces of the
two processes must be identical, call for call. A process that stops answering must end the run
with one line, by the process group's timeout or by SIGTERM, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

WORKER = Path(__file__).resolve().parent / "ddp_cli_worker.py"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = tiny_config(
    "msf",
    run={"name": "ddp"},
    method={"name": "msf", "k": 3, "bank_size": 64},
    data={"synthetic": {"num_samples": 96}},  # 16 per step over 2 processes: 6 steps
    trainer={
        "max_epochs": 2,
        "devices": 2,
        "strategy": "ddp",
        "checkpoint_every_n_epochs": 1,
        "log_every_n_steps": 1,
    },
    monitor={
        "knn_every_n_epochs": 1,
        "knn_train_samples": 64,
        "knn_val_samples": 32,
        "online_linear": True,
    },
)


def command(trace: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(trace), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the test can end the whole group if something is left
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a hang): {err[-3000:]}")
    return proc.returncode, out, err


def assert_same_collectives(trace: Path) -> None:
    ranks = [(trace / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) > 50, "the trace recorded too few collectives"
    for i, (a, b) in enumerate(zip(*ranks, strict=False)):
        assert a == b, f"collective {i}: rank 0 called {a!r}, rank 1 {b!r}"
    assert len(ranks[0]) == len(ranks[1])


def assert_no_process_left(trace: Path) -> None:
    deadline = time.monotonic() + 10
    for pid_file in trace.glob("pid*"):
        pid = int(pid_file.read_text())
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} ({pid_file.name}) is still running")


def write_recipe(folder: Path) -> Path:
    path = folder / "recipe.yaml"
    run = {**RECIPE["run"], "output_dir": str(folder / "runs")}
    path.write_text(yaml.safe_dump({**RECIPE, "run": run}))
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (2 epochs of 6 steps), traced."""
    folder = tmp_path_factory.mktemp("full")
    code, out, err = finish(command(folder / "trace", "train", str(write_recipe(folder))))
    assert code == 0, err[-3000:]
    (folder / "stdout.txt").write_text(out)
    return folder


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in (a, b))
    assert x["global_step"] == y["global_step"] == 12
    for key, value in x["state_dict"].items():
        assert torch.equal(value, y["state_dict"][key]), key


def test_two_processes_finish_resume_exactly_and_call_the_same_collectives(
    tmp_path, recipe, full_run
):
    """The whole run, and a run stopped by max_steps within an epoch then resumed, end equal."""
    full = full_run / "runs" / "ddp"
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "epoch0000.ckpt",
        "epoch0001.ckpt",
        "last.ckpt",
    ]
    metrics = json.loads((full / "metrics.json").read_text())
    history = metrics["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    assert all("monitor/knn_top1" in r and "monitor/online_linear_acc" in r for r in history)
    assert metrics["images"] == 2 * 96  # both processes' images, two epochs
    out = (full_run / "stdout.txt").read_text()
    for start in ("trained:", "kNN top-1:", "linear acc:", "plots:", "run folder:"):
        assert sum(line.startswith(start) for line in out.splitlines()) == 1, start  # rank 0
    assert len(list((full / "plots").glob("*.png"))) == 4
    assert not list((full_run / "runs").glob("ddp_*"))  # one folder for both processes
    assert_same_collectives(full_run / "trace")

    args = ["train", str(recipe), "run.name=part", "trainer.max_steps=4"]
    code, out, err = finish(command(tmp_path / "part", *args))
    assert code == 0, err[-3000:]
    part = tmp_path / "runs" / "part"
    assert "stopped at trainer.max_steps=4 (global step 4, epoch 0)" in out
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["last.ckpt"]
    assert_same_collectives(tmp_path / "part")
    resume = ["train", "--resume", str(part), "trainer.max_steps=-1"]
    code, out, err = finish(command(tmp_path / "resumed", *resume))
    assert code == 0, err[-3000:]
    assert_same_collectives(tmp_path / "resumed")
    assert_same_weights(full, part)


def test_sigterm_stops_both_processes_with_a_checkpoint_that_resumes_exactly(
    tmp_path, recipe, full_run
):
    trace = tmp_path / "trace"
    proc = command(trace, "train", str(recipe), "run.name=term")
    rank1 = trace / "rank1.txt"
    while not rank1.exists() or len(rank1.read_text().splitlines()) < 100:  # in training
        if proc.poll() is not None:
            pytest.fail(f"exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    os.kill(int((trace / "pid0").read_text()), signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    run = tmp_path / "runs" / "term"
    assert code == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 12
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"ssl-lib: stopped by SIGTERM at global step {step}")
    )
    assert_no_process_left(trace)
    code, out, err = finish(command(tmp_path / "resumed", "train", "--resume", str(run)))
    assert code == 0, err[-3000:]
    assert_same_weights(full_run / "runs" / "ddp", run)


@pytest.mark.parametrize("how", ["timeout", "sigterm"])
def test_a_stalled_process_ends_the_run_with_one_line(tmp_path, recipe, how):
    """Process 1 stops answering at its first epoch end; the run must not wait forever."""
    trace = tmp_path / "trace"
    limits = (
        ["trainer.collective_timeout_s=15"]
        if how == "timeout"
        else ["trainer.collective_timeout_s=600", "trainer.sigterm_grace_s=2"]
    )
    env = {"SSL_LIB_TEST_STALL_RANK": "1"}
    proc = command(trace, "train", str(recipe), "run.name=stall", *limits, env=env)
    if how == "sigterm":
        while not (trace / "stalled").exists():
            if proc.poll() is not None:
                pytest.fail(f"exited early: {proc.stderr.read()[-3000:]}")
            time.sleep(0.1)
        time.sleep(2)  # process 0 is now waiting in a collective
        os.kill(int((trace / "pid0").read_text()), signal.SIGTERM)
    start = time.monotonic()
    code, out, err = finish(proc, timeout=120)
    last_line = err.strip().splitlines()[-1]
    if how == "timeout":
        assert code == 1, err[-3000:]
        assert last_line.startswith(
            "ssl-lib: error: a collective across processes did not complete within "
            "trainer.collective_timeout_s=15 s"
        ), last_line
    else:
        assert code == 143, err[-3000:]
        assert time.monotonic() - start < 30
        assert last_line.startswith(
            "ssl-lib: error: SIGTERM not answered within trainer.sigterm_grace_s=2 s"
        ), last_line
    assert "global step 6" in last_line  # the epoch-end checkpoint written before the stall
    assert "Traceback" not in err
    assert_no_process_left(trace)
