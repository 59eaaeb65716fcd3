"""Ground truth for the defences: which training images are poisoned, from a poison manifest.

The manifest is a JSON object whose ``"train"`` list holds one record per training image:
``{"path": str, "label": int, "poisoned": bool, "box": [x, y, w, h] | null}``. Paths are
matched after resolving them; a relative path is read relative to the data root.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ssl_lib.data.datasets import DataError


def _key(path: str, root: str | None) -> str:
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return str(p.resolve())


def read_poison_manifest(manifest: str, root: str | None) -> dict[str, bool]:
    """Resolved path -> poisoned, from the ``"train"`` records of ``manifest``.

    Raises ``DataError`` (one line naming the file) for a missing or malformed manifest.
    """
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"poison manifest '{manifest}' does not exist (manifest)")
    try:
        records = json.loads(path.read_text())["train"]
        return {_key(str(r["path"]), root): bool(r["poisoned"]) for r in records}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"poison manifest '{manifest}' is not a JSON object with a 'train' list of "
            f"{{'path', 'poisoned', ...}} records ({type(err).__name__}: {err})"
        ) from None


def poison_labels(paths: list[str], manifest: str, root: str | None) -> Tensor:
    """Bool ``(N,)``: which of ``paths`` the manifest marks as poisoned.

    Raises ``DataError`` naming the first path the manifest does not list.
    """
    truth = read_poison_manifest(manifest, root)
    labels = []
    for p in paths:
        key = _key(p, root)
        if key not in truth:
            raise DataError(f"poison manifest '{manifest}' has no record for image '{p}'")
        labels.append(truth[key])
    return torch.tensor(labels, dtype=torch.bool)
