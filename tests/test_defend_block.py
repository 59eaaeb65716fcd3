"""``ssl-lib defend block`` end to end on tiny image folders, and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_lib.cli import main
from ssl_lib.config import config_from_dict
from ssl_lib.data import VIEWS, image_folder
from ssl_lib.eval.linear import LinearProbe
from ssl_lib.methods import build_method

pytest.importorskip("timm")

CLASSES = ("ant", "bee", "cat")
TINY_VIT = [
    "model.backbone=vit_micro_p8",
    "data.image_size=32",
    "model.projector.hidden_dim=32",
    "model.projector.out_dim=16",
    "model.predictor.hidden_dim=32",
    "model.predictor.out_dim=16",
]


def run_main(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def save_init(path, overrides) -> None:
    torch.manual_seed(0)
    method = build_method(config_from_dict({"method": {"name": "byol"}}, overrides))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)


def write_folder(root, per_class: int, size: int, seed: int, patch: bool = False) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img[..., c] //= 3  # a class colour cast
            if patch:
                img[2:8, 20:26] = (255, 255, 0)  # the "trigger"
            Image.fromarray(img).save(root / name / f"{i}.png")


@pytest.fixture
def setup(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "init.ckpt"
    save_init(ckpt, TINY_VIT)
    write_folder(tmp_path / "train", 8, 40, 0)
    write_folder(tmp_path / "val", 4, 40, 1)
    write_folder(tmp_path / "patched", 4, 32, 2, patch=True)
    args = [
        "eval/cifar10_linear_cached",
        "data.dataset=image_folder",
        f"data.train_root={tmp_path / 'train'}",
        f"data.val_root={tmp_path / 'val'}",
        "data.num_workers=0",
        "data.batch_size=8",
        "features.progress_bar=false",
        "linear.epochs=2",
        "linear.lr_grid=[0.1]",
        f"block.patched_root={tmp_path / 'patched'}",
        "block.target_class=bee",
    ]
    return tmp_path, ckpt, args


def test_block_command_reports_before_and_after(setup, capsys):
    tmp_path, ckpt, args = setup
    assert run_main("defend", "block", str(ckpt), *args) == 0
    out = capsys.readouterr().out
    assert "before blocking" in out and "after blocking" in out
    json_path = tmp_path / "run" / "eval" / "block_init.json"
    r = json.loads(json_path.read_text())["results"]
    assert r["block_size"] == 4 and r["filter_size"] == 5 and r["num_patched"] == 12

    # the "before" figures, recomputed from the saved probe and the backbone
    saved = torch.load(r["probe"], weights_only=True)
    probe = LinearProbe(32, 3, (torch.zeros(32), torch.ones(32)))
    probe.load_state_dict(saved["state_dict"])
    backbone = build_method(config_from_dict({"method": {"name": "byol"}}, TINY_VIT))
    backbone.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    classifier = nn.Sequential(backbone.backbone, probe).eval()
    patched = image_folder(str(tmp_path / "patched"))
    to_tensor = VIEWS.get("eval")(32)  # 32 px images: no resize, no crop
    images = torch.stack([to_tensor(patched[i][0]) for i in range(len(patched))])
    labels = torch.tensor(patched.targets)
    with torch.no_grad():
        pred = classifier(images).argmax(1)
    others = labels != 1
    assert r["patched"]["before"]["asr"] == pytest.approx(
        100.0 * (pred[others] == 1).float().mean().item()
    )
    assert r["patched"]["before"]["top1"] == pytest.approx(
        100.0 * (pred == labels).float().mean().item()
    )

    # reusing the saved probe gives the same figures
    assert run_main("defend", "block", str(ckpt), *args, f"block.probe={r['probe']}") == 0
    again = json.loads((tmp_path / "run" / "eval" / "block_init_1.json").read_text())["results"]
    assert again["patched"] == r["patched"] and again["clean"] == r["clean"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["block.block_size=33"], "block.block_size=33 px does not fit in a 32x32 image"),
        (["block.target_class=dog"], "block.target_class 'dog' is not a class: ant, bee, cat"),
        (["data.image_size=40"], "data.image_size=40 differs from the 32 px the ViT"),
        (["block.filter_size=4"], "block.filter_size must be odd and >= 1"),
    ],
)
def test_bad_input_is_one_line(setup, capsys, extra, message):
    _, ckpt, args = setup
    assert run_main("defend", "block", str(ckpt), *args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-lib: error:") and "\n" not in err
    assert message in err


def test_refuses_a_cnn_and_resized_patched_images(setup, capsys):
    tmp_path, ckpt, args = setup
    cnn = tmp_path / "cnn" / "init.ckpt"
    save_init(cnn, ["model.backbone=tiny_cnn", *TINY_VIT[1:]])
    assert run_main("defend", "block", str(cnn), *args) == 2
    assert "backbone 'tiny_cnn' is not a vision transformer" in capsys.readouterr().err
    args = [a for a in args if not a.startswith("block.patched_root")]
    args.append(f"block.patched_root={tmp_path / 'val'}")  # 40 px images
    assert run_main("defend", "block", str(ckpt), *args) == 2
    err = capsys.readouterr().err
    assert "is 40x40 px, expected 32x32" in err and "\n" not in err.strip()
