"""Datasets yielding ``(views, label, dataset_index)`` and the builders behind ``data.dataset``."""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.folder import (
    IMG_EXTENSIONS,
    find_classes,
    has_file_allowed_extension,
)

from ssl_lib.data.sampling import VIEW_STREAM, mix_seed, seeded_rng
from ssl_lib.data.synthetic import SyntheticPatterns
from ssl_lib.data.transforms import MultiView

# PIL's default decompression-bomb limit (1024 * 1024 * 1024 // 4 // 3 pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class DataError(ValueError):
    """The data folder, a file in it, or a file list is unusable; the message says why.

    A ``DataLoader`` worker re-raises it in the main process with the worker's traceback in
    the message; only the original one-line message is kept.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{DataError.__module__}.DataError: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@contextmanager
def _pil_pixel_check_off() -> Iterator[None]:
    """Switch PIL's own decompression-bomb check off in this block (restored on exit)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_rgb(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB (grayscale, palette, RGBA and CMYK are converted).

    An image of more than ``max_pixels`` pixels (``None``: no limit) raises a ``ValueError``
    before it is decoded; this replaces PIL's own guard, which warns above
    ``Image.MAX_IMAGE_PIXELS`` and fails only above twice that.
    """
    with open(path, "rb") as f, _pil_pixel_check_off():
        img = Image.open(f)  # reads the header only
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"{width} x {height} = {width * height} pixels, more than "
                f"data.max_image_pixels={max_pixels} (a guard against decompression bombs; "
                "raise it, or set it to null, if the file is genuine)"
            )
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit single channel: rescale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr / hi * 255.0).astype("uint8"))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even RGB


class ImageList(Dataset):
    """Images given as ``(path, label)`` pairs; unreadable files fail naming the file.

    With ``skip_corrupt`` an unreadable file is replaced by the next readable one, a warning
    names it, and :attr:`num_skipped` counts such replacements (across loader workers). Images
    of more than ``max_image_pixels`` pixels count as unreadable (``None``: no limit).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        skip_corrupt: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.skip_corrupt = skip_corrupt
        self.max_image_pixels = max_image_pixels
        self._skipped = multiprocessing.get_context("fork").Value("i", 0)

    @property
    def num_skipped(self) -> int:
        """Number of unreadable files replaced so far."""
        return int(self._skipped.value)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return load_rgb(path, self.max_image_pixels), label
            except (OSError, UnidentifiedImageError, ValueError) as err:
                if not self.skip_corrupt:
                    raise DataError(
                        f"cannot read image '{path}': {err}. Remove or replace it, or set "
                        "data.skip_corrupt=true to skip unreadable files."
                    ) from None
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image '{path}': {err}", stacklevel=2)
        raise DataError("no readable image in the dataset")


def _classes(base: Path) -> list[str]:
    """The class folders of ``base``, as torchvision's ``find_classes`` lists them.

    Every entry that is a folder or a link to one is a class, hidden ones included; sorted.
    """
    try:
        classes, _ = find_classes(base)
    except FileNotFoundError:
        return []
    return classes


def _walk_images(top: str) -> list[str]:
    """The image files under the folder ``top``, in the order torchvision's ``ImageFolder``
    lists them: folders sorted by path, the files of each sorted by name.

    This is ``sorted(os.walk(top, followlinks=True))`` keeping the files whose name ends with
    an image extension (any case), as torchvision's ``make_dataset`` does, with two
    differences. A link to a folder that is already on the path from ``top`` (a link loop) is
    not followed and a warning names it: the folder's files are listed once, through the path
    without the loop (``os.walk`` would follow the loop until the path is too long, listing the
    files again at every turn). And a folder that cannot be read raises :class:`DataError`
    (``os.walk`` skips it silently). On a tree without link loops the list is exactly
    ``ImageFolder``'s, links to folders reached twice included.
    """
    listed: list[tuple[str, list[str]]] = []
    stack = [(top, frozenset({_folder_id(top)}))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise DataError(
                f"cannot read folder '{folder}': {err.strerror or err}; its images would be "
                "missing. Fix its permissions or remove it."
            ) from None
        files = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links, as os.walk does
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(entry.name)
                continue
            path = os.path.join(folder, entry.name)
            key = _folder_id(path)
            if key in ancestors:
                warnings.warn(
                    f"not following the link '{path}': it leads back to "
                    f"'{os.path.realpath(path)}', a folder it is in (a link loop); the images "
                    "there are read once",
                    stacklevel=3,
                )
                continue
            stack.append((path, ancestors | {key}))
        listed.append((folder, files))
    return [
        os.path.join(folder, name)
        for folder, files in sorted(listed)
        for name in sorted(files)
        if has_file_allowed_extension(name, IMG_EXTENSIONS)
    ]


def _folder_id(path: str) -> tuple[int, int]:
    """Device and inode of the folder ``path`` leads to (following links)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def image_folder(
    root: str,
    skip_corrupt: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageList:
    """An ImageNet-layout folder ``root/<class>/<image>``; checks it before training starts.

    The same images, labels and order as ``torchvision.datasets.ImageFolder(root)``: every
    folder (or link to a folder) in ``root`` is a class, hidden ones included; a class holds
    the files under it at any depth, links to files and folders followed, whose name ends with
    an image extension (``IMG_EXTENSIONS``, any case; hidden files included). Other files, such
    as ``README.txt`` or ``.DS_Store``, and files directly in ``root`` are ignored. A link loop
    is not followed a second time (a warning names the link; see :func:`_walk_images`).

    torchvision's ``make_dataset`` is not called itself: it follows link loops until the path
    is too long, skips unreadable folders silently and reports empty classes all at once
    without naming the folder; ``find_classes`` is.

    Raises :class:`DataError` (one line) for a missing ``root``, a ``root`` without class
    folders, a class folder without images or a folder that cannot be read.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data folder '{root}' does not exist (data.root)")
    classes = _classes(base)
    if not classes:
        raise DataError(
            f"data folder '{root}' has no class sub-folders; expected {root}/<class>/<image>.jpg"
        )
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        files = _walk_images(os.path.join(base, cls))
        if not files:
            raise DataError(
                f"class folder '{base / cls}' holds no image files "
                f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        samples += [(path, label) for path in files]
    return ImageList(samples, classes, skip_corrupt, max_image_pixels)


def file_list(
    root: str | None,
    list_file: str,
    skip_corrupt: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    extra_roots: Sequence[str] = (),
) -> ImageList:
    """Images listed in ``list_file``, one ``path [label]`` per line.

    A relative path is looked up under ``root``, then under each of ``extra_roots`` in order
    (e.g. the originals and a folder of poisoned copies); an absolute path is used as it is.
    Without a label the class is the path's first folder, numbered like ``image_folder(root)``
    numbers its class folders (so subsets of ImageNet keep ImageNet's label ids); an absolute
    path needs a label. ``root`` may be ``None`` when every line is absolute and labelled (the
    class names are then unknown: ``classes`` is empty).

    Raises :class:`DataError` (one line, naming the list file and line) for a missing folder,
    list or image, a label that is not an integer or lies outside the classes of ``root``, or
    a line without a label whose class folder is not one of ``root``.
    """
    lst = Path(list_file)
    folders = [Path(r) for r in ([root] if root is not None else []) + list(extra_roots)]
    for folder in folders:
        if not folder.is_dir():
            key = "data.root" if root is not None and folder == Path(root) else "data.extra_roots"
            raise DataError(f"data folder '{folder}' does not exist ({key})")
    if not lst.is_file():
        raise DataError(f"file list '{list_file}' does not exist (data.file_list)")
    classes = _classes(Path(root)) if root is not None else []
    index = {c: i for i, c in enumerate(classes)}
    where = " or ".join(f"'{f}'" for f in folders) or "no folder (data.root is not set)"
    samples: list[tuple[str, int]] = []
    for lineno, line in enumerate(lst.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        rel = parts[0]
        if Path(rel).is_absolute():
            path = Path(rel)
            if not path.is_file():
                raise DataError(f"{list_file}:{lineno}: image '{rel}' not found")
        else:
            found = [f / rel for f in folders if (f / rel).is_file()]
            if not found:
                raise DataError(f"{list_file}:{lineno}: image '{rel}' not found under {where}")
            path = found[0]
        if len(parts) > 1:
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(
                    f"{list_file}:{lineno}: label '{parts[1]}' is not an integer"
                ) from None
            if classes and not 0 <= label < len(classes):
                raise DataError(
                    f"{list_file}:{lineno}: label {label} outside 0..{len(classes) - 1}"
                )
        else:
            cls = Path(rel).parts[0]
            if Path(rel).is_absolute() or cls not in index:
                raise DataError(
                    f"{list_file}:{lineno}: class folder '{cls}' of '{rel}' is not a class "
                    f"of '{root}'; give the label after the path"
                )
            label = index[cls]
        samples.append((str(path), label))
    if not samples:
        raise DataError(f"file list '{list_file}' names no images")
    return ImageList(samples, classes, skip_corrupt, max_image_pixels)


CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def cifar(
    name: str, root: str | None, train: bool, download: bool, root_key: str = "data.root"
) -> Dataset:
    """torchvision's CIFAR-10 or CIFAR-100 (``name``: ``cifar10`` | ``cifar100``), one split.

    ``root`` is the folder holding torchvision's copy (``cifar-10-batches-py/`` or
    ``cifar-100-python/``: the python pickle batches). A copy that is there is only checked
    (torchvision's MD5 check); with ``download`` a missing or corrupted one is downloaded into
    ``root`` first. Yields ``(PIL image, label)``; 50,000 train / 10,000 test images of 32 px.

    Raises :class:`DataError` (one line naming ``root_key``) when ``root`` is not set, when the
    copy is missing or corrupted and ``download`` is off, or when the download fails.
    """
    cls = CIFAR[name]
    if root is None:
        raise DataError(f"{root_key} must name the folder that holds (or is to receive) {name}")
    expected = Path(root) / cls.base_folder
    try:
        return cls(root, train=train, download=download)
    except (RuntimeError, OSError) as err:
        if download:  # no network, a failed transfer or a corrupted archive
            raise DataError(
                f"could not download {name} into '{root}' ({root_key}): {err}. Download it by "
                f"hand into {expected}/, or use a copy in class folders "
                "(data.dataset=image_folder)"
            ) from None
        raise DataError(
            f"{name} not found or corrupted: no complete copy in '{expected}'. Set "
            f"data.download=true to download it there, or point {root_key} at the folder that "
            f"holds {cls.base_folder}/"
        ) from None


def build_base_dataset(cfg, train: bool = True, root: str | None = None) -> Dataset:
    """The dataset named by a ``data`` config section, yielding ``(PIL image, label)``."""
    root = root if root is not None else cfg.root
    kind = cfg.dataset
    if kind == "synthetic":
        s = cfg.synthetic
        # A disjoint, equally distributed evaluation split: same generator, another seed.
        seed = s.seed if train else s.seed + 1_000_003
        return SyntheticPatterns(s.num_samples, s.num_classes, cfg.image_size, seed)
    if kind == "image_folder":
        if root is None:
            raise DataError("data.root must name the image folder (root/<class>/<image>)")
        return image_folder(root, cfg.skip_corrupt, cfg.max_image_pixels)
    if kind == "file_list":
        if cfg.file_list is None:
            raise DataError("data.dataset=file_list needs data.file_list (and data.root)")
        return file_list(
            root, cfg.file_list, cfg.skip_corrupt, cfg.max_image_pixels, cfg.extra_roots
        )
    if kind in CIFAR:
        return cifar(kind, root, train, cfg.download)
    raise DataError(f"unknown data.dataset '{kind}'")


def subsample(ds: Dataset, max_samples: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of ``max_samples`` items (the whole dataset if ``None``)."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(ds), generator=g)[:max_samples].sort().values.tolist()
    sub = Subset(ds, keep)
    sub.targets = [ds.targets[i] for i in keep]  # type: ignore[attr-defined]
    sub.classes = ds.classes  # type: ignore[attr-defined]
    return sub


class IndexedDataset(Dataset):
    """Wraps a ``(image, label)`` dataset to yield ``(transform(image), label, index)``.

    ``index`` is the position in this dataset: memory banks and per-image caches key on it.
    A key may also be ``(epoch, index)`` (what :class:`~ssl_lib.data.sampling.EpochSampler`
    yields): the random transform then runs under a seed drawn from ``(seed, epoch, index)``
    (one per view for a :class:`~ssl_lib.data.transforms.MultiView`), so the views are the same
    in any worker process and after a resume.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, index = key
            img, label = self.base[index]
            return self._seeded_transform(img, epoch, index), int(label), index
        img, label = self.base[key]
        return self.transform(img), int(label), key

    def _seeded_transform(self, img, epoch: int, index: int):
        if isinstance(self.transform, MultiView):
            seeds = [
                mix_seed(self.seed, VIEW_STREAM, epoch, index, v)
                for v in range(len(self.transform.transforms))
            ]
            return self.transform(img, seeds=seeds)
        with seeded_rng(mix_seed(self.seed, VIEW_STREAM, epoch, index)):
            return self.transform(img)

    @property
    def targets(self) -> list[int]:
        return list(self.base.targets)  # type: ignore[attr-defined]

    @property
    def classes(self) -> list[str]:
        return list(self.base.classes)  # type: ignore[attr-defined]


def _sample_paths(ds: Dataset) -> list[str] | None:
    """File path of every item of ``ds``, or ``None`` for file-less datasets."""
    if isinstance(ds, ImageList):
        return [path for path, _ in ds.samples]
    return None


def class_balanced_mask(targets: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool mask (N,) choosing ``max(1, round(fraction * n_c))`` items of each class ``c``.

    ``targets``: integer labels (N,); ``fraction`` in (0, 1]. Classes are visited in increasing
    label order and each draws a ``torch.randperm`` of its members (in the order of
    ``targets``) from one generator seeded with ``seed``, so the choice depends only on the
    labels, their order and the seed.
    """
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(targets), dtype=torch.bool)
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        take = max(1, round(fraction * len(members)))
        mask[members[torch.randperm(len(members), generator=gen)[:take]]] = True
    return mask


def labelled_mask(
    ds: Dataset,
    subset_file: str | None = None,
    fraction: float | None = None,
    root: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Bool mask over ``ds``: which training images count as labelled (semi-supervised runs).

    ``subset_file``: one image per line, either a path relative to ``root`` (``class/img.JPEG``)
    or a bare file name (``img.JPEG``, the format of the SimCLR 1 % / 10 % ImageNet subsets)
    that must be unique in the dataset. Every line must name an image of the training set; a
    class folder that does not exist, or an image that is not in the data, fails naming the
    line. ``fraction``: a seeded random, class-balanced share of each class instead (any
    dataset, including the file-less synthetic and torchvision CIFAR sets).
    """
    n = len(ds)  # type: ignore[arg-type]
    if (subset_file is None) == (fraction is None):
        raise DataError("give exactly one of data.labelled_subset and data.labelled_fraction")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"data.labelled_fraction must lie in (0, 1], got {fraction}")
        targets = torch.as_tensor(list(ds.targets))  # type: ignore[attr-defined]
        return class_balanced_mask(targets, fraction, seed)
    if isinstance(ds, Subset):  # e.g. data.max_samples: check against the whole folder
        mask = labelled_mask(ds.dataset, subset_file, root=root, seed=seed)[ds.indices]
        if not bool(mask.any()):
            raise DataError(
                f"none of the images in '{subset_file}' is among the {n} training images kept "
                "(data.max_samples)"
            )
        return mask
    lst = Path(subset_file)
    if not lst.is_file():
        raise DataError(
            f"labelled subset file '{subset_file}' does not exist (data.labelled_subset)"
        )
    paths = _sample_paths(ds)
    if paths is None or root is None:
        raise DataError(
            "data.labelled_subset names image files, so it needs data.dataset=image_folder or "
            "file_list; use data.labelled_fraction for synthetic or torchvision CIFAR data"
        )
    base = Path(root)
    by_rel = {
        str(Path(p).relative_to(base)) if Path(p).is_relative_to(base) else p: i
        for i, p in enumerate(paths)
    }
    by_name: dict[str, int] = {}
    for i, p in enumerate(paths):
        name = Path(p).name
        by_name[name] = -1 if name in by_name else i  # -1: ambiguous
    classes = {Path(rel).parts[0] for rel in by_rel if len(Path(rel).parts) > 1}
    mask = torch.zeros(n, dtype=torch.bool)
    for lineno, line in enumerate(lst.read_text().splitlines(), 1):
        entry = line.split()[0] if line.split() else ""
        if not entry or entry.startswith("#"):
            continue
        where = f"{subset_file}:{lineno}"
        if "/" in entry:
            cls = Path(entry).parts[0]
            if cls not in classes:
                raise DataError(
                    f"{where}: class '{cls}' of '{entry}' is not a class of the training data "
                    f"under '{root}'"
                )
            if entry not in by_rel:
                raise DataError(f"{where}: image '{entry}' is not in the training data")
            mask[by_rel[entry]] = True
        else:
            i = by_name.get(entry)
            if i is None:
                raise DataError(f"{where}: image '{entry}' is not in the training data")
            if i < 0:
                raise DataError(
                    f"{where}: file name '{entry}' occurs in several class folders; "
                    "write it as class/file"
                )
            mask[i] = True
    if not bool(mask.any()):
        raise DataError(f"labelled subset file '{subset_file}' names no images")
    return mask
