"""torchvision CIFAR-10 / CIFAR-100 data (``data.dataset: cifar10``) without any download.

A tiny fake CIFAR-10 is written in torchvision's on-disk format (the python pickle batches
``data_batch_1..5``, ``test_batch`` and ``batches.meta`` under ``cifar-10-batches-py/``), and
torchvision's checksums are pointed at the fake files, so the real ``torchvision.datasets.CIFAR10``
code path, integrity check included, reads it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from conftest import run_main
from omegaconf import OmegaConf
from PIL import Image

from ssl_lib.config import DataConfig, load_config, load_eval_config
from ssl_lib.data import build_base_dataset
from ssl_lib.data.datasets import DataError
from ssl_lib.eval.monitors import monitor_subsets
from ssl_lib.eval.runner import eval_datasets

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH, TEST_IMAGES = 8, 20  # 5 x 8 = 40 training images
TINY = [
    "model.backbone=tiny_cnn",
    "model.projector.hidden_dim=32",
    "model.projector.out_dim=16",
    "model.predictor.hidden_dim=32",
    "model.predictor.out_dim=16",
]


def _images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``n`` 32 x 32 images, rows of 3072 uint8 (R, G, B planes), one colour per class."""
    rng = np.random.default_rng(seed)
    labels = [int(c) for c in rng.integers(0, len(CLASSES), n)]
    base = np.array([[25 * c, 255 - 25 * c, (70 * c) % 256] for c in labels], dtype=np.float64)
    noise = rng.normal(0, 20, (n, 3, 32 * 32))
    planes = np.clip(base[:, :, None] + noise, 0, 255).astype(np.uint8)
    return planes.reshape(n, 3072), labels


def write_fake_cifar10(root: Path) -> dict[str, str]:
    """torchvision's CIFAR-10 layout under ``root``; returns the MD5 of every file written."""
    folder = root / tv_cifar.CIFAR10.base_folder
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _images(PER_BATCH, i) for i in range(1, 6)}
    batches["test_batch"] = _images(TEST_IMAGES, 99)
    md5 = {}
    for name, (data, labels) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}, protocol=2))
    for path in folder.iterdir():
        md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    """A folder holding a tiny CIFAR-10 that ``torchvision.datasets.CIFAR10`` accepts."""
    root = tmp_path / "cifar"
    md5 = write_fake_cifar10(root)
    cls = tv_cifar.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
    return root


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def test_reads_both_splits_of_torchvision_cifar10(fake_cifar10):
    cfg = data_cfg(dataset="cifar10", root=str(fake_cifar10), image_size=32)
    train, test = build_base_dataset(cfg, train=True), build_base_dataset(cfg, train=False)
    assert len(train) == 5 * PER_BATCH and len(test) == TEST_IMAGES
    assert train.classes == CLASSES
    img, label = train[3]
    assert isinstance(img, Image.Image) and img.size == (32, 32)
    data, labels = _images(PER_BATCH, 1)
    assert label == labels[3]
    # torchvision turns the R, G, B planes of a row into an HWC image
    expected = data[3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(img), expected)


def test_missing_copy_without_download_is_one_line_error(tmp_path):
    cfg = data_cfg(dataset="cifar10", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DataError) as err:
        build_base_dataset(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nothing" / "cifar-10-batches-py") in message
    assert "data.download=true" in message
    with pytest.raises(DataError, match="data.root must name the folder"):
        build_base_dataset(data_cfg(dataset="cifar100", root=None))


def test_download_failure_is_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    cfg = data_cfg(dataset="cifar10", root=str(tmp_path), download=True)
    with pytest.raises(DataError, match=r"could not download cifar10 into .*no network") as err:
        build_base_dataset(cfg)
    assert "\n" not in str(err.value)


def test_download_true_fetches_a_missing_copy_and_reuses_it(tmp_path, monkeypatch):
    root = tmp_path / "data"
    md5: dict[str, str] = {}
    calls = []

    def fake_download(url, download_root, **kwargs):  # stands in for the network
        calls.append(url)
        md5.update(write_fake_cifar10(Path(download_root)))
        cls = tv_cifar.CIFAR10
        monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    cfg = data_cfg(dataset="cifar10", root=str(root), download=True)
    assert len(build_base_dataset(cfg)) == 5 * PER_BATCH
    assert len(build_base_dataset(cfg, train=False)) == TEST_IMAGES
    assert calls == [tv_cifar.CIFAR10.url]  # the second split found the copy in place


def test_monitor_queries_come_from_the_test_split(fake_cifar10):
    cfg = load_config("cifar10/msf", [f"data.root={fake_cifar10}", "data.download=false"])
    bank, queries = monitor_subsets(cfg.data, train_samples=30, val_samples=15, seed=0)
    assert len(bank) == 30 and len(queries) == 15
    assert bank.dataset.train and not queries.dataset.train


def test_eval_recipes_read_torchvision_cifar10(fake_cifar10):
    cfg = load_eval_config(
        "eval/cifar10_knn_umbc", [f"data.train_root={fake_cifar10}", "data.download=false"]
    )
    train, val = eval_datasets(cfg)
    assert len(train) == 5 * PER_BATCH and len(val) == TEST_IMAGES
    assert list(train.classes) == CLASSES
    missing = load_eval_config(
        "eval/cifar10_knn_umbc", [f"data.train_root={fake_cifar10.parent}", "data.download=false"]
    )
    with pytest.raises(DataError, match=r"no complete copy in .*data\.train_root"):
        eval_datasets(missing)


def test_cifar_recipe_trains_with_monitor_and_evaluates(fake_cifar10, tmp_path, capsys):
    """``cifar10/msf`` on torchvision's format: training with the kNN monitor, then eval knn."""
    train_args = [
        f"data.root={fake_cifar10}",
        "data.download=false",
        "data.batch_size=16",
        "data.num_workers=0",
        "method.bank_size=64",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.strategy=auto",
        "trainer.progress_bar=false",
        "monitor.knn_every_n_epochs=1",
        "monitor.knn_train_samples=40",
        "monitor.knn_val_samples=20",
        "monitor.knn_k=5",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    assert run_main("train", "cifar10/msf", *train_args) == 0
    run_dir = tmp_path / "runs" / "msf_cifar10"
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert 0 <= final["monitor/knn_top1"] <= 100 and final["step"] == 2
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval_args = [
        f"data.train_root={fake_cifar10}",
        "data.download=false",
        "data.num_workers=0",
        "features.progress_bar=false",
        "features.device=cpu",
    ]
    capsys.readouterr()
    assert run_main("eval", "knn", str(ckpt), "eval/cifar10_knn_umbc", *eval_args) == 0
    assert "(40 train / 20 val images, 10 classes)" in capsys.readouterr().out
