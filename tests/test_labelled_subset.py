"""Labelled subsets of the training data (semi-supervised CMSF): files, fractions, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_lib.config import config_from_dict
from ssl_lib.data import DataError, SSLDataModule, SyntheticPatterns, image_folder, subsample
from ssl_lib.data.datasets import labelled_mask


def make_folder(root: Path, per_class: int = 4) -> Path:
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{cls}_{i}.png")
    return root


def test_subset_file_with_paths_and_bare_names(tmp_path):
    root = make_folder(tmp_path / "train")
    lst = tmp_path / "10percent.txt"
    lst.write_text("# labelled images\nn01/n01_1.png\nn02_3.png\n\n")
    ds = image_folder(str(root))
    mask = labelled_mask(ds, str(lst), root=str(root))
    names = [Path(p).name for p, _ in ds.samples]
    assert [names[i] for i in mask.nonzero().flatten()] == ["n01_1.png", "n02_3.png"]
    # data.max_samples keeps a subset: listed images outside it are known, just not used
    sub = subsample(ds, 6, seed=1)
    assert torch.equal(labelled_mask(sub, str(lst), root=str(root)), mask[sub.indices])
    dropped = next(i for i in range(len(ds)) if i not in sub.indices)
    lst.write_text(f"{Path(ds.samples[dropped][0]).relative_to(root)}\n")
    with pytest.raises(DataError, match="none of the images in .* is among the 6 training"):
        labelled_mask(sub, str(lst), root=str(root))


@pytest.mark.parametrize(
    "line, message",
    [
        ("n03/n03_1.png", "class 'n03' of 'n03/n03_1.png' is not a class"),
        ("n01/n01_9.png", "image 'n01/n01_9.png' is not in the training data"),
        ("n01_9.png", "image 'n01_9.png' is not in the training data"),
    ],
)
def test_subset_file_naming_unknown_images_or_classes(tmp_path, line, message):
    root = make_folder(tmp_path / "train")
    lst = tmp_path / "subset.txt"
    lst.write_text(f"n01/n01_0.png\n{line}\n")
    with pytest.raises(DataError, match=rf"subset.txt:2: {message}"):
        labelled_mask(image_folder(str(root)), str(lst), root=str(root))


def test_ambiguous_bare_name_and_empty_or_missing_file(tmp_path):
    root = make_folder(tmp_path / "train")
    Image.new("RGB", (8, 8)).save(root / "n02" / "n01_0.png")  # same name in two classes
    lst = tmp_path / "subset.txt"
    lst.write_text("n01_0.png\n")
    ds = image_folder(str(root))
    with pytest.raises(DataError, match="occurs in several class folders; write it as class/file"):
        labelled_mask(ds, str(lst), root=str(root))
    lst.write_text("# nothing\n")
    with pytest.raises(DataError, match="names no images"):
        labelled_mask(ds, str(lst), root=str(root))
    with pytest.raises(DataError, match="does not exist"):
        labelled_mask(ds, str(tmp_path / "missing.txt"), root=str(root))


def test_fraction_is_seeded_and_class_balanced():
    ds = SyntheticPatterns(200, 10, 16, seed=0)
    a = labelled_mask(ds, fraction=0.1, seed=3)
    assert torch.equal(a, labelled_mask(ds, fraction=0.1, seed=3))
    assert not torch.equal(a, labelled_mask(ds, fraction=0.1, seed=4))
    targets = torch.tensor(ds.targets)
    assert torch.bincount(targets[a], minlength=10).tolist() == [2] * 10
    with pytest.raises(DataError, match="labelled_fraction must lie in"):
        labelled_mask(ds, fraction=1.5)
    with pytest.raises(DataError, match="needs data.dataset=image_folder or file_list"):
        labelled_mask(ds, subset_file=__file__, root=".")


def test_data_module_checks_the_subset_before_training(tmp_path):
    root = make_folder(tmp_path / "train")
    lst = tmp_path / "subset.txt"
    lst.write_text("n01/n01_0.png\nn05/x.png\n")
    cfg = config_from_dict(
        {
            "method": {"name": "cmsf_semi"},
            "data": {
                "dataset": "image_folder",
                "root": str(root),
                "batch_size": 4,
                "labelled_subset": str(lst),
            },
        }
    )
    with pytest.raises(DataError, match="subset.txt:2: class 'n05'"):
        SSLDataModule(cfg.data).check()


def test_subset_file_names_images_behind_a_linked_folder(tmp_path):
    root = make_folder(tmp_path / "train")
    other = make_folder(tmp_path / "more")  # n01/, n02/ outside the data folder
    (root / "n01" / "linked").symlink_to(other / "n01", target_is_directory=True)
    lst = tmp_path / "subset.txt"
    lst.write_text("n01/linked/n01_2.png\n")
    ds = image_folder(str(root))
    assert len(ds) == 12
    mask = labelled_mask(ds, str(lst), root=str(root))
    assert [ds.samples[i][0] for i in mask.nonzero().flatten()] == [
        str(root / "n01" / "linked" / "n01_2.png")
    ]
