"""Feature extraction for frozen-backbone evaluation: distributed gathering and a disk cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_lib import console
from ssl_lib.distributed import comm_device
from ssl_lib.files import atomic_write

# Rows sent per all_gather call, which bounds the communication buffers on each device.
_GATHER_ROWS = 65536
_HASH_BYTES = 1 << 20


def _dedup_by_index(feats: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
    """Sort rows by dataset index and keep the first row of every index seen more than once."""
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    keep = order[first]
    return feats[keep], labels[keep], indices[keep]


def _all_gather_rows(local: Tensor, comm_device: torch.device) -> Tensor:
    """Concatenate (rank by rank) the rows of ``local`` from every process, on the CPU.

    Ranks may hold different numbers of rows; rows travel in blocks of ``_GATHER_ROWS``.
    """
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], device=comm_device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    parts: list[list[Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(sizes), _GATHER_ROWS):
        stop = min(start + _GATHER_ROWS, max(sizes))
        block = local.new_zeros((stop - start, *local.shape[1:]), device=comm_device)
        mine = local[start:stop]
        block[: mine.shape[0]] = mine
        received = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(received, block)
        for rank, rows in enumerate(received):
            parts[rank].append(rows[: max(0, min(sizes[rank], stop) - start)].cpu())
    return torch.cat([torch.cat(p) for p in parts])


@torch.inference_mode()
def _embed(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    dtype: torch.dtype,
    normalize: bool,
    progress: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    feats, labels, indices = [], [], []
    for images, batch_labels, batch_indices in console.progress(loader, "features", progress):
        out = model(images.to(device, non_blocking=True)).flatten(1).float()
        if normalize:
            out = nn.functional.normalize(out, dim=1)
        feats.append(out.to("cpu", dtype))
        labels.append(torch.as_tensor(batch_labels).long().cpu())
        indices.append(torch.as_tensor(batch_indices).long().cpu())
    return feats, labels, indices


def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Embed every ``(images, labels, dataset_indices)`` batch of ``loader`` with ``model``.

    The model must already be on ``device``. It runs in eval mode (BatchNorm uses its running
    statistics) under ``torch.inference_mode``; each module's training flag is restored
    afterwards. Outputs are flattened, L2-normalised in float32 when ``normalize``, then stored
    on the CPU in ``dtype``. Under an initialised ``torch.distributed`` group the rows of all
    ranks are gathered onto every rank. Rows are returned sorted by dataset index, with repeated
    indices (the padding added by ``DistributedSampler``) kept once. With ``progress`` a bar
    shows the batches done, rate and ETA (see :func:`ssl_lib.console.progress`).

    Returns ``(feats, labels, indices)``: ``N x D`` in ``dtype``, ``N`` int64, ``N`` int64.
    """
    device = torch.device(device)
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    distributed = dist.is_available() and dist.is_initialized()
    try:
        batches = _embed(model, loader, device, dtype, normalize, progress)
    finally:
        for module, training in flags:
            module.training = training
    if not batches[0]:
        raise ValueError("the loader yielded no batches")
    # Concatenating outside inference mode gives ordinary tensors that callers may edit in place.
    feats, labels, indices = (torch.cat(parts) for parts in batches)
    if distributed:
        feats, labels, indices = (
            _all_gather_rows(t, comm_device()) for t in (feats, labels, indices)
        )
    return _dedup_by_index(feats, labels, indices)


def _file_digest(path: Path) -> dict[str, str | int]:
    stat = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(_HASH_BYTES)).hexdigest()
        f.seek(max(0, stat.st_size - _HASH_BYTES))
        tail = hashlib.sha256(f.read(_HASH_BYTES)).hexdigest()
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "head": head,
        "tail": tail,
    }


class FeatureCache:
    """Directory of extracted features keyed by checkpoint, dataset and transform."""

    _KEY = re.compile(r"[0-9a-f]{64}")

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def key(
        self,
        checkpoint_path: str | os.PathLike,
        dataset_id: str,
        transform_id: str,
        extra: dict | None = None,
    ) -> str:
        """SHA-256 of the checkpoint's identity and the descriptions of what was extracted.

        The checkpoint is identified by its resolved path, size, modification time and the
        hashes of its first and last MiB, so re-saving or editing it changes the key without
        reading the whole file. ``extra`` (e.g. layer, dtype, image size) must be
        JSON-serialisable.
        """
        description = {
            "checkpoint": _file_digest(Path(checkpoint_path)),
            "dataset": dataset_id,
            "transform": transform_id,
            "extra": extra or {},
        }
        blob = json.dumps(description, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def path(self, key: str) -> Path:
        """File that holds the features for ``key``."""
        if not self._KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / f"{key}.pt"

    def load(self, key: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(feats, labels, indices)`` saved under ``key``, or ``None`` when absent."""
        path = self.path(key)
        if not path.exists():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["feats"], data["labels"], data["indices"]

    def save(self, key: str, feats: Tensor, labels: Tensor, indices: Tensor) -> Path:
        """Write atomically (:func:`ssl_lib.files.atomic_write`)."""
        path = self.path(key)
        data = {"feats": feats, "labels": labels, "indices": indices}
        atomic_write(path, lambda f: torch.save(data, f))
        return path
