"""Shipped class lists and seeded, class-balanced labelled file lists (1 % / 10 % labels).

``imagenet100``: the 100 ImageNet classes (WordNet ids) of ImageNet-100, the subset introduced by
CMC (Tian et al., ECCV 2020, arXiv 1906.05849) and used by the SSL backdoor work (Saha et al.,
CVPR 2022, arXiv 2105.10123) and PatchSearch (Tejankar et al., CVPR 2023, arXiv 2301.01197).
The file is CMC's list byte for byte, in CMC's order (MD5 ``9974508e5d4cc0098b70e8b6a0fe6067``);
as in those works, the label of a class is its rank in the *sorted* list, which is also the
label ``image_folder`` gives it in a folder holding exactly these classes.

:func:`labelled_subset` picks a seeded share of each class from the sorted file names, never
from the order the file system lists them in (the original scripts took the first N % of an
unsorted ``glob``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from ssl_lib.config import ConfigError
from ssl_lib.data.datasets import DataError, _classes, _walk_images, class_balanced_mask
from ssl_lib.files import atomic_write_text

CLASS_LISTS = {"imagenet100": "imagenet100.txt"}


def class_list(name: str) -> list[str]:
    """The class names of a shipped list (``imagenet100``) or of a text file, in file order.

    A file holds one class name (the first word of a line) per line; empty lines and lines
    starting with ``#`` are skipped. Raises :class:`DataError` for an unknown name or missing
    file, an empty list or a name listed twice.
    """
    if name in CLASS_LISTS:
        text = resources.files("ssl_lib.data").joinpath("class_lists", CLASS_LISTS[name])
        source, lines = name, text.read_text().splitlines()
    elif Path(name).is_file():
        source, lines = name, Path(name).read_text().splitlines()
    else:
        raise DataError(
            f"class list '{name}': neither a shipped list ({', '.join(CLASS_LISTS)}) nor a file"
        )
    classes = [line.split()[0] for line in lines if line.split() and not line.startswith("#")]
    if not classes:
        raise DataError(f"class list '{source}' names no classes")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise DataError(f"class list '{source}' names {', '.join(repeated)} more than once")
    return classes


def sorted_labels(classes: list[str]) -> dict[str, int]:
    """``{class: label}``, the label being the class's rank in the sorted list."""
    return {c: i for i, c in enumerate(sorted(classes))}


def labelled_subset(
    root: str | os.PathLike, fraction: float, seed: int = 0, classes: list[str] | None = None
) -> list[tuple[str, int]]:
    """A seeded, class-balanced share of the images of ``root/<class>/...``.

    ``classes``: the classes to draw from (default: every class folder of ``root``); labels are
    ranks in their sorted list (:func:`sorted_labels`). Each class's images are listed as
    ``image_folder`` lists them (sorted paths, any depth), then
    :func:`~ssl_lib.data.datasets.class_balanced_mask` keeps ``max(1, round(fraction * n))`` of
    them (at least one per class) with a generator seeded by ``seed``. Returns
    ``(path relative to root, label)`` pairs sorted by label then path: the lines of a file list
    that ``data.labelled_subset`` and ``data.file_list`` read.

    Raises :class:`DataError` for a ``fraction`` outside (0, 1], a missing ``root`` or class
    folder, or a class folder without images.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must lie in (0, 1] (e.g. 0.01 or 0.1), got {fraction}")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data folder '{root}' does not exist")
    labels = sorted_labels(_classes(base) if classes is None else classes)
    if not labels:
        raise DataError(f"data folder '{root}' has no class sub-folders")
    files: list[str] = []
    targets: list[int] = []
    for cls, label in labels.items():
        if not (base / cls).is_dir():
            raise DataError(f"class folder '{base / cls}' does not exist (class '{cls}')")
        found = _walk_images(str(base / cls))
        if not found:
            raise DataError(f"class folder '{base / cls}' holds no image files")
        files += [Path(path).relative_to(base).as_posix() for path in found]
        targets += [label] * len(found)
    chosen = class_balanced_mask(torch.tensor(targets), fraction, seed)
    return [(files[i], targets[i]) for i in chosen.nonzero().flatten().tolist()]


def write_labelled_subset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    fraction: float,
    seed: int = 0,
    classes: str | None = None,
    force: bool = False,
) -> str:
    """Write :func:`labelled_subset` to ``out`` (``relative/path label`` per line); returns a
    one-paragraph summary for the user.

    ``classes``: a shipped list name or a file (:func:`class_list`); ``None`` = every class
    folder of ``root``. Raises :class:`ConfigError` when ``out`` exists and ``force`` is off,
    and the errors of :func:`class_list` and :func:`labelled_subset`, before writing anything.
    """
    target = Path(out)
    if target.exists() and not force:
        raise ConfigError(f"--out '{target}' exists; pass --force to replace it")
    names = class_list(classes) if classes is not None else None
    pairs = labelled_subset(root, fraction, seed, names)
    atomic_write_text(target, "".join(f"{path} {label}\n" for path, label in pairs))
    per_class = torch.bincount(torch.tensor([label for _, label in pairs]))
    summary = (
        f"{len(pairs)} images of {len(per_class)} classes ({int(per_class.min())} to "
        f"{int(per_class.max())} per class; fraction {fraction}, seed {seed}) -> {target}"
    )
    others = sorted(set(_classes(Path(root))) - set(names)) if names is not None else []
    if others:
        summary += (
            f"\nnote: '{root}' holds {len(others)} class folder(s) not in the list "
            f"(e.g. {others[0]}); the labels are ranks among the {len(names)} listed classes, "
            "which match the folder labels only in a folder that holds just these classes"
        )
    return summary
