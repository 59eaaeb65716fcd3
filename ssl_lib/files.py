"""How ssl_lib writes files: atomically, never over a user's earlier results.

Every file a run or an evaluation writes (checkpoints, ``config.yaml``, ``metrics.json``,
result JSONs, feature caches) goes through :func:`atomic_write`, and every new run folder or
result file name through :func:`unused_path`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    A crash or an error at any point leaves the previous file at ``path`` untouched and no
    temporary file behind (after a hard kill a hidden ``.NAME.PID.tmp`` may remain; nothing
    reads it). Creates the parent folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def unused_path(path: str | Path, keep_suffix: bool = True) -> Path:
    """``path`` if it does not exist, else the first free ``stem_1``, ``stem_2``... beside it.

    ``keep_suffix=False`` numbers the whole name (for folders: ``run.v2`` -> ``run.v2_1``).
    """
    path = Path(path)
    stem, suffix = (path.stem, path.suffix) if keep_suffix else (path.name, "")
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{stem}_{n}{suffix}")
    return candidate


def run_folder_of(checkpoint: str | Path) -> Path:
    """The run folder of ``RUN/checkpoints/x.ckpt``; else the checkpoint's own folder."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent
