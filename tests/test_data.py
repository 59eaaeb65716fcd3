"""Datasets, view pipelines and the errors for bad data."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lib.data import (
    DataError,
    IndexedDataset,
    MultiView,
    SSLDataModule,
    SyntheticPatterns,
    file_list,
    image_folder,
)
from ssl_lib.data.sampling import EpochSampler
from ssl_lib.data.transforms import VIEWS, eval_transform


def test_synthetic_is_deterministic_and_balanced():
    a, b = SyntheticPatterns(30, 10, 32, seed=3), SyntheticPatterns(30, 10, 32, seed=3)
    assert np.asarray(a[7][0]).tolist() == np.asarray(b[7][0]).tolist()
    other = SyntheticPatterns(30, 10, 32, seed=4)
    assert np.asarray(a[7][0]).tolist() != np.asarray(other[7][0]).tolist()
    assert [a[i][1] for i in range(30)].count(0) == 3
    assert a[0][0].size == (32, 32) and a[0][0].mode == "RGB"


@pytest.mark.parametrize("name", VIEWS.names())
@pytest.mark.parametrize("size", [32, 96])
def test_every_view_pipeline_gives_normalised_tensors(name, size):
    torch.manual_seed(0)  # the augmentations draw from the global generator
    img = SyntheticPatterns(1, 10, 40, 0)[0][0]
    out = VIEWS.get(name)(size)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert out.min() < 0 < out.max()  # normalised


def test_indexed_dataset_yields_views_label_index():
    ds = IndexedDataset(SyntheticPatterns(12, 4, 32, 0), MultiView(["strong", "weak"], 32))
    views, label, index = ds[5]
    assert len(views) == 2 and views[0].shape == (3, 32, 32)
    assert label == 5 % 4 and index == 5
    assert not torch.equal(views[0], views[1])
    x, _, _ = IndexedDataset(SyntheticPatterns(2, 2, 32, 0), eval_transform(32))[1]
    assert x.shape == (3, 32, 32)


def make_folder(root, classes=("a", "b"), per_class=3):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_reads_and_converts_modes(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.new("L", (8, 8), 128).save(root / "a" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(root / "a" / "rgba.png")
    Image.new("CMYK", (8, 8), (1, 2, 3, 4)).save(root / "b" / "cmyk.jpg")
    Image.new("I;16", (8, 8), 4000).save(root / "b" / "deep.png")
    ds = image_folder(str(root))
    assert ds.classes == ["a", "b"] and len(ds) == 10
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))


def test_missing_root_and_empty_class(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"))
    root = make_folder(tmp_path / "data")
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*c' holds no image files"):
        image_folder(str(root))


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_corrupt_file_fails_naming_it_or_is_skipped(tmp_path, content):
    root = make_folder(tmp_path / "data")
    bad = root / "a" / "1.png"
    if content is None:  # truncated JPEG
        Image.new("RGB", (64, 64), (9, 9, 9)).save(root / "a" / "big.jpg", quality=95)
        data = (root / "a" / "big.jpg").read_bytes()
        (root / "a" / "big.jpg").unlink()
        bad.write_bytes(data[: len(data) // 3])
    else:
        bad.write_bytes(content)
    ds = image_folder(str(root))
    with pytest.raises(DataError, match=f"cannot read image '{bad}'.*skip_corrupt"):
        ds[1]
    ds = image_folder(str(root), skip_corrupt=True)
    with pytest.warns(UserWarning, match="1.png"):
        img, label = ds[1]
    assert img.mode == "RGB" and label == 0 and ds.num_skipped == 1


def test_file_list(tmp_path):
    root = make_folder(tmp_path / "data")
    lst = tmp_path / "subset.txt"
    lst.write_text("a/0.png\nb/2.png 1\n# comment\n\n")
    ds = file_list(str(root), str(lst))
    assert [label for _, label in ds.samples] == [0, 1]
    lst.write_text("a/0.png\nb/9.png\n")
    with pytest.raises(DataError, match=r"subset.txt:2: image 'b/9.png' not found"):
        file_list(str(root), str(lst))
    lst.write_text("a/0.png 7\n")
    with pytest.raises(DataError, match=r"subset.txt:1: label 7 outside 0..1"):
        file_list(str(root), str(lst))
    shutil.copytree(root / "a", tmp_path / "other")
    lst.write_text("../other/0.png\n")
    with pytest.raises(DataError, match="not a class"):
        file_list(str(root), str(lst))


# ----------------------------------------------------------------- folder scanning vs torchvision
def _img(path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (len(path.name) * 9 % 256, 0, 0)).save(path, format=fmt)


def _tree_linked_subfolder(tmp):
    """The reported case: 2 images and a link to a folder of 3 more."""
    root = tmp / "data"
    for i in range(2):
        _img(root / "a" / f"{i}.png")
    for i in range(3):
        _img(tmp / "elsewhere" / f"x{i}.png")
    (root / "a" / "more").symlink_to(tmp / "elsewhere", target_is_directory=True)
    _img(root / "b" / "0.png")
    return root


def _tree_everything(tmp):
    """Nested folders, links to folders and files, case, hidden and odd names, diamonds."""
    root = tmp / "data"
    _img(root / "cat" / "z.png")
    _img(root / "cat" / "deep" / "er" / "1.JPG", "JPEG")
    _img(root / "cat" / "b-c" / "1.Jpeg", "JPEG")
    _img(root / "cat" / "b" / "2.png")
    _img(root / "cat" / ".hidden.png")
    _img(root / "cat" / ".hidden_dir" / "3.PNG")
    _img(root / "cat" / ".png")  # a name that is only an extension: torchvision keeps it
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / "png").write_bytes(b"\0")  # no dot: not an image name
    _img(tmp / "shared" / "s1.png")
    _img(tmp / "shared" / "sub" / "s2.tif", "TIFF")
    (root / "cat" / "shared").symlink_to(tmp / "shared", target_is_directory=True)
    (root / "cat" / "b" / "shared_again").symlink_to(tmp / "shared", target_is_directory=True)
    (root / "cat" / "linked.png").symlink_to(tmp / "shared" / "s1.png")
    (root / "cat" / "broken.png").symlink_to(tmp / "nowhere.png")  # kept, fails when read
    _img(tmp / "dogs" / "d.webp", "WEBP")
    (root / "dog").symlink_to(tmp / "dogs", target_is_directory=True)  # a class that is a link
    (root / "dog" / "cats").symlink_to(root / "cat", target_is_directory=True)  # another class
    _img(root / ".hidden_class" / "h.bmp", "BMP")
    _img(root / "top_level.png")  # files directly in the root are no class's
    return root


@pytest.mark.parametrize("make_tree", [_tree_linked_subfolder, _tree_everything])
def test_image_folder_lists_what_torchvision_image_folder_lists(tmp_path, make_tree):
    from torchvision.datasets import ImageFolder

    root = make_tree(tmp_path)
    reference = ImageFolder(str(root))
    ds = image_folder(str(root))
    assert ds.classes == reference.classes
    assert ds.samples == reference.samples  # same files, labels and order
    if make_tree is _tree_linked_subfolder:
        assert len(ds) == 6  # 5 in class a (2 + 3 behind the link), 1 in b


def test_broken_link_is_an_unreadable_image(tmp_path):
    root = _tree_everything(tmp_path)
    ds = image_folder(str(root))
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    with pytest.raises(DataError, match=r"cannot read image '.*broken.png'"):
        ds[broken]


def test_link_loops_are_followed_once(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "data"
    for name in ("0.png", "sub/1.png", "sub/deeper/2.png"):
        _img(root / "a" / name)
    _img(root / "b" / "0.png")
    loop_free = ImageFolder(str(root)).samples
    # two loops in one folder: os.walk(followlinks=True) would branch at every turn
    (root / "a" / "sub" / "deeper" / "up").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "sub" / "deeper" / "here").symlink_to(
        root / "a" / "sub" / "deeper", target_is_directory=True
    )
    (root / "a" / "sub" / "data").symlink_to(root, target_is_directory=True)
    with pytest.warns(UserWarning, match="link loop") as caught:
        ds = image_folder(str(root))
    messages = [str(w.message) for w in caught]
    assert any("deeper/up'" in m for m in messages) and any("deeper/here'" in m for m in messages)
    # each of a's files once, b's file also in a through the link to the data folder
    a = root / "a"
    assert ds.samples == [
        (str(a / "0.png"), 0),
        (str(a / "sub" / "1.png"), 0),
        (str(a / "sub" / "data" / "b" / "0.png"), 0),
        (str(a / "sub" / "deeper" / "2.png"), 0),
        (str(root / "b" / "0.png"), 1),
    ]
    (a / "sub" / "deeper" / "up").unlink()
    (a / "sub" / "deeper" / "here").unlink()
    (a / "sub" / "data").unlink()
    assert image_folder(str(root)).samples == loop_free  # no loop left: torchvision's list


def test_unreadable_sub_folder_is_an_error(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    (root / "a" / "private").mkdir()
    scandir = os.scandir

    def denied(path):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match=r"cannot read folder '.*a/private': Permission denied"):
        image_folder(str(root))


# ----------------------------------------------------------------- one-sample batches
def test_sampler_drops_a_last_batch_of_one_sample_on_every_process():
    # 11 samples, 2 processes, 2 per process: shares of 5 would end in a batch of 1
    shards = [EpochSampler(11, 2, 3, r, 2, min_last_batch=2) for r in range(2)]
    plain = [EpochSampler(11, 2, 3, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4] and all(s.short_batch_dropped for s in shards)
    assert shards[0].dropped == 3  # 1 for equal shares, 1 per process for the short batch
    for s, p in zip(shards, plain, strict=True):
        assert list(s) == list(p)[:4]  # the same order, cut: positions in an epoch unchanged
        s.resume_at(0, 1)
        assert list(s) == list(p)[2:4]
    dropped_last = EpochSampler(11, 2, 3, 0, 2, drop_last=True)
    assert len(dropped_last) == 4 and not dropped_last.short_batch_dropped
    assert len(EpochSampler(12, 4, min_last_batch=2)) == 12  # a last batch of 4 stays
    assert len(EpochSampler(10, 4, min_last_batch=2)) == 10  # a last batch of 2 stays
    assert len(EpochSampler(9, 1, min_last_batch=2)) == 9  # batches of 1 are asked for


def test_loader_never_yields_a_batch_of_one_and_counts_what_it_drops(make_config):
    cfg = make_config(data={"batch_size": 8, "drop_last": False, "synthetic": {"num_samples": 9}})
    dm = SSLDataModule(cfg.data, seed=0)
    with pytest.warns(UserWarning, match="trains on 8 of 9 samples"):
        loader = dm.train_dataloader()
    assert [len(index) for _, _, index in loader] == [8] and len(loader) == 1
    assert dm.dropped_samples == 1
    # a global batch split over processes: every process runs the same number of batches,
    # none of one sample (11 over 2 processes in 2s, 11 over 3 in 2s: shares of 5 and 3)
    for num, batch, world in [(11, 4, 2), (11, 6, 3), (9, 8, 1), (64, 16, 4)]:
        data = {"batch_size": batch, "drop_last": False, "synthetic": {"num_samples": num}}
        dm = SSLDataModule(make_config(data=data).data, seed=0)
        per = batch // world  # what the DataLoader cuts each share into
        shares = [len(dm.sampler(world, r)) for r in range(world)]
        sizes = [[min(per, n - i) for i in range(0, n, per)] for n in shares]
        assert all(s == sizes[0] for s in sizes) and min(sizes[0]) >= 2
        assert num - world * shares[0] == dm.sampler(world).dropped
    cfg = make_config(data={"batch_size": 8, "synthetic": {"num_samples": 10}})
    dm = SSLDataModule(cfg.data, seed=0)
    dm.train_dataloader()  # data.drop_last=true drops 2: counted, not warned
    assert dm.dropped_samples == 2


def test_batch_bounds_join_a_lone_last_sample_to_the_batch_before():
    from ssl_lib.data.sampling import batch_bounds

    assert [list(r) for r in batch_bounds(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [len(r) for r in batch_bounds(17, 8)] == [8, 9]
    assert [len(r) for r in batch_bounds(16, 8)] == [8, 8]
    assert [len(r) for r in batch_bounds(1, 8)] == [1]
