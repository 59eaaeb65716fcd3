"""Which training images are poisoned, where their trigger goes, and the on-the-fly dataset.

One set of rules serves both ways of poisoning: ``ssl-lib poison make`` (lossless copies and a
manifest, :mod:`ssl_lib.backdoor.make`) and :class:`PoisonedDataset` (no copies, for
``data.poison`` of a training recipe). For the same images, ``PoisonSpec`` and seed both
poison the same images with the same boxes, pixel for pixel.

Rates (Saha et al., CVPR 2022; their code's ``poison_injection_rate``): ``rate``
is a fraction of the *candidates* (the target class, or every image when untargeted); the
resulting fraction of the whole training set is recorded beside it, as supervised backdoor
toolkits report that one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ssl_lib.backdoor.triggers import build_trigger, does_not_fit, draw_box, paste
from ssl_lib.data.datasets import DataError

SELECT_STREAM, TRAIN_STREAM, VAL_STREAM = 0, 1, 2  # keep the seeds of each use apart


def resolve_target(target: str | None, classes: Sequence[str]) -> int | None:
    """The label of ``target``: a class name of ``classes``, else a label ``0..C-1``.

    ``None`` stays ``None`` (untargeted). Raises :class:`DataError` naming the accepted values.
    """
    if target is None:
        return None
    if target in classes:
        return list(classes).index(target)
    if str(target).lstrip("-").isdigit() and 0 <= int(target) < len(classes):
        return int(target)
    shown = ", ".join(list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
    raise DataError(
        f"target '{target}' (poison target) is not a class: give a class name ({shown}) or "
        f"a label 0..{len(classes) - 1}"
    )


def select_poisoned(
    targets: Sequence[int], target: int | None, rate: float, seed: int
) -> tuple[list[int], int]:
    """The sorted indices of the poisoned images, and the number of candidates.

    Candidates: the images labelled ``target`` (all images when ``target`` is ``None``).
    ``round(rate * candidates)`` of them (at least 1) are drawn without replacement by a
    generator seeded from ``seed``. Raises :class:`DataError` when there is no candidate.
    """
    labels = np.asarray(targets)
    candidates = np.arange(len(labels)) if target is None else np.flatnonzero(labels == target)
    if len(candidates) == 0:
        raise DataError(f"the target class (label {target}) has no training images")
    count = max(1, round(rate * len(candidates)))
    rng = np.random.default_rng([seed, SELECT_STREAM])
    chosen = rng.permutation(candidates)[:count]
    return sorted(int(i) for i in chosen), len(candidates)


def image_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator drawing the box of image ``index`` (a function of the three only)."""
    return np.random.default_rng([seed, stream, index])


def rates(num_poisoned: int, num_candidates: int, num_train: int, requested: float) -> dict:
    """The rate bookkeeping written to manifests and logs (both conventions)."""
    return {
        "requested": requested,
        "num_candidates": num_candidates,
        "num_poisoned": num_poisoned,
        "num_train": num_train,
        "of_candidates": num_poisoned / num_candidates,
        "of_train": num_poisoned / num_train,
    }


class PoisonedDataset(Dataset):
    """``base`` (items ``(PIL image, label)``) with the trigger pasted on the poisoned items.

    Which items are poisoned and where the trigger goes depend only on ``spec`` (a
    ``PoisonSpec``), the labels of ``base`` and the item's index, so every worker process and
    every epoch sees the same poisoned image; nothing is written to disk. Boxes use
    ``spec.train_band`` at the image's native size (see :func:`draw_box`).

    Raises :class:`DataError` for a target that is not a class, an unreadable trigger image,
    and (when the item is read) a trigger that does not fit into a poisoned image.
    """

    def __init__(self, base: Dataset, spec) -> None:
        self.base = base
        self.spec = spec
        self.trigger = build_trigger(spec.trigger)
        self.classes = list(base.classes)  # type: ignore[attr-defined]
        self.targets = list(base.targets)  # type: ignore[attr-defined]
        self.target = resolve_target(spec.target if spec.targeted else None, self.classes)
        poisoned, self.num_candidates = select_poisoned(
            self.targets, self.target, spec.rate, spec.seed
        )
        self.poisoned = frozenset(poisoned)
        self.rates = rates(len(poisoned), self.num_candidates, len(self.targets), spec.rate)

    def __len__(self) -> int:
        return len(self.targets)

    def box(self, index: int, size: tuple[int, int]):
        """The trigger box ``(x, y, w, h)`` of poisoned item ``index`` of ``size`` (W, H)."""
        box = draw_box(
            size,
            self.trigger.shape,
            self.spec.train_band,
            image_rng(self.spec.seed, TRAIN_STREAM, index),
        )
        if box is None:
            raise DataError(
                does_not_fit(
                    f"training image {index}",
                    size,
                    self.trigger,
                    self.spec.train_band,
                    "poison.train_band",
                )
            )
        return box

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        img, label = self.base[index]
        if index in self.poisoned:
            img = paste(img, self.trigger, self.box(index, img.size), self.spec.trigger.opacity)
        return img, label
