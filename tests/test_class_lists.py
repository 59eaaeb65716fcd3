"""The shipped ImageNet-100 class list and seeded labelled file lists (``ssl-lib data subset``)."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import torch
from PIL import Image
from test_eval_cli import one_line_error, run_main

from ssl_lib.data import file_list, image_folder
from ssl_lib.data.datasets import labelled_mask
from ssl_lib.data.subsets import class_list, labelled_subset, sorted_labels


def test_imagenet100_is_the_cmc_list_with_sorted_rank_labels():
    text = resources.files("ssl_lib.data").joinpath("class_lists", "imagenet100.txt").read_bytes()
    assert hashlib.md5(text).hexdigest() == "9974508e5d4cc0098b70e8b6a0fe6067"  # CMC's file
    classes = class_list("imagenet100")
    assert len(classes) == 100 and len(set(classes)) == 100
    assert all(re.fullmatch(r"n\d{8}", c) for c in classes)
    assert classes[:2] == ["n02869837", "n01749939"]  # CMC's order, not sorted
    labels = sorted_labels(classes)
    # labels of PatchSearch's metadata_files/im100_metadata.txt
    assert labels["n01558993"] == 0 and labels["n02106550"] == 26  # Rottweiler
    assert labels["n02869837"] == 48 and labels["n13040303"] == 99


def make_folder(root, sizes, reverse=False):
    """Class folders ``c0, c1, ...`` of ``sizes`` images (created in reverse with ``reverse``)."""
    items = [(f"c{c}", i) for c, n in enumerate(sizes) for i in range(n)]
    for cls, i in reversed(items) if reverse else items:
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / cls / f"img{i:03d}.png")
    return root


def test_subset_is_seeded_class_balanced_and_independent_of_listing_order(tmp_path):
    root = make_folder(tmp_path / "a", [10, 26, 3])
    pairs = labelled_subset(root, 0.1, seed=0)
    counts = torch.bincount(torch.tensor([label for _, label in pairs])).tolist()
    assert counts == [1, 3, 1]  # 10 % of 10, of 26 (2.6), at least one of 3
    assert torch.bincount(
        torch.tensor([y for _, y in labelled_subset(root, 0.5, seed=0)])
    ).tolist() == [5, 13, 2]
    assert all(path.startswith(f"c{label}/") for path, label in pairs)
    assert pairs == sorted(pairs, key=lambda p: (p[1], p[0]))
    assert labelled_subset(root, 0.1, seed=0) == pairs
    assert labelled_subset(root, 0.5, seed=1) != labelled_subset(root, 0.5, seed=0)
    # the same files created in another order: the same list
    other = make_folder(tmp_path / "b", [10, 26, 3], reverse=True)
    assert labelled_subset(other, 0.1, seed=0) == pairs


def test_class_list_file_sets_the_classes_and_their_sorted_labels(tmp_path, capsys):
    root = make_folder(tmp_path / "train", [4, 4, 4])
    names = tmp_path / "classes.txt"
    names.write_text("# two of the three\nc2\nc0\n")
    out = tmp_path / "half.txt"
    assert run_main("data", "subset", str(root), "--classes", str(names), "--fraction", "0.5",
                    "--seed", "3", "--out", str(out)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "4 images of 2 classes (2 to 2 per class" in printed
    assert "holds 1 class folder(s) not in the list (e.g. c1)" in printed
    lines = out.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "0", "1", "1"]  # c0 -> 0, c2 -> 1
    assert [line.split("/")[0] for line in lines] == ["c0", "c0", "c2", "c2"]
    # the list is read back by the library: as a labelled subset and as a file list
    mask = labelled_mask(image_folder(str(root)), str(out), root=str(root))
    assert int(mask.sum()) == 4
    assert [label for _, label in file_list(str(root), str(out)).samples] == [0, 0, 1, 1]


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys):
    root = make_folder(tmp_path / "train", [3, 3])
    out = tmp_path / "list.txt"
    base = ["data", "subset", str(root), "--out", str(out)]
    for fraction in ("0", "1.5"):
        err = one_line_error(capsys, *base, "--fraction", fraction)
        assert f"fraction must lie in (0, 1] (e.g. 0.01 or 0.1), got {float(fraction)}" in err
    err = one_line_error(capsys, *base, "--fraction", "0.1", "--classes", "imagenet100")
    assert "class folder" in err and "n01558993" in err and "does not exist" in err
    err = one_line_error(capsys, *base, "--fraction", "0.1", "--classes", "imagenet1000")
    assert "neither a shipped list (imagenet100) nor a file" in err
    assert not out.exists()
    out.write_text("mine\n")
    err = one_line_error(capsys, *base, "--fraction", "0.1")
    assert "exists; pass --force" in err and out.read_text() == "mine\n"
    assert run_main(*base, "--fraction", "0.1", "--force") == 0
    assert out.read_text() != "mine\n"
