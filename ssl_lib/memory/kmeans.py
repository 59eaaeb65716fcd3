"""k-means clustering of cached embeddings (CMSF-KM's per-epoch pseudo-labels).

``faiss``: ``faiss.Kmeans`` as the original uses it (L2, ``niter`` Lloyd iterations, every point
used for training: ``max_points_per_centroid`` = 10^7, then assignment to the nearest centroid);
on CUDA tensors with a GPU build of faiss it runs on the GPU.
``torch``: plain Lloyd iterations with matmul distances, for machines without a GPU build of
faiss (the CUDA wheels of faiss on PyPI do not match every CUDA runtime). It starts from
``num_clusters`` distinct random points, like faiss, but keeps an empty cluster's centroid where
it was instead of splitting a large cluster as faiss does, so the two backends agree in spirit,
not bit for bit.
``auto``: faiss when it is installed and usable for the tensor's device, else torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lib import console
from ssl_lib.memory.search import faiss_available, faiss_gpu_available

KMEANS_BACKENDS = ("auto", "faiss", "torch")


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; accepted: auto, faiss, torch")
    if backend == "auto":
        usable = faiss_available() and (device.type == "cpu" or faiss_gpu_available())
        return "faiss" if usable else "torch"
    if backend == "faiss" and not faiss_available():
        raise ValueError("k-means backend 'faiss' requested but faiss is not installed")
    return backend


def _faiss_kmeans(x: Tensor, num_clusters: int, iters: int, seed: int) -> Tensor:
    import faiss

    data = x.detach().float().cpu().contiguous().numpy()
    km = faiss.Kmeans(
        data.shape[1],
        num_clusters,
        niter=iters,
        seed=seed,
        max_points_per_centroid=10_000_000,
        gpu=bool(x.is_cuda and faiss_gpu_available()),
        verbose=False,
    )
    km.train(data)
    _, assign = km.index.search(data, 1)
    return torch.from_numpy(assign[:, 0]).long().to(x.device)


def _nearest(x: Tensor, centroids: Tensor, chunk: int = 65536) -> Tensor:
    """Index of the nearest centroid (L2) for every row of ``x``, chunked over rows."""
    half_norm = 0.5 * (centroids * centroids).sum(dim=1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk):
        scores = x[start : start + chunk] @ centroids.T - half_norm
        out[start : start + chunk] = scores.argmax(dim=1)
    return out


def _torch_kmeans(x: Tensor, num_clusters: int, iters: int, seed: int) -> Tensor:
    x = x.detach().float()
    gen = torch.Generator().manual_seed(seed)
    start = torch.randperm(x.shape[0], generator=gen)[:num_clusters].to(x.device)
    centroids = x[start].clone()
    for _ in console.progress(range(iters), "k-means"):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1)
        filled = counts.squeeze(1) > 0
        centroids[filled] = sums[filled] / counts[filled]
    return _nearest(x, centroids)


@torch.no_grad()
def kmeans(
    x: Tensor, num_clusters: int, iters: int = 20, seed: int = 0, backend: str = "auto"
) -> Tensor:
    """Cluster the rows of ``x`` (N x D) into ``num_clusters``; returns int64 ids (N,).

    Deterministic for a given ``seed``, backend and device.
    """
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(
            f"num_clusters must be in [1, {x.shape[0]}] (the number of points), got {num_clusters}"
        )
    if iters < 1:
        raise ValueError(f"k-means iterations must be >= 1, got {iters}")
    if _resolve(backend, x.device) == "faiss":
        return _faiss_kmeans(x, num_clusters, iters, seed)
    return _torch_kmeans(x, num_clusters, iters, seed)
