"""Teacher feature cache: one fixed (centre-crop) teacher feature per training image.

``ssl-lib cache-features TEACHER DATA_RECIPE OUT`` runs the teacher once over the training
set of a recipe and writes the folder ``OUT``:

* ``features.f16``: ``N x D`` float16, row ``i`` = dataset index ``i``, raw C-order bytes
  (read with ``numpy.memmap``: a 1.28 M x 2048 cache is 5.2 GB and is never loaded whole);
* ``paths.txt``: the key of every index, one per line (the image path relative to
  ``data.root``; ``synthetic/<seed>/<i>`` or ``cifar10/train/<i>`` for file-less sets);
* ``meta.json``: ``num_samples``, ``dim``, ``dtype``, the SHA-256 of the path list, the
  transform, the teacher spec and its fingerprint (:func:`~ssl_lib.distill.teacher.
  teacher_fingerprint`). It is written last: a folder without it is an incomplete cache.

Training (:meth:`TeacherCache.check_dataset`, :meth:`TeacherCache.check_fingerprint`) refuses
a cache whose path list differs from the training set's or whose fingerprint differs from
the configured teacher's, in one line. The CompRess ``cache_feats.py`` and the SimReg cached
teachers key features by position or file name only (see ``docs/distillation.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from ssl_lib import console
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.data import IndexedDataset, build_base_dataset, subsample
from ssl_lib.data.datasets import DataError, ImageList
from ssl_lib.data.synthetic import SyntheticPatterns
from ssl_lib.data.transforms import eval_transform
from ssl_lib.files import atomic_write_text
from ssl_lib.schema import ConfigError

FEATURES, PATHS, META = "features.f16", "paths.txt", "meta.json"


def sample_keys(ds: Dataset, root: str | None) -> list[str]:
    """The key of every item of a base training dataset (before views), in index order.

    Image files: the path relative to ``root``. Synthetic: ``synthetic/<seed>/<i>``;
    torchvision CIFAR: ``cifar10/train/<i>``. A ``Subset`` (``data.max_samples``) keeps the
    keys of its items. Raises :class:`DataError` for another kind of dataset.
    """
    if isinstance(ds, Subset):
        keys = sample_keys(ds.dataset, root)
        return [keys[i] for i in ds.indices]
    if isinstance(ds, ImageList):
        return [os.path.relpath(path, root) if root else path for path, _ in ds.samples]
    if isinstance(ds, SyntheticPatterns):
        return [f"synthetic/{ds.seed}/{i}" for i in range(len(ds))]
    if isinstance(ds, (CIFAR10, CIFAR100)):
        name = "cifar100" if isinstance(ds, CIFAR100) else "cifar10"
        split = "train" if ds.train else "test"
        return [f"{name}/{split}/{i}" for i in range(len(ds))]
    raise DataError(f"no per-image keys for a {type(ds).__name__} dataset: cannot cache it")


def keys_sha256(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class TeacherCache:
    """A cache folder opened for reading; rows are read from a ``numpy.memmap``.

    Raises :class:`CheckpointError` when the folder, ``meta.json`` or the features file is
    missing or has the wrong size.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise CheckpointError(
                f"teacher cache '{self.folder}' has no {META} (not a cache, or an incomplete "
                "one): write it with ssl-lib cache-features"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.num_samples, self.dim = int(self.meta["num_samples"]), int(self.meta["dim"])
        self.fingerprint: str | None = self.meta["teacher"]["fingerprint"]
        features = self.folder / FEATURES
        expected = self.num_samples * self.dim * 2
        if not features.is_file() or features.stat().st_size != expected:
            raise CheckpointError(
                f"teacher cache '{self.folder}': {FEATURES} is missing or not {expected} bytes "
                f"({self.num_samples} x {self.dim} float16); write the cache again"
            )
        self._features = np.memmap(
            features, dtype=np.float16, mode="r", shape=(self.num_samples, self.dim)
        )

    def rows(self, index: Tensor) -> Tensor:
        """Features of dataset indices ``index`` ``(B,)`` as ``(B, dim)`` float32 (CPU); only
        those rows are read from the file."""
        idx = index.detach().cpu().numpy()
        return torch.from_numpy(np.asarray(self._features[idx], dtype=np.float32))

    def check_dataset(self, keys: list[str], where: str) -> None:
        """Raise :class:`ConfigError` unless the cache was written for exactly ``keys``."""
        if len(keys) == self.num_samples and keys_sha256(keys) == self.meta["paths_sha256"]:
            return
        cached = (self.folder / PATHS).read_text().splitlines()
        first = next(
            (i for i, (a, b) in enumerate(zip(cached, keys, strict=False)) if a != b),
            min(len(cached), len(keys)),
        )
        shown = lambda xs: repr(xs[first]) if first < len(xs) else "(none)"  # noqa: E731
        raise ConfigError(
            f"{where}: teacher cache '{self.folder}' was written for another dataset: "
            f"{len(cached)} images vs {len(keys)} in the training data, first difference at "
            f"index {first} ({shown(cached)} vs {shown(keys)}); rebuild it with ssl-lib "
            "cache-features on this data recipe"
        )

    def check_fingerprint(self, fingerprint: str | None) -> None:
        """Raise :class:`CheckpointError` when ``fingerprint`` (the configured teacher's;
        ``None``: not known) differs from the cache's."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise CheckpointError(
                f"teacher cache '{self.folder}' was written by another teacher (fingerprint "
                f"{str(self.fingerprint)[:12]}..., the configured teacher's is "
                f"{fingerprint[:12]}...): rebuild it with ssl-lib cache-features, or fix "
                "teacher.path / key_prefix / input_norm"
            )


def write_cache(
    teacher: Any,
    data_cfg: Any,
    out: str | os.PathLike,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``teacher`` (a :class:`~ssl_lib.distill.teacher.Teacher`) over the training set of
    ``data_cfg`` (centre crop) into folder ``out``; returns ``out``.

    The set is the one training builds (``data.dataset``, ``root``, and the ``max_samples``
    subset drawn with the run seed ``seed``), in index order, with the evaluation transform
    (:func:`~ssl_lib.data.transforms.eval_transform`) at ``data.image_size``. Raises
    :class:`ConfigError` when ``out`` exists and is not empty (checked before any work).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT '{out}' exists and is not an empty folder; choose another path")
    base = subsample(build_base_dataset(data_cfg), data_cfg.max_samples, seed)
    keys = sample_keys(base, data_cfg.root)
    transform = eval_transform(data_cfg.image_size)
    loader = DataLoader(
        IndexedDataset(base, transform),
        batch_size=data_cfg.batch_size,
        num_workers=data_cfg.num_workers,
        shuffle=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{FEATURES}.partial"
    features = np.memmap(partial, dtype=np.float16, mode="w+", shape=(len(keys), teacher.dim))
    teacher = teacher.to(device)
    for images, _, index in console.progress(loader, "teacher features", progress):
        feats = teacher(images.to(device), index).cpu().numpy()
        features[index.numpy()] = feats.astype(np.float16)
    features.flush()
    del features
    partial.replace(out / FEATURES)
    atomic_write_text(out / PATHS, "\n".join(keys) + "\n")
    meta = {
        "num_samples": len(keys),
        "dim": teacher.dim,
        "dtype": "float16",
        "paths_sha256": keys_sha256(keys),
        "transform": repr(transform),
        "image_size": data_cfg.image_size,
        "dataset": {"dataset": data_cfg.dataset, "root": data_cfg.root},
        "teacher": {**teacher.spec, "fingerprint": teacher.fingerprint},
    }
    atomic_write_text(out / META, json.dumps(meta, indent=2))
    return out
