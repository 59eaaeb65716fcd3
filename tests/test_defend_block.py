"""``ssl-lib defend block`` end to end on tiny image folders, and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image
from torch import nn

from ssl_lib.backdoor.config import load_poison_config
from ssl_lib.backdoor.evaluate import load_probe, save_probe
from ssl_lib.backdoor.make import make_poison
from ssl_lib.backdoor.manifest import load_manifest
from ssl_lib.config import config_from_dict
from ssl_lib.data import VIEWS, image_folder
from ssl_lib.data.transforms import to_normalized_tensor
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


def poison(tmp_path):
    """``ssl-lib poison make`` on the train and val folders: bee is the target; every val
    image gets a 6 px trigger after the evaluation geometry (40 -> 32 px)."""
    cfg = load_poison_config(
        "poison/cifar10_targeted",
        [
            f"data.train_root={tmp_path / 'train'}",
            f"data.val_root={tmp_path / 'val'}",
            "poison.trigger.width=6",
            "poison.target=bee",
            f"output={tmp_path / 'poisoned'}",
        ],
    )
    return make_poison(cfg, progress=False)[0]


def predictions(ckpt, probe_path, images):
    """The backbone + saved probe's predictions, computed here without the command."""
    backbone = build_method(config_from_dict({"method": {"name": "byol"}}, TINY_VIT))
    backbone.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    classifier = nn.Sequential(backbone.backbone, load_probe(probe_path)).eval()
    with torch.no_grad():
        return classifier(images).argmax(1)


def test_block_command_reports_before_and_after(setup, capsys):
    tmp_path, ckpt, args = setup
    assert run_main("defend", "block", str(ckpt), *args) == 0
    out = capsys.readouterr().out
    assert "before blocking" in out and "after blocking" in out
    json_path = tmp_path / "run" / "eval" / "block_init.json"
    r = json.loads(json_path.read_text())["results"]
    assert r["block_size"] == 4 and r["filter_size"] == 5 and r["num_patched"] == 12

    # the "before" figures, recomputed from the saved probe and the backbone
    patched = image_folder(str(tmp_path / "patched"))
    to_tensor = VIEWS.get("eval")(32)  # 32 px images: no resize, no crop
    images = torch.stack([to_tensor(patched[i][0]) for i in range(len(patched))])
    labels = torch.tensor(patched.targets)
    pred = predictions(ckpt, r["probe"], images)
    others = labels != 1
    assert r["patched"]["before"]["asr"] == pytest.approx(
        100.0 * (pred[others] == 1).float().mean().item()
    )
    assert r["patched"]["before"]["top1"] == pytest.approx(
        100.0 * (pred == labels).float().mean().item()
    )

    # the patched images, labels and target of a poison manifest, with the saved probe
    poisoned = poison(tmp_path)
    by_manifest = [a for a in args if not a.startswith(("block.patched_root", "block.target"))]
    by_manifest += [f"block.manifest={poisoned}", f"block.probe={r['probe']}"]
    assert run_main("defend", "block", str(ckpt), *by_manifest) == 0
    again = json.loads((tmp_path / "run" / "eval" / "block_init_1.json").read_text())["results"]
    assert again["clean"] == r["clean"]  # the same probe on the same clean images
    assert again["target_class"] == "bee" and again["manifest"] == str(poisoned)
    records = load_manifest(poisoned).val
    to_tensor = to_normalized_tensor()
    images = torch.stack([to_tensor(Image.open(rec.path).convert("RGB")) for rec in records])
    labels = torch.tensor([rec.label for rec in records])
    pred = predictions(ckpt, r["probe"], images)
    assert again["num_patched"] == 12 and again["patched"]["before"]["asr"] == pytest.approx(
        100.0 * (pred[labels != 1] == 1).float().mean().item()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["block.block_size=33"], "block.block_size=33 px does not fit in a 32x32 image"),
        (["block.target_class=dog"], "block.target_class 'dog' is not a class: ant, bee, cat"),
        (["data.image_size=40"], "data.image_size=40 differs from the 32 px the ViT"),
        (["block.filter_size=4"], "block.filter_size must be odd and >= 1"),
        (["block.manifest=/nowhere"], "set one of block.manifest"),
        (["block.target_class=null"], "block.patched_root needs block.target_class"),
        (["features.source=projector"], "test-time blocking classifies the backbone's output"),
        (["block.probe=/nowhere/p.pt"], "probe file '/nowhere/p.pt' does not exist"),
    ],
)
def test_bad_input_is_one_line(setup, capsys, extra, message):
    _, ckpt, args = setup
    assert run_main("defend", "block", str(ckpt), *args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-lib: error:") and "\n" not in err
    assert message in err


def test_a_manifest_must_fit_the_data_and_a_probe_the_format(setup, capsys):
    tmp_path, ckpt, args = setup
    poisoned = poison(tmp_path)
    by_manifest = [a for a in args if not a.startswith(("block.patched_root", "block.target"))]
    by_manifest.append(f"block.manifest={poisoned}")
    cases = [
        (["block.target_class=cat"], "differs from the target 'bee' of the poison manifest"),
        (["data.image_size=40"], "data.image_size=40 differs from the 32 px the ViT"),
        ([f"data.val_root={tmp_path / 'patched'}"], "'ant/0.png' is missing"),
    ]
    (tmp_path / "patched" / "ant" / "0.png").rename(tmp_path / "patched" / "ant" / "9.png")
    old_format = tmp_path / "old_probe.pt"
    torch.save({"state_dict": {}, "classes": ["ant", "bee", "cat"]}, old_format)
    cases.append(([f"block.probe={old_format}"], "is not a probe file written by ssl-lib eval"))
    other = tmp_path / "other_probe.pt"  # the right format, classes and width: another model's
    save_probe(other, LinearProbe(32, 3), ["ant", "bee", "cat"], "backbone", tmp_path / "o.ckpt")
    cases.append(([f"block.probe={other}"], "was trained on the features of"))
    for extra, message in cases:
        assert run_main("defend", "block", str(ckpt), *by_manifest, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ssl-lib: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "run" / "eval").exists()


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
