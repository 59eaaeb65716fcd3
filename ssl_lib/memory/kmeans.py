"""k-means clustering of embeddings (CMSF-KM's per-epoch pseudo-labels, cluster alignment).

Every nearest-centroid assignment is an exact search of :mod:`ssl_lib.memory.search`
(``metric="l2"``, k = 1, the points as queries and the centroids as the bank); ``backend``
names its search backend and, with it, the implementation:

``faiss``: ``faiss.Kmeans`` as the original uses it (L2, ``niter`` Lloyd iterations, every point
used for training: ``max_points_per_centroid`` = 10^7; on CUDA tensors with a GPU build of faiss
it trains on the GPU), then the final assignment with the faiss search backend (on the GPU
with a GPU build of faiss, else on the CPU).
``torch``: plain Lloyd iterations with the torch search backend, for machines without a GPU
build of faiss (the CUDA wheels of faiss on PyPI do not match every CUDA runtime). It starts
from ``num_clusters`` distinct random points, like faiss, but keeps an empty cluster's centroid
where it was instead of splitting a large cluster as faiss does, so the two implementations
agree in spirit, not bit for bit.
``auto``: the search module's rule for the assignment of every point to the initial centroids
(timed on that first assignment, which the torch implementation keeps as its first step), and
the implementation that goes with the chosen backend. Because the implementations treat empty
clusters differently, the choice can change the clusters, not only near-tied assignments; set
``faiss`` or ``torch`` where a run must repeat bit for bit on another machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lib import console
from ssl_lib.memory.search import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    SearchCase,
    check_backend,
    faiss_available,
    faiss_gpu_available,
    resolve_backend,
    search,
)


def nearest_centroid(x: Tensor, centroids: Tensor, backend: str = "auto") -> Tensor:
    """Index of the nearest centroid of each row of ``x``: int64 (N,) on ``x``'s device.

    ``x``: N x D float points; ``centroids``: K x D float. Exact L2 search (k = 1) with the
    search backend ``backend`` (``auto``, ``torch`` or ``faiss``); among exactly tied centroids
    the lowest index wins. Raises ``ValueError`` for mismatched dimensions or an unknown backend.
    """
    nearest = search(
        centroids,
        x,
        1,
        backend=backend,
        chunk_size=DEFAULT_BANK_CHUNK,
        query_chunk=DEFAULT_QUERY_CHUNK,
        metric="l2",
    )
    return nearest.indices[:, 0]


def _faiss_kmeans(x: Tensor, num_clusters: int, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    import faiss

    on_gpu = bool(x.is_cuda and faiss_gpu_available())
    data = x.cpu().contiguous()
    km = faiss.Kmeans(
        data.shape[1],
        num_clusters,
        niter=iters,
        seed=seed,
        max_points_per_centroid=10_000_000,
        gpu=on_gpu,
        verbose=False,
    )
    km.train(data.numpy())
    points = x if on_gpu else data
    centroids = torch.from_numpy(km.centroids).to(points.device)
    return centroids.to(x.device), nearest_centroid(points, centroids, "faiss").to(x.device)


def _torch_kmeans(
    x: Tensor, centroids: Tensor, assign: Tensor, iters: int
) -> tuple[Tensor, Tensor]:
    """Lloyd iterations from ``centroids``, whose assignment ``assign`` is already known."""
    num_clusters = centroids.shape[0]
    for _ in console.progress(range(iters), "k-means"):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1)
        filled = counts.squeeze(1) > 0
        centroids[filled] = sums[filled] / counts[filled]
        assign = nearest_centroid(x, centroids, "torch")
    return centroids, assign


@torch.no_grad()
def kmeans(
    x: Tensor, num_clusters: int, iters: int = 20, seed: int = 0, backend: str = "auto"
) -> Tensor:
    """Cluster the rows of ``x`` (N x D, float) into ``num_clusters``; returns int64 ids (N,)
    on ``x``'s device. The cluster ids of :func:`kmeans_fit`, which also returns the centroids.
    """
    return kmeans_fit(x, num_clusters, iters, seed, backend)[1]


@torch.no_grad()
def kmeans_fit(
    x: Tensor, num_clusters: int, iters: int = 20, seed: int = 0, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd, L2) of the rows of ``x`` (N x D, float) into ``num_clusters``.

    Returns ``(centroids, ids)``: float32 ``num_clusters x D`` and int64 (N,), both on ``x``'s
    device; ``ids`` is every row's nearest centroid (:func:`nearest_centroid`), so other points
    (e.g. a validation set) are assigned to the same clusters with
    ``nearest_centroid(points, centroids)``. Deterministic for a given ``seed``, backend and
    device (``auto``: once its choice is made). Raises ``ValueError`` for ``num_clusters``
    outside ``[1, N]``, ``iters < 1``, an unknown backend, or ``faiss`` without the faiss
    package.
    """
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(
            f"num_clusters must be in [1, {x.shape[0]}] (the number of points), got {num_clusters}"
        )
    if iters < 1:
        raise ValueError(f"k-means iterations must be >= 1, got {iters}")
    check_backend(backend)
    if backend == "faiss" and not faiss_available():
        raise ValueError("k-means backend 'faiss' needs the faiss package")
    x = x.detach().float()
    if backend == "faiss":
        return _faiss_kmeans(x, num_clusters, iters, seed)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randperm(x.shape[0], generator=gen)[:num_clusters].to(x.device)
    centroids = x[start].clone()
    assign = nearest_centroid(x, centroids, backend)
    if backend == "auto":
        case = SearchCase.of(
            centroids, x.shape[0], 1, x.device, DEFAULT_BANK_CHUNK, DEFAULT_QUERY_CHUNK, "l2"
        )
        if resolve_backend(backend, case) == "faiss":
            return _faiss_kmeans(x, num_clusters, iters, seed)
    return _torch_kmeans(x, centroids, assign, iters)
