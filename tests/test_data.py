"""Datasets, view pipelines and the errors for bad data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lib.data import (
    DataError,
    IndexedDataset,
    MultiView,
    SyntheticPatterns,
    file_list,
    image_folder,
)
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
