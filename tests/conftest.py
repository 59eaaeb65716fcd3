"""Shared fixtures (the real CIFAR-10 images beside the checkout, small configs) and the
settings that let the suite run on two pytest-xdist workers (``-n 2`` in pyproject.toml)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ssl_lib.cli import main
from ssl_lib.config import config_from_dict

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker gets one core of CI's two: one intra-op thread here and, through
    # OMP_NUM_THREADS, in every process a test starts (ssl-lib subprocesses, DDP workers). Two
    # workers with two threads each run the suite slower than one thread each.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests first: xdist hands out tests in this order, so the long learning runs start
    at once on both workers and the short tests fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def cifar10_root() -> Path:
    """``../shared/data/cifar10`` (ImageFolder layout). CI requires it to exist."""
    if not (CIFAR10 / "train").is_dir():
        if os.environ.get("SSL_LIB_REQUIRE_SHARED_DATA"):
            pytest.fail(f"real test images missing: {CIFAR10}")
        pytest.skip(f"real test images not present at {CIFAR10}")
    return CIFAR10


def tiny_config(method_name: str = "byol", **sections) -> dict:
    """A config dict for a tiny CPU model on synthetic 32 px data; ``sections`` override."""
    cfg = {
        "run": {"name": "test", "seed": 0},
        "method": {"name": method_name},
        "model": {
            "backbone": "tiny_cnn",
            "projector": {"hidden_dim": 32, "out_dim": 16},
            "predictor": {"hidden_dim": 32, "out_dim": 16},
        },
        "data": {
            "dataset": "synthetic",
            "image_size": 32,
            "batch_size": 16,
            "num_workers": 0,
            "synthetic": {"num_samples": 64},
        },
        "optim": {"lr": 0.05},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress_bar": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture
def make_config():
    """Factory for validated tiny configs: ``make_config(method_name, section={...}, ...)``."""

    def make(method_name: str = "byol", overrides: list[str] = (), **sections):
        return config_from_dict(tiny_config(method_name, **sections), list(overrides))

    return make


def cpu_trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU Trainer for in-test training: no logger, checkpoints or progress bar."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def write_tiny_teacher(path: Path, seed: int = 1) -> Path:
    """A ``tiny_cnn`` state dict with seeded random weights at ``path`` (a ``kind: backbone``
    teacher for the distillation methods); returns ``path``."""
    from ssl_lib.models import build_backbone

    torch.manual_seed(seed)
    torch.save(build_backbone("tiny_cnn").state_dict(), path)
    return path


def teacher_override(path: Path) -> str:
    """The ``key=value`` override that makes ``path`` (a tiny_cnn state dict) the only teacher."""
    return f"method.teachers=[{{kind: backbone, arch: tiny_cnn, path: '{path}'}}]"


def run_main(*args: str) -> int:
    """Run ``ssl-lib ARGS`` in this process; returns its exit status."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def one_line_error(capsys, *args: str) -> str:
    """``ssl-lib ARGS`` must exit with status 2 and one ``ssl-lib: error:`` line; returns it."""
    assert run_main(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl-lib: error:"), lines
    return lines[0]
