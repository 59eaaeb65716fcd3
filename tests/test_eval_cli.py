"""``ssl-lib eval knn|linear`` end to end on real images, the feature cache, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_main
from PIL import Image

from ssl_lib.config import config_from_dict
from ssl_lib.eval import features
from ssl_lib.methods import build_method

SUBSET = [
    "data.max_train_samples=200",
    "data.max_val_samples=100",
    "data.batch_size=100",
    "data.num_workers=0",
    "features.progress_bar=false",
]
TINY = [
    "model.backbone=tiny_cnn",
    "model.projector.hidden_dim=32",
    "model.projector.out_dim=16",
    "model.predictor.hidden_dim=32",
    "model.predictor.out_dim=16",
]


def save_random_init(path, overrides=()) -> None:
    """A checkpoint of an untrained tiny model, in the format ``ssl-lib train`` writes."""
    torch.manual_seed(0)
    cfg = config_from_dict({"method": {"name": "byol"}}, [*TINY, *overrides])
    method = build_method(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)


def knn_top1(record: dict) -> dict:
    return {k: round(v, 1) for k, v in record["results"].items() if k.endswith("top1")}


def test_knn_and_linear_commands_on_real_images(tmp_path, cifar10_root, capsys, monkeypatch):
    train_args = [
        "data.dataset=image_folder",
        f"data.root={cifar10_root / 'train'}",
        "data.max_samples=192",
        "data.batch_size=64",
        "data.num_workers=0",
        *TINY,
        "trainer.max_epochs=3",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        "monitor.knn_every_n_epochs=0",
        f"run.output_dir={tmp_path}",
        "run.name=cifar",
    ]
    assert run_main("train", "demo/byol", *train_args) == 0
    trained = tmp_path / "cifar" / "checkpoints" / "last.ckpt"
    random_init = tmp_path / "random" / "checkpoints" / "init.ckpt"
    save_random_init(random_init)
    capsys.readouterr()

    roots = [
        "data.dataset=image_folder",  # the class-folder copy instead of torchvision's
        f"data.train_root={cifar10_root / 'train'}",
        f"data.val_root={cifar10_root / 'test'}",
    ]
    scores = {}
    for name, ckpt in (("random init", random_init), ("trained", trained)):
        assert run_main("eval", "knn", str(ckpt), "eval/cifar10_knn_umbc", *roots, *SUBSET) == 0
        out = capsys.readouterr().out
        assert "majority k=1" in out and "majority k=20" in out and "results:" in out
        path = ckpt.parent.parent / "eval" / f"knn_{ckpt.stem}.json"
        record = json.loads(path.read_text())
        assert record["num_train"] == 200 and record["num_val"] == 100
        assert record["settings"]["knn"]["ks"] == [1, 20] and len(record["classes"]) == 10
        scores[name] = knn_top1(record)
    with capsys.disabled():
        print(f"\nkNN top-1 on 200 train / 100 test CIFAR-10 images: {scores}")
    for values in scores.values():
        assert all(0 <= v <= 100 for v in values.values())

    # A second evaluation reads the cached features and never overwrites the first results.
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    assert run_main("eval", "knn", str(trained), "eval/cifar10_knn_weighted", *roots, *SUBSET) == 0
    weighted = json.loads((trained.parent.parent / "eval" / "knn_last_1.json").read_text())
    assert weighted["settings"]["knn"]["votes"] == ["weighted"]
    assert "weighted/k=20/T=0.07/top1" in weighted["results"]

    fast = ["linear.epochs=3", "linear.milestones=[2]", "linear.lr_grid=[0.1,1.0]"]
    cached = ["eval/cifar10_linear_cached", *roots, *SUBSET, *fast]
    assert run_main("eval", "linear", str(trained), *cached) == 0
    out = capsys.readouterr().out
    assert "cached last epoch" in out
    record = json.loads((trained.parent.parent / "eval" / "linear_last.json").read_text())
    assert record["results"]["lr"] in (0.1, 1.0) and record["settings"]["linear"]["epochs"] == 3

    monkeypatch.undo()
    umbc = ["eval/cifar10_linear_umbc", *roots, *SUBSET, "linear.epochs=1", "linear.milestones=[1]"]
    assert run_main("eval", "linear", str(trained), *umbc, "features.dtype=fp16") == 0
    out = capsys.readouterr().out
    assert "umbc last epoch" in out and "umbc best epoch (1)" in out
    record = json.loads((trained.parent.parent / "eval" / "linear_last_1.json").read_text())
    assert record["results"]["protocol"] == "umbc" and len(record["results"]["history"]) == 1


def image_folder(root, classes, n=3):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def small_data(tmp_path):
    train = image_folder(tmp_path / "train", ["cat", "dog", "fox"])
    val = image_folder(tmp_path / "val", ["cat", "dog", "fox"])
    odd = image_folder(tmp_path / "odd", ["cat", "dog", "owl"])
    ckpt = tmp_path / "run" / "checkpoints" / "init.ckpt"
    save_random_init(ckpt)
    common = ["data.image_size=8", "data.num_workers=0", "features.progress_bar=false"]
    return {"train": train, "val": val, "odd": odd, "ckpt": ckpt, "common": common}


def test_bad_inputs_give_one_line_errors(tmp_path, small_data, capsys):
    d = small_data
    roots = [f"data.train_root={d['train']}", f"data.val_root={d['val']}", *d["common"]]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(d["ckpt"].read_bytes()[:500])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)

    err = one_line_error(capsys, "eval", "knn", str(truncated), *roots)
    assert "cannot be read (truncated" in err
    err = one_line_error(capsys, "eval", "linear", str(foreign), *roots)
    assert "not written by ssl-lib train" in err
    err = one_line_error(
        capsys, "eval", "knn", str(d["ckpt"]), f"data.train_root={d['train']}",
        f"data.val_root={d['odd']}", *d["common"],
    )  # fmt: skip
    assert "class folders differ" in err and "only in train: fox" in err
    assert "only in val: owl" in err
    err = one_line_error(capsys, "eval", "knn", str(d["ckpt"]), *roots, "knn.ks=[1,20]")
    assert "k=20 is larger than the bank (9 train images)" in err
    err = one_line_error(
        capsys, "eval", "knn", str(d["ckpt"]), f"data.train_root={tmp_path / 'nope'}", *roots[1:]
    )
    assert "data.train_root" in err and "does not exist" in err
    one = image_folder(tmp_path / "one", ["cat"])
    for protocol in ("knn", "linear"):
        err = one_line_error(
            capsys, "eval", protocol, str(d["ckpt"]), f"data.train_root={one}",
            f"data.val_root={one}", *d["common"],
        )  # fmt: skip
        assert "1 class found (cat)" in err and "at least 2 classes" in err
    err = one_line_error(capsys, "eval", "knn", str(d["ckpt"]), "eval/no_such_recipe")
    assert "recipe 'eval/no_such_recipe' not found" in err
    assert not (d["ckpt"].parent.parent / "eval").exists()  # nothing written by failed runs


def test_small_folder_evaluation_and_block_source(small_data, capsys):
    d = small_data
    roots = [f"data.train_root={d['train']}", f"data.val_root={d['val']}", *d["common"]]
    assert run_main("eval", "knn", str(d["ckpt"]), *roots, "knn.ks=[1,3]") == 0
    record = json.loads((d["ckpt"].parent.parent / "eval" / "knn_init.json").read_text())
    assert record["classes"] == ["cat", "dog", "fox"] and record["num_train"] == 9
    # Three classes: a top-5 would hold all of them, so none is reported.
    assert record["results"]["majority/k=3/top5"] is None
    assert "n/a" in capsys.readouterr().out
    err = one_line_error(capsys, "eval", "knn", str(d["ckpt"]), *roots, "features.source=block:2")
    assert "has no block_features" in err
