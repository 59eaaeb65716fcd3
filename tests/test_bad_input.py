"""Bad input not covered elsewhere: stray files, image modes, huge images, loader workers.

``docs/bad_input.md`` lists every kind of bad input, what it does and the test holding it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from ssl_lib.cli import main
from ssl_lib.config import ConfigError, build_eval_config, config_from_dict
from ssl_lib.data import DataError, SSLDataModule, build_base_dataset, file_list, image_folder
from ssl_lib.data.datasets import load_rgb
from ssl_lib.eval.runner import eval_datasets
from ssl_lib.methods import build_method

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root, classes=("a", "b"), per_class=2, size=8):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_non_image_files_are_ignored_by_extension(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "a" / "README.txt").write_text("notes")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "a" / "labels.csv").write_text("0,1\n")
    (root / "notes.txt").write_text("not a class")  # files in root are not classes
    (root / "b" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(root / "b" / "nested" / "deep.PNG")  # any depth, any case
    ds = image_folder(str(root))
    assert ds.classes == ["a", "b"]
    names = sorted(path.rsplit("/", 1)[1] for path, _ in ds.samples)
    assert names == ["0.png", "0.png", "1.png", "1.png", "deep.PNG"]
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))


def test_root_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(DataError, match=r"no class sub-folders; expected .*/<class>/<image>"):
        image_folder(str(tmp_path / "flat"))


def _save(path, mode: str, pixels) -> None:
    if mode == "P":
        img = Image.new("P", (4, 1))
        img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        img.putdata(pixels)
    elif mode in ("I;16", "I"):
        img = Image.fromarray(np.array([pixels], dtype=np.uint16 if mode == "I;16" else np.int32))
    else:
        img = Image.new(mode, (4, 1))
        img.putdata(pixels)
    img.save(path)


@pytest.mark.parametrize(
    ("mode", "suffix", "pixels", "rgb"),
    [
        ("L", "png", [0, 80, 160, 255], [(v, v, v) for v in (0, 80, 160, 255)]),
        ("LA", "png", [(50, 0), (90, 255)] * 2, [(50,) * 3, (90,) * 3] * 2),
        ("P", "png", [0, 1, 1, 0], [(10, 20, 30), (200, 100, 50), (200, 100, 50), (10, 20, 30)]),
        ("RGBA", "png", [(10, 20, 30, 0), (40, 50, 60, 255)] * 2, [(10, 20, 30), (40, 50, 60)] * 2),
        ("CMYK", "tiff", [(0, 0, 0, 0), (0, 255, 0, 0)] * 2, [(255, 255, 255), (255, 0, 255)] * 2),
        # 16-bit: rescaled by the image's maximum (max -> 255), not clipped to 255
        ("I;16", "png", [0, 1000, 2000, 4000], [(v, v, v) for v in (0, 63, 127, 255)]),
        ("I", "tiff", [0, 10**5, 2 * 10**5, 4 * 10**5], [(v, v, v) for v in (0, 63, 127, 255)]),
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, suffix, pixels, rgb):
    path = tmp_path / f"img.{suffix}"
    _save(path, mode, pixels)
    img = load_rgb(str(path))
    assert img.mode == "RGB"
    assert [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()] == rgb


def test_image_over_the_pixel_limit_fails_naming_it(tmp_path):
    root = make_folder(tmp_path / "data")  # 8 x 8 = 64 pixels
    bad = root / "a" / "1.png"
    Image.new("RGB", (16, 16)).save(bad)  # 256 pixels
    before = Image.MAX_IMAGE_PIXELS
    ds = image_folder(str(root), max_image_pixels=255)
    assert ds[0][0].size == (8, 8)  # under the limit: read
    with pytest.raises(DataError) as err:
        ds[1]
    message = str(err.value)
    assert "\n" not in message and f"cannot read image '{bad}': 16 x 16 = 256 pixels" in message
    assert "data.max_image_pixels=255" in message and "skip_corrupt" in message
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's own setting is left as it was
    assert image_folder(str(root), max_image_pixels=256)[1][0].size == (16, 16)  # at the limit
    assert image_folder(str(root), max_image_pixels=None)[1][0].size == (16, 16)
    # PIL's own guard would only warn up to twice its limit; the limit here is exact
    Image.MAX_IMAGE_PIXELS = 200
    try:
        with pytest.raises(DataError, match="data.max_image_pixels=255"):
            image_folder(str(root), max_image_pixels=255)[1]
        assert image_folder(str(root), max_image_pixels=1000)[1][0].size == (16, 16)
    finally:
        Image.MAX_IMAGE_PIXELS = before
    skipping = image_folder(str(root), skip_corrupt=True, max_image_pixels=255)
    with pytest.warns(UserWarning, match="1.png"):
        assert skipping[1][0].size == (8, 8)  # replaced by the next readable image
    assert skipping.num_skipped == 1


def test_pixel_limit_comes_from_the_configs(tmp_path):
    root = make_folder(tmp_path / "data", size=16)
    (tmp_path / "list.txt").write_text("a/0.png\n")
    data = {"dataset": "image_folder", "root": str(root), "max_image_pixels": 100}
    cfg = config_from_dict({"method": {"name": "byol"}, "data": data})
    with pytest.raises(DataError, match="data.max_image_pixels"):
        build_base_dataset(cfg.data)[0]
    cfg = config_from_dict(
        {"method": {"name": "byol"}, "data": data}, ["data.max_image_pixels=300"]
    )
    assert build_base_dataset(cfg.data)[0][0].size == (16, 16)
    assert (
        file_list(str(root), str(tmp_path / "list.txt"), max_image_pixels=300)[0][0].mode == "RGB"
    )
    roots = {"train_root": str(root), "val_root": str(root), "max_image_pixels": 100}
    eval_cfg = build_eval_config([("eval", OmegaConf.create({"data": roots}))])
    with pytest.raises(DataError, match="data.max_image_pixels"):
        eval_datasets(eval_cfg)[1][0]


def test_error_from_a_loader_worker_stays_one_line(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "b" / "0.png"
    bad.write_bytes(b"")
    loader = DataLoader(image_folder(str(root)), batch_size=4, num_workers=1, collate_fn=list)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"cannot read image '{bad}'")
    assert "\n" not in str(err.value)


def test_global_batch_must_split_evenly_and_fit_the_dataset(make_config):
    cfg = make_config(data={"batch_size": 18, "synthetic": {"num_samples": 64}})
    SSLDataModule(cfg.data).check(world_size=2)  # 9 per process
    with pytest.raises(DataError, match=r"batch_size=18 \(global\) does not divide evenly over 4"):
        SSLDataModule(cfg.data).check(world_size=4)
    cfg = make_config(data={"batch_size": 80, "synthetic": {"num_samples": 64}})
    with pytest.raises(DataError, match="larger than the dataset.*data.drop_last=false"):
        SSLDataModule(cfg.data).check(world_size=2)  # 40 per process, 32 samples each
    cfg = make_config(data={"batch_size": 80, "drop_last": False})
    SSLDataModule(cfg.data).check(world_size=2)  # one short batch per epoch instead


def test_setting_a_method_rejects_is_a_one_line_error(make_config, tmp_path, capsys):
    cfg = make_config("msf", method={"bank_size": 8})  # the global batch (16) does not fit
    with pytest.raises(ConfigError, match=r"method.bank_size \(8\) must be >= 16"):
        build_method(cfg)
    args = ["train", "demo/msf", "method.bank_size=8", f"run.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl-lib: error: method.bank_size (8)")
    assert not any(tmp_path.iterdir())  # nothing written for a run that could not start


# ----------------------------------------------------------------- batches of one sample
def _ssl_lib(*args: str, cwd) -> subprocess.CompletedProcess:
    """The installed ``ssl-lib`` command, run from the checkout (the shipped recipes)."""
    exe = Path(sys.executable).with_name("ssl-lib")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


QUICK = [
    "trainer.progress_bar=false",
    "monitor.knn_every_n_epochs=0",
    "monitor.online_linear=false",
    "data.num_workers=0",
]
NINE_IMAGES = ["data.synthetic.num_samples=9", "trainer.max_epochs=1", *QUICK]


def test_a_last_batch_of_one_sample_is_dropped_warned_and_counted(tmp_path):
    """9 images in batches of 8: the 9th would be a batch of one, which BatchNorm rejects."""
    out = tmp_path / "runs"
    args = ["train", "demo/byol", "data.batch_size=8", "data.drop_last=false", *NINE_IMAGES]
    proc = _ssl_lib(*args, f"run.output_dir={out}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = out / "demo_byol"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert proc.stderr.count("each epoch trains on 8 of 9 samples") == 1  # warned once
    assert "a last batch of one sample per process" in proc.stderr
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["train/dropped_samples"] == 1.0 and final["step"] == 1


def test_a_split_leaving_one_sample_per_process_is_dropped_on_every_process(tmp_path):
    """11 images over 2 processes in global batches of 4: shares of 5 would end in batches of
    one on both processes; both drop them and run the same 2 steps per epoch (no hang)."""
    out = tmp_path / "runs"
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    args = ["train", "demo/byol", "data.batch_size=4", "data.drop_last=false", *ddp, *QUICK]
    args += ["data.synthetic.num_samples=11", "trainer.max_epochs=2", f"run.output_dir={out}"]
    proc = _ssl_lib(*args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("each epoch trains on 8 of 11 samples") == 1  # rank 0 only
    final = json.loads((out / "demo_byol" / "metrics.json").read_text())["final"]
    assert final["step"] == 4 and final["train/dropped_samples"] == 3.0


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("demo/byol", "the BatchNorm layers projector.1, predictor.1, target.projector.1 need"),
        ("demo/barlow_twins", "Barlow Twins standardises the embeddings over the global batch"),
    ],
)
def test_a_configured_batch_of_one_sample_is_a_one_line_error(tmp_path, recipe, expected):
    out = tmp_path / "runs"
    proc = _ssl_lib(
        "train", recipe, "data.batch_size=1", *NINE_IMAGES, f"run.output_dir={out}", cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl-lib: error: data.batch_size=1")
    assert expected in lines[0] and "at least 2" in lines[0]
    assert not out.exists()  # stopped before the run folder


def test_a_global_batch_leaving_one_sample_per_process_is_an_error(make_config):
    cfg = make_config(trainer={"devices": 2}, data={"batch_size": 2})
    with pytest.raises(
        ConfigError,
        match=r"data.batch_size=2 gives each of 2 process\(es\) "
        r"batches of 1 sample.*a multiple of 2 of at least 4",
    ):
        build_method(cfg)
    build_method(make_config(trainer={"devices": 2}, data={"batch_size": 4}))
    # 3 over 2 processes: refused before the run folder, not split into 2 + 1
    with pytest.raises(DataError, match=r"batch_size=3 \(global\) does not divide evenly over 2"):
        build_method(make_config(trainer={"devices": 2}, data={"batch_size": 3}))
    with pytest.raises(DataError, match="does not divide evenly over 4 processes"):
        build_method(
            make_config(
                trainer={"devices": "0,1", "num_nodes": 2, "accelerator": "gpu"},
                data={"batch_size": 6},
            )
        )
    # Barlow Twins with SyncBatchNorm over 2 processes: statistics over the global batch of 2
    build_method(
        make_config(
            "barlow_twins",
            trainer={"devices": 2},
            data={"batch_size": 2},
            model={"predictor": None},
        )
    )


def test_batch_of_one_is_refused_only_where_batchnorm_sees_one_value(make_config):
    no_bn = {"projector": {"hidden_dim": 32, "out_dim": 16, "batch_norm": False}}
    build_method(make_config("moco", data={"batch_size": 1}, model=no_bn))  # 4 x 4 maps at 32 px
    tiny = make_config("moco", data={"batch_size": 1, "image_size": 8}, model=no_bn)
    with pytest.raises(ConfigError, match=r"BatchNorm layers backbone\.stages\.3\.1 need"):
        build_method(tiny)  # the last stage's map is 1 x 1 at 8 px


def test_too_few_samples_per_process_for_any_batch(make_config):
    cfg = make_config(data={"batch_size": 4, "drop_last": False, "synthetic": {"num_samples": 3}})
    SSLDataModule(cfg.data).check(world_size=1)  # one batch of 3
    with pytest.raises(DataError, match=r"gives each of 2 process\(es\) fewer than 2 samples"):
        SSLDataModule(cfg.data).check(world_size=2)  # 1 sample each
