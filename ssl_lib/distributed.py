"""Process-group helpers that also work in a single, non-distributed process.

All collectives here are no-grad: they serve the target / memory-bank side of a step, which never
back-propagates. They work with any backend that implements ``all_gather`` and ``broadcast``
(gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def comm_device() -> torch.device:
    """Device for tensors of a collective: the current CUDA device under NCCL, else the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_concat(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (identity when not distributed).

    Every rank must pass a tensor of the same shape and dtype; ``all_gather`` does not pad, so
    unequal batches (e.g. a short last batch) must be avoided with ``drop_last=True``.
    The result carries no gradient.
    """
    if world_size() == 1:
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle a batch across all ranks for shuffle-BN.

    The global batch (all ranks' ``x`` concatenated in rank order) is permuted by a random
    permutation drawn on rank 0 and broadcast; each rank receives its slice of the permuted global
    batch. Returns ``(x_local_shuffled, unshuffle_idx)`` where ``unshuffle_idx`` (global length,
    identical on all ranks) is the inverse permutation to pass to :func:`unshuffle_batch`.
    In a single process this is a random permutation of the local batch.
    Requires equal local batch sizes on all ranks.
    """
    x_all = all_gather_concat(x)
    n = x_all.shape[0]
    if rank() == 0:
        perm = torch.randperm(n, device=x.device)
    else:
        perm = torch.empty(n, dtype=torch.long, device=x.device)
    if is_dist():
        dist.broadcast(perm, src=0)
    unshuffle_idx = torch.argsort(perm)
    return x_all[_local_slice(perm, x.shape[0])], unshuffle_idx


@torch.no_grad()
def unshuffle_batch(y: Tensor, unshuffle_idx: Tensor) -> Tensor:
    """Undo :func:`shuffle_batch`: the rows of ``y`` for this rank's original batch, in order."""
    y_all = all_gather_concat(y)
    return y_all[_local_slice(unshuffle_idx, y.shape[0])]


def _local_slice(global_idx: Tensor, local_size: int) -> Tensor:
    start = rank() * local_size
    return global_idx[start : start + local_size]
