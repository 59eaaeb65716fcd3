"""data.loader: dali (NVIDIA DALI). The loader tests run where DALI is installed (on the CPU);
the configuration errors are checked everywhere."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_config

from ssl_lib.config import config_from_dict
from ssl_lib.data import SSLDataModule
from ssl_lib.data.datasets import DataError
from ssl_lib.schema import ConfigError
from ssl_lib.train import train

DALI = ["data.loader=dali", "data.augment_on=device"]


def _file_list(root: Path, tmp_path: Path, n: int = 12) -> list[str]:
    """A file_list of the first ``n`` CIFAR-10 training images of two classes."""
    lines = [
        f"{cls}/{p.name}"
        for cls in ("bird", "cat")
        for p in sorted((root / "train" / cls).iterdir())[: n // 2]
    ]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return [
        "data.dataset=file_list",
        f"data.root={root / 'train'}",
        f"data.file_list={tmp_path / 'list.txt'}",
        "data.batch_size=8",
        "data.drop_last=false",
    ]


def test_dali_missing_is_a_one_line_config_error(monkeypatch, cifar10_root, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali fails
    with pytest.raises(ConfigError, match=r"pip install ssl_lib\[dali\]") as err:
        config_from_dict(tiny_config(), [*DALI, *_file_list(cifar10_root, tmp_path)])
    assert "\n" not in str(err.value) and "data.loader" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "needs"),
    [
        (["data.loader=dali", "data.augment_on=device"], "image_folder or file_list"),
        (["data.loader=dali", "data.dataset=image_folder", "data.root=x"], "augment_on=device"),
    ],
)
def test_dali_refuses_what_it_cannot_make(overrides, needs):
    with pytest.raises(ConfigError, match=needs):
        config_from_dict(tiny_config(), overrides)


@pytest.fixture
def cifar_list(cifar10_root, tmp_path) -> list[str]:
    """Overrides for 12 CIFAR-10 images in two batches, with two views; needs DALI."""
    pytest.importorskip("nvidia.dali")
    return [*_file_list(cifar10_root, tmp_path), "data.views=[strong,byol2]"]


def _batches(overrides: list[str], seed: int = 3) -> list:
    cfg = config_from_dict(tiny_config(), overrides)
    return list(SSLDataModule(cfg.data, seed=seed).train_dataloader())


def test_dali_views_are_the_device_views(cifar_list):
    """Same samples, same drawn parameters as data.augment_on=device; pixels within the
    rounding of two JPEG decoders and resize implementations."""
    dali = _batches([*DALI, *cifar_list])
    ref = _batches(["data.augment_on=device", *cifar_list])
    assert len(dali) == len(ref) == 2
    for (views, labels, index), (ref_views, ref_labels, ref_index) in zip(dali, ref, strict=True):
        assert torch.equal(index, ref_index) and torch.equal(labels, ref_labels)
        for view, ref_view in zip(views, ref_views, strict=True):
            assert view["image"].dtype == torch.uint8 and view["image"].shape[1:] == (3, 32, 32)
            assert torch.equal(view["params"], ref_view["params"])
            diff = (view["image"].float() - ref_view["image"].float()).abs()
            assert diff.mean() < 0.5 and diff.max() <= 2
    cfg = config_from_dict(tiny_config(), [*DALI, *cifar_list])
    finished = SSLDataModule(cfg.data).on_after_batch_transfer(dali[0], 0)[0]
    assert [v.dtype for v in finished] == [torch.float32] * 2


def test_dali_loader_resumes_exactly(cifar_list):
    """A loader restored after batch 1 of 2 yields batch 2 again, bit for bit."""
    cfg = config_from_dict(tiny_config(), [*DALI, *cifar_list])
    dm = SSLDataModule(cfg.data, seed=3)
    full = list(dm.train_dataloader())
    state = {**dm.position(), "epoch": 0, "batches_done": 1, "epoch_done": False}
    resumed = SSLDataModule(cfg.data, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 1
    (views, _, index), (ref_views, _, ref_index) = rest[0], full[1]
    assert torch.equal(index, ref_index)
    for view, ref_view in zip(views, ref_views, strict=True):
        assert torch.equal(view["image"], ref_view["image"])
        assert torch.equal(view["params"], ref_view["params"])


def test_dali_loader_refuses_images_over_max_image_pixels(cifar_list):
    cfg = config_from_dict(tiny_config(), [*DALI, *cifar_list, "data.max_image_pixels=1000"])
    with pytest.raises(DataError, match=r"image '.*\.jpg' has 32 x 32 pixels.*max_image_pix"):
        next(iter(SSLDataModule(cfg.data).train_dataloader()))


class KeepStep2(pl.Callback):
    """Copies last.ckpt as written after global step 2 (mid-epoch: step 2 of 4)."""

    def __init__(self, ckpt: Path, into: Path) -> None:
        self.ckpt, self.into = ckpt, into

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            shutil.copy(self.ckpt, self.into)


def test_dali_training_resumes_exactly(cifar10_root, tmp_path):
    """Trained 4 steps straight, or 2 steps, checkpoint, then 2 more: the same weights."""
    pytest.importorskip("nvidia.dali")
    common = [
        *DALI,
        *_file_list(cifar10_root, tmp_path, n=32),
        "data.drop_last=true",
        "trainer.checkpoint_every_n_steps=2",
        f"run.output_dir={tmp_path}",
    ]
    kept = tmp_path / "step2.ckpt"
    ref_dir = train(
        config_from_dict(tiny_config(), [*common, "run.name=ref"]),
        callbacks=[KeepStep2(tmp_path / "ref" / "checkpoints" / "last.ckpt", kept)],
    )
    res_dir = train(
        config_from_dict(tiny_config(), [*common, "run.name=resumed"]), resume_from=kept
    )
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(res_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
