"""The distillation defence recipes (docs/backdoor.md "Defence: distillation"): they load as
training recipes, need the suspect checkpoint on the command line, and `ssl-lib train` distils
that checkpoint into a fresh student on a clean file list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from omegaconf import OmegaConf
from PIL import Image

from ssl_lib.config import config_from_dict, list_recipes, load_config
from ssl_lib.methods import build_method, load_method

RECIPES = ["cifar10/compress_defence", "imagenet/compress_defence_in100"]


@pytest.fixture
def clean(tmp_path) -> tuple[Path, Path]:
    """A folder of 3 x 4 random 16 px PNGs and a clean list of half of them (ssl-lib data
    subset)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for cls in ("ant", "bee", "cow"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    listed = tmp_path / "clean.txt"
    assert run_main("data", "subset", str(root), "--fraction", "0.5", "--out", str(listed)) == 0
    return root, listed


@pytest.fixture
def suspect(tmp_path) -> Path:
    """An ssl_lib BYOL checkpoint of a tiny_cnn with seeded random weights."""
    torch.manual_seed(0)
    cfg = config_from_dict(
        {"method": {"name": "byol"}},
        [
            "model.backbone=tiny_cnn",
            "model.projector.hidden_dim=32",
            "model.projector.out_dim=16",
            "model.predictor.hidden_dim=32",
            "model.predictor.out_dim=16",
        ],
    )
    method = build_method(cfg)
    path = tmp_path / "suspect" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", RECIPES)
def test_defence_recipes_distil_one_ssl_lib_backbone_on_a_file_list(name):
    assert name in list_recipes("train")
    cfg = load_config(name, ["method.teachers.0.path=/runs/suspect/last.ckpt"])
    assert cfg.method.name == "compress"
    [teacher] = cfg.method.teachers
    assert (teacher.kind, teacher.part) == ("ssl_lib", "backbone")
    assert teacher.path == "/runs/suspect/last.ckpt"
    assert cfg.data.dataset == "file_list"
    assert cfg.method.bank_size == 2048  # smaller than the recipes' clean subsets


def test_train_distils_the_suspect_into_a_fresh_student(clean, suspect, tmp_path, capsys):
    root, listed = clean
    args = [
        "train",
        "cifar10/compress_defence",
        f"method.teachers.0.path={suspect}",
        f"data.root={root}",
        f"data.file_list={listed}",
        f"run.output_dir={tmp_path / 'runs'}",
        "model.backbone=tiny_cnn",
        "method.bank_size=4",
        "data.image_size=16",
        "data.batch_size=3",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.strategy=auto",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every_n_epochs=1",
        "monitor.knn_every_n_epochs=0",
        "monitor.online_linear=false",
    ]
    assert run_main(*args) == 0
    run = tmp_path / "runs" / "compress_defence_cifar10"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.method.teachers[0].path == str(suspect)
    student = load_method(str(run / "checkpoints" / "last.ckpt"))
    teacher_weights = load_method(str(suspect)).backbone.state_dict()
    student_weights = student.backbone.state_dict()
    assert teacher_weights.keys() == student_weights.keys()
    # a fresh student: no weight tensor copied from the teacher
    weights = [k for k, w in teacher_weights.items() if w.dtype.is_floating_point and w.numel() > 1]
    assert weights and not any(torch.equal(teacher_weights[k], student_weights[k]) for k in weights)
    assert "2 steps" in capsys.readouterr().out  # 6 listed images (of 12) / batch 3


def test_the_placeholder_teacher_path_is_a_one_line_error(clean, tmp_path, capsys):
    root, listed = clean
    code = run_main(
        "train",
        "cifar10/compress_defence",
        f"data.root={root}",
        f"data.file_list={listed}",
        f"run.output_dir={tmp_path / 'runs'}",
        "data.batch_size=3",
        "trainer.accelerator=cpu",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ssl-lib: error:"), err
    assert "/path/to/suspect/last.ckpt" in err[0]
    assert not (tmp_path / "runs").exists()
