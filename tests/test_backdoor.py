"""Poisoned data (``ssl-lib poison make``, ``PoisonedDataset``), the manifest, the backdoor
metrics and ``ssl-lib eval backdoor``; bad input of both commands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_main
from omegaconf import OmegaConf
from PIL import Image

from ssl_lib.backdoor.config import load_poison_config
from ssl_lib.backdoor.evaluate import load_probe, patched_dataset
from ssl_lib.backdoor.make import TRAIN_LIST, VAL_LIST, make_poison
from ssl_lib.backdoor.manifest import check_data, load_manifest
from ssl_lib.backdoor.metrics import (
    accuracy,
    attack_success_rate,
    backdoor_metrics,
    confusion_matrix,
    false_positives,
    normalized_fp,
    true_positives,
)
from ssl_lib.backdoor.poison import PoisonedDataset
from ssl_lib.backdoor.triggers import trigger_sha256
from ssl_lib.config import ConfigError, config_from_dict
from ssl_lib.data import DataError, SSLDataModule, file_list, image_folder
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_geometry
from ssl_lib.methods import build_method

SIZES = [(40, 30), (36, 44), (48, 48)]


def make_folder(root, counts: dict[str, int], seed: int = 0):
    """Random-noise PNG images (lossless, so pixels compare exactly) of several sizes."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


@pytest.fixture
def data(tmp_path):
    counts = {"ant": 6, "bee": 4, "cow": 5}
    train = make_folder(tmp_path / "train", counts)
    val = make_folder(tmp_path / "val", {c: 2 for c in counts}, seed=1)
    return train, val


def poison_cfg(train, val, out, *overrides):
    return load_poison_config(
        "poison/cifar10_targeted",
        [
            f"data.train_root={train}",
            f"data.val_root={val}",
            "data.image_size=16",
            "poison.trigger.width=6",
            "poison.target=bee",
            f"output={out}",
            *overrides,
        ],
    )


def arr(path_or_img) -> np.ndarray:
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return np.asarray(img.convert("RGB"), dtype=np.int64)


# ------------------------------------------------------------------ metrics
def test_metrics_against_a_hand_computed_confusion_matrix():
    conf = np.array([[5, 2, 1], [3, 4, 0], [6, 1, 2]])  # rows true, columns predicted
    true = np.repeat(np.arange(3), conf.sum(1))
    pred = np.concatenate([np.repeat(np.arange(3), row) for row in conf])
    np.testing.assert_array_equal(confusion_matrix(true, pred, 3), conf)
    np.testing.assert_array_equal(true_positives(conf), [5, 4, 2])
    np.testing.assert_array_equal(false_positives(conf), [9, 3, 1])  # column sums 14, 7, 3
    assert accuracy(conf) == pytest.approx(100 * 11 / 24)
    # Target 0: 9 of the 16 images of classes 1 and 2 are predicted as 0.
    assert attack_success_rate(conf, 0) == pytest.approx(100 * 9 / 16)
    assert attack_success_rate(conf, 2) == pytest.approx(100 * 1 / 15)  # 8 + 7 non-target
    assert normalized_fp(conf, 0) == 1.0 and normalized_fp(conf, 2) == pytest.approx(1 / 9)
    clean = np.diag([8, 7, 9])
    m = backdoor_metrics(clean, conf, 0)
    assert m["fp_target_clean"] == 0 and m["fp_target_patched"] == 9
    assert m["clean_acc"] == 100.0 and np.isnan(m["nfp_clean"])
    with pytest.raises(ValueError, match="labels must lie in"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_asr_of_predictions_leaves_out_target_images():
    # ssl-lib defend block scores its predictions through the confusion matrix
    labels, predictions = np.array([0, 1, 2, 2, 3]), np.array([2, 2, 2, 0, 1])
    conf = confusion_matrix(labels, predictions, 4)  # target 2: 2 of the 3 non-target images
    assert attack_success_rate(conf, 2) == pytest.approx(200 / 3)
    assert np.isnan(attack_success_rate(confusion_matrix(np.full(5, 2), predictions, 4), 2))


# ------------------------------------------------------------------ poison make
@pytest.mark.parametrize("opacity", [1.0, 0.6])
def test_trigger_is_pixel_exact_inside_each_box_and_nowhere_else(data, tmp_path, opacity):
    train, val = data
    out, manifest = make_poison(
        poison_cfg(train, val, tmp_path / "out", f"poison.trigger.opacity={opacity}"), False
    )
    trigger = arr(out / "trigger.png")
    assert trigger.shape == (6, 6, 3)
    assert manifest["trigger"]["sha256"] == trigger_sha256(trigger.astype(np.uint8))
    geometry = eval_geometry(16)
    records = [(r, train / r["source"], None) for r in manifest["train"] if r["poisoned"]]
    records += [(r, val / r["source"], geometry) for r in manifest["val"]]
    assert len(records) == 2 + 6  # half of the 4 bees; every val image
    for record, source, geo in records:
        original = arr(source) if geo is None else arr(geo(Image.open(source).convert("RGB")))
        copy = arr(out / record["path"])
        x, y, w, h = record["box"]
        assert copy.shape == original.shape and (w, h) == (6, 6)
        inside = np.zeros(copy.shape[:2], dtype=bool)
        inside[y : y + h, x : x + w] = True
        np.testing.assert_array_equal(copy[~inside], original[~inside])
        # opacity = 1 - alpha of Saha et al.: the trigger's weight inside the box.
        expected = np.rint(opacity * trigger + (1 - opacity) * original[inside].reshape(h, w, 3))
        np.testing.assert_array_equal(copy[inside].reshape(h, w, 3), expected)
        if opacity < 1:
            assert not np.array_equal(copy[inside].reshape(h, w, 3), trigger)
    # Train boxes inside [0.25 W, 0.75 W - w] at native size; val boxes in [0.1, 0.9] of 16 px.
    for record in manifest["train"]:
        if record["poisoned"]:
            width, height = Image.open(train / record["source"]).size
            x, y, w, h = record["box"]
            assert int(0.25 * width) <= x <= int(0.75 * width) - w
            assert int(0.25 * height) <= y <= int(0.75 * height) - h
    assert all(1 <= r["box"][0] <= 14 - 6 and 1 <= r["box"][1] <= 8 for r in manifest["val"])


def test_a_user_trigger_image_keeps_its_aspect(data, tmp_path):
    train, val = data
    user = tmp_path / "trigger.png"
    Image.fromarray(np.full((5, 10, 3), (250, 20, 90), dtype=np.uint8)).save(user)
    out, manifest = make_poison(
        poison_cfg(train, val, tmp_path / "out", f"poison.trigger.image={user}"), False
    )
    np.testing.assert_array_equal(arr(out / "trigger.png"), np.full((3, 6, 3), (250, 20, 90)))
    assert manifest["trigger"]["image"] == str(user) and manifest["trigger"]["height"] == 3
    assert all(r["box"][2:] == [6, 3] for r in manifest["val"])


def test_rate_bookkeeping_and_file_lists(data, tmp_path):
    train, val = data
    out, manifest = make_poison(poison_cfg(train, val, tmp_path / "t", "poison.rate=0.5"), False)
    rate = manifest["attack"]["rate"]
    assert (rate["num_candidates"], rate["num_poisoned"], rate["num_train"]) == (4, 2, 15)
    assert rate["of_candidates"] == 0.5 and rate["of_train"] == pytest.approx(2 / 15)
    poisoned = [r for r in manifest["train"] if r["poisoned"]]
    assert {r["label"] for r in poisoned} == {1} and manifest["attack"]["target"]["name"] == "bee"
    assert all(r["box"] is None for r in manifest["train"] if not r["poisoned"])
    # The train list: every image, poisoned ones at their PNG copy, the others at the original.
    lines = (out / TRAIN_LIST).read_text().split("\n")[:-1]
    assert len(lines) == 15
    listed = file_list(None, str(out / TRAIN_LIST))
    expected = [
        (str(out / r["path"]) if r["poisoned"] else str(train / r["source"]), r["label"])
        for r in manifest["train"]
    ]
    assert listed.samples == expected
    assert len((out / VAL_LIST).read_text().splitlines()) == 6
    loaded = load_manifest(out)
    assert loaded.target == 1 and loaded.classes == ["ant", "bee", "cow"]
    assert [r.path for r in loaded.train] == [p for p, _ in expected]
    check_data(loaded, train)

    out, manifest = make_poison(
        poison_cfg(train, val, tmp_path / "u", "poison.targeted=false", "poison.rate=0.2"), False
    )
    rate = manifest["attack"]["rate"]
    assert (rate["num_candidates"], rate["num_poisoned"], rate["of_train"]) == (15, 3, 0.2)
    assert manifest["attack"]["target"] is None and load_manifest(out).target is None


def test_same_seed_same_manifest_and_copies(data, tmp_path):
    train, val = data
    out1, _ = make_poison(poison_cfg(train, val, tmp_path / "a"), False)
    out2, _ = make_poison(poison_cfg(train, val, tmp_path / "b"), False)
    assert (out1 / "manifest.json").read_bytes() == (out2 / "manifest.json").read_bytes()
    copies = sorted(p.relative_to(out1) for p in out1.rglob("*.png"))
    assert copies and copies == sorted(p.relative_to(out2) for p in out2.rglob("*.png"))
    assert all((out1 / c).read_bytes() == (out2 / c).read_bytes() for c in copies)
    out3, _ = make_poison(poison_cfg(train, val, tmp_path / "c", "poison.seed=1"), False)
    assert (out3 / "manifest.json").read_bytes() != (out1 / "manifest.json").read_bytes()
    # A second run to the same output never overwrites the first.
    again, _ = make_poison(poison_cfg(train, val, tmp_path / "a"), False)
    assert again.name == "a_1"


def test_poisoned_dataset_is_deterministic_and_matches_the_copies(data, tmp_path):
    train, val = data
    cfg = poison_cfg(train, val, tmp_path / "out", "poison.rate=1.0")
    out, manifest = make_poison(cfg, False)
    ds = PoisonedDataset(image_folder(str(train)), cfg.poison)
    assert sorted(ds.poisoned) == [i for i, r in enumerate(manifest["train"]) if r["poisoned"]]
    for i, record in enumerate(manifest["train"]):
        img, label = ds[i]
        assert label == record["label"]
        np.testing.assert_array_equal(arr(img), arr(ds[i][0]))  # same item, same pixels
        source = out / record["path"] if record["poisoned"] else train / record["source"]
        np.testing.assert_array_equal(arr(img), arr(source))
    # From a training recipe: data.poison poisons the training set on the fly.
    spec = OmegaConf.to_container(cfg.poison)
    run_cfg = config_from_dict(
        {
            "method": {"name": "byol"},
            "data": {
                "dataset": "image_folder",
                "root": str(train),
                "image_size": 16,
                "poison": spec,
            },
        },
    )
    base = SSLDataModule(run_cfg.data).build_train_set().base
    assert isinstance(base, PoisonedDataset) and base.poisoned == ds.poisoned


def test_file_list_takes_absolute_paths_and_extra_roots(data, tmp_path):
    train, _ = data
    extra = make_folder(tmp_path / "copies", {"bee": 1}, seed=3)
    (extra / "bee" / "0.png").rename(extra / "bee" / "9.png")
    Image.new("RGB", (4, 4)).save(extra / "bee" / "0.png")  # shadowed by train/bee/0.png
    lst = tmp_path / "list.txt"
    lst.write_text(f"ant/0.png\nbee/0.png\nbee/9.png\n{train / 'cow' / '1.png'} 2\n")
    ds = file_list(str(train), str(lst), extra_roots=[str(extra)])
    assert ds.samples == [
        (str(train / "ant" / "0.png"), 0),
        (str(train / "bee" / "0.png"), 1),  # root first
        (str(extra / "bee" / "9.png"), 1),  # not under root: found under the extra root
        (str(train / "cow" / "1.png"), 2),  # absolute, labelled
    ]
    lst.write_text(f"{train / 'cow' / '1.png'}\n")
    with pytest.raises(DataError, match="give the label after the path"):
        file_list(str(train), str(lst))
    lst.write_text("ant/9.png\n")
    with pytest.raises(DataError, match=r"list.txt:1: image 'ant/9.png' not found under"):
        file_list(str(train), str(lst), extra_roots=[str(extra)])


# ------------------------------------------------------------------ the two commands
TINY = [
    "model.backbone=tiny_cnn",
    "model.projector.hidden_dim=32",
    "model.projector.out_dim=16",
    "model.predictor.hidden_dim=32",
    "model.predictor.out_dim=16",
]


def save_random_init(path) -> None:
    torch.manual_seed(0)
    method = build_method(config_from_dict({"method": {"name": "byol"}}, TINY))
    path.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)


def eval_args(train, val, manifest):
    return [
        f"data.train_root={train}",
        f"data.val_root={val}",
        "data.image_size=16",
        "data.num_workers=0",
        "features.progress_bar=false",
        f"backdoor.manifest={manifest}",
        "linear.epochs=2",  # the recipe's UMBC protocol: augmented crops, standardised head
        "linear.milestones=[1]",
    ]


def test_poison_make_and_eval_backdoor_commands(data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "poisoned"
    args = [f"data.train_root={train}", f"data.val_root={val}", "data.image_size=16"]
    assert (
        run_main(
            "poison",
            "make",
            "poison/cifar10_targeted",
            *args,
            "poison.trigger.width=6",
            "poison.target=1",
            f"output={out}",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "bee (label 1)" in printed and "2 of 4 candidates" in printed and str(out) in printed
    ckpt = tmp_path / "run" / "checkpoints" / "init.ckpt"
    save_random_init(ckpt)
    assert (
        run_main(
            "eval",
            "backdoor",
            str(ckpt),
            "eval/cifar10_backdoor_linear_umbc",
            *eval_args(train, val, out),
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ASR %" in printed and "linear" in printed
    folder = tmp_path / "run" / "eval" / "backdoor_init"
    record = json.loads((folder / "backdoor.json").read_text())
    results = record["results"]["linear"]
    conf_clean = np.load(folder / "linear" / "conf_matrix_clean.npy")
    conf_patched = np.load(folder / "linear" / "conf_matrix_patched.npy")
    assert conf_clean.sum() == 6 and conf_patched.sum() == 6  # 2 images x 3 classes each
    assert results == {"target": 1, **backdoor_metrics(conf_clean, conf_patched, 1)}
    rows = list(csv.DictReader((folder / "linear" / "per_class.csv").open()))
    assert [r["class"] for r in rows] == ["ant", "bee", "cow"]
    assert int(rows[1]["fp_patched"]) == results["fp_target_patched"]
    for name in (
        "patched_examples.png",
        "linear/conf_matrix_clean.png",
        "linear/conf_matrix_patched.png",
    ):
        assert Image.open(folder / name).format == "PNG"
    probe = load_probe(folder / "linear_probe.pt")
    assert probe.fc.out_features == 3
    assert not probe.training and probe.standardize  # the UMBC head, ready for inference

    knn = ["eval/backdoor_knn", *eval_args(train, val, out), "knn.ks=[1,3]"]
    assert run_main("eval", "backdoor", str(ckpt), *knn, f"output={tmp_path / 'knn'}") == 0
    record = json.loads((tmp_path / "knn" / "backdoor.json").read_text())
    for k in (1, 3):
        r = record["results"][f"knn_k{k}"]
        conf = np.load(tmp_path / "knn" / f"knn_k{k}" / "conf_matrix_patched.npy")
        assert r["fp_target_patched"] == int(false_positives(conf)[1])
    assert not (tmp_path / "knn" / "linear_probe.pt").exists()


def test_patched_images_are_not_resized_or_cropped_again(tmp_path):
    # Above 64 px the evaluation geometry resizes to size / 0.875 and crops: applied a second
    # time it would move and shrink the trigger.
    train = make_folder(tmp_path / "train", {"ant": 2, "bee": 2})
    val = make_folder(tmp_path / "val", {"ant": 1, "bee": 1}, seed=1)
    out, _ = make_poison(poison_cfg(train, val, tmp_path / "out", "data.image_size=72"), False)
    manifest = load_manifest(out)
    ds = patched_dataset(manifest)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    for i, record in enumerate(manifest.val):
        pixels = torch.from_numpy(arr(record.path)).permute(2, 0, 1).float() / 255
        image, label, index = ds[i]
        assert image.shape == (3, 72, 72) and (label, index) == (record.label, i)
        torch.testing.assert_close(image, (pixels - mean) / std)


def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "out"
    base = [
        "poison",
        "make",
        "poison/cifar10_targeted",
        f"data.train_root={train}",
        f"data.val_root={val}",
        "data.image_size=16",
        f"output={out}",
        "poison.target=bee",
    ]
    err = one_line_error(capsys, *base, "poison.trigger.width=40")
    assert "40 x 40 px trigger does not fit into training image" in err
    err = one_line_error(capsys, *base, "poison.trigger.width=14")
    assert "does not fit into the validation images (16 x 16 px)" in err  # fits the bees
    for rate in ("0", "1.5"):
        err = one_line_error(capsys, *base, f"poison.rate={rate}")
        assert f"poison.rate must lie in (0, 1], got {float(rate)}" in err
    err = one_line_error(capsys, *base, "poison.target=zebra")
    assert "target 'zebra' (poison target) is not a class" in err and "ant, bee, cow" in err
    err = one_line_error(capsys, *base, "poison.target=3")
    assert "label 0..2" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    made, _ = make_poison(poison_cfg(train, val, out), False)
    ckpt = tmp_path / "run" / "checkpoints" / "init.ckpt"
    save_random_init(ckpt)
    other = make_folder(tmp_path / "other", {"ant": 2, "bee": 2, "cow": 1}, seed=5)
    (other / "cow" / "0.png").rename(other / "cow" / "renamed.png")
    args = eval_args(train, other, made)
    err = one_line_error(capsys, "eval", "backdoor", str(ckpt), "eval/backdoor_linear_umbc", *args)
    assert "does not match the val folder" in err and "'cow/0.png' is missing" in err
    odd = make_folder(tmp_path / "odd", {"ant": 2, "bee": 2, "owl": 2}, seed=6)
    with pytest.raises(
        DataError, match="class folders differ .*missing: cow; not in the manifest: owl"
    ):
        check_data(load_manifest(made), odd)
    err = one_line_error(
        capsys,
        "eval",
        "backdoor",
        str(ckpt),
        "eval/backdoor_linear_umbc",
        *eval_args(train, val, made),
        "data.image_size=32",
    )
    assert "patched images of" in err and "set data.image_size=16" in err
    err = one_line_error(
        capsys,
        "eval",
        "backdoor",
        str(ckpt),
        "eval/backdoor_linear_umbc",
        *eval_args(train, val, tmp_path / "nowhere"),
    )
    assert "poison manifest" in err and "does not exist" in err
    assert not (tmp_path / "run" / "eval").exists()
    with pytest.raises(ConfigError, match="poison.target must name the target class"):
        load_poison_config("poison/cifar10_targeted", ["poison.target=null"])
    with pytest.raises(ConfigError, match=r"poison.trigger.opacity must lie in \(0, 1\], got 0"):
        load_poison_config("poison/cifar10_targeted", ["poison.trigger.opacity=0"])
    with pytest.raises(ConfigError, match=r"poison.val_band must be \[lo, hi\] with 0 <= lo < hi"):
        load_poison_config("poison/cifar10_targeted", ["poison.val_band=[0.9,0.1]"])
