"""The poison manifest: what ``ssl-lib poison make`` wrote, readable by any later step.

A manifest (``manifest.json`` in the output folder, format in docs/backdoor.md) records the
trigger (SHA-256 and every parameter), the seed, both rates, the target, the data folders and
one record per training and validation image. :func:`load_manifest` reads it into a
:class:`Manifest`; :func:`check_data` checks that it belongs to a data folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ssl_lib.data.datasets import DataError, _classes

FORMAT = "ssl_lib.poison"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Record:
    """One image. ``path``: the file to read (absolute); ``source``: the original image,
    relative to its data folder; ``box``: ``(x, y, w, h)`` of the trigger in ``path``'s pixels,
    ``None`` for a clean image."""

    path: str
    source: str
    label: int
    poisoned: bool
    box: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest; ``data`` is the JSON as written, ``folder`` where it lies."""

    folder: Path
    data: dict

    @property
    def classes(self) -> list[str]:
        """Class names; a label is the index of its class here."""
        return list(self.data["classes"])

    @property
    def target(self) -> int | None:
        """The target label (``None`` for an untargeted attack)."""
        target = self.data["attack"]["target"]
        return None if target is None else int(target["label"])

    @property
    def image_size(self) -> int:
        """Side of the patched validation images (after Resize + CenterCrop), pixels."""
        return int(self.data["placement"]["val_image_size"])

    def _records(self, split: str) -> list[Record]:
        root = self.data["roots"][split]  # None for a split that was not given
        return [
            Record(
                path=str(self.folder / r["path"] if r["poisoned"] else Path(root) / r["path"]),
                source=r["source"],
                label=int(r["label"]),
                poisoned=bool(r["poisoned"]),
                box=None if r["box"] is None else tuple(r["box"]),
            )
            for r in self.data[split]
        ]

    @property
    def train(self) -> list[Record]:
        """Every training image, in the order of the data folder (poisoned ones at their copy)."""
        return self._records("train")

    @property
    def val(self) -> list[Record]:
        """Every validation image, patched, at its copy (already resized and cropped)."""
        return self._records("val")


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest (the JSON file, or the folder holding ``manifest.json``).

    Raises :class:`DataError` (one line) for a missing or unreadable file, or one that is not
    a manifest of this format version.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MANIFEST_NAME
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"poison manifest '{file}' does not exist") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read poison manifest '{file}': {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"'{file}' is not a poison manifest (written by ssl-lib poison make)")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"poison manifest '{file}' has format version {data.get('format_version')}; this "
            f"ssl_lib reads version {FORMAT_VERSION}"
        )
    return Manifest(file.parent.resolve(), data)


def check_data(manifest: Manifest, root: str | Path, split: str = "train") -> None:
    """Check that ``root`` is the data folder of ``split`` (``train`` | ``val``) the manifest
    was made from: the same class folders, and every source image present.

    Raises :class:`DataError` (one line) naming the first difference.
    """
    folder = Path(root)
    found = _classes(folder)
    if found != manifest.classes:
        missing = sorted(set(manifest.classes) - set(found))
        extra = sorted(set(found) - set(manifest.classes))
        detail = (
            f"missing: {', '.join(missing[:5]) or '-'}; not in the manifest: "
            f"{', '.join(extra[:5]) or '-'}"
            if missing or extra
            else "same names, different order"
        )
        raise DataError(
            f"the poison manifest '{manifest.folder / MANIFEST_NAME}' does not match the "
            f"{split} folder '{root}': class folders differ ({detail})"
        )
    for record in manifest.data[split]:
        if not (folder / record["source"]).is_file():
            raise DataError(
                f"the poison manifest '{manifest.folder / MANIFEST_NAME}' does not match the "
                f"{split} folder '{root}': image '{record['source']}' is missing"
            )
