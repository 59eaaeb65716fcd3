"""Cluster alignment: k-means clusters of frozen features matched one-to-one to the classes.

The "cluster alignment" metric of CompRess (Abbasi Koohpayegani et al., NeurIPS 2020, arXiv
2010.14713; the last column of its ImageNet results table): k-means on the L2-normalised train
features, every train and val image assigned to its nearest centroid, a score ``S[c, y]``
between cluster ``c`` and class ``y`` on the train set, a one-to-one cluster -> class map
maximising the summed score (the Hungarian method, :func:`scipy.optimize.linear_sum_assignment`),
and the share of images whose cluster is mapped to their class. With ``score="precision"``
(CompRess) ``S[c, y] = |c ∩ y| / |c|``; with ``score="count"`` ``S[c, y] = |c ∩ y|``, whose
matching maximises the train accuracy itself.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ssl_lib.eval.knn import l2_normalize_rows
from ssl_lib.memory.kmeans import kmeans_fit, nearest_centroid
from ssl_lib.memory.search import check_features
from ssl_lib.report import _figure

Score = Literal["precision", "count"]


def contingency(cluster_ids: Tensor, labels: Tensor, num_clusters: int, num_classes: int) -> Tensor:
    """``counts[c, y]`` = number of images in cluster ``c`` with label ``y``.

    ``cluster_ids`` and ``labels``: integer tensors of shape (N,), in ``[0, num_clusters)`` and
    ``[0, num_classes)``. Returns int64 ``num_clusters x num_classes`` on the CPU. Raises
    ``ValueError`` for mismatched shapes or values out of range.
    """
    cluster_ids, labels = cluster_ids.cpu().long(), labels.cpu().long()
    if cluster_ids.dim() != 1 or cluster_ids.shape != labels.shape:
        raise ValueError(
            f"cluster_ids and labels must both have shape (N,), got {tuple(cluster_ids.shape)} "
            f"and {tuple(labels.shape)}"
        )
    for name, values, bound in (
        ("cluster_ids", cluster_ids, num_clusters),
        ("labels", labels, num_classes),
    ):
        if values.numel() and not (0 <= int(values.min()) and int(values.max()) < bound):
            raise ValueError(
                f"{name} must lie in [0, {bound}), got [{values.min()}, {values.max()}]"
            )
    flat = cluster_ids * num_classes + labels
    return torch.bincount(flat, minlength=num_clusters * num_classes).view(
        num_clusters, num_classes
    )


def alignment_scores(counts: Tensor, score: Score = "precision") -> Tensor:
    """The score matrix ``S`` (float64, same shape as ``counts``) that the matching maximises.

    ``precision``: ``counts[c, y] / |c|`` (CompRess: overlap divided by the cluster's size; an
    empty cluster scores 0 everywhere); ``count``: ``counts`` itself. Raises ``ValueError`` for
    another ``score``.
    """
    if score == "count":
        return counts.double()
    if score != "precision":
        raise ValueError(f"score must be 'precision' or 'count', got {score!r}")
    sizes = counts.sum(dim=1, keepdim=True).double()
    return counts.double() / sizes.clamp(min=1)


def match_clusters(scores: Tensor) -> Tensor:
    """The one-to-one cluster -> class map with the largest summed score.

    ``scores``: float ``K x C`` (:func:`alignment_scores`). Solved exactly by
    ``scipy.optimize.linear_sum_assignment`` on ``-scores``. Returns int64 (K,): the class of
    each cluster, ``-1`` for the ``K - C`` clusters left without one when ``K > C`` (when
    ``K < C``, ``C - K`` classes get no cluster).
    """
    rows, cols = linear_sum_assignment(-scores.double().cpu().numpy())
    mapping = torch.full((scores.shape[0],), -1, dtype=torch.long)
    mapping[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return mapping


def aligned_accuracy(counts: Tensor, mapping: Tensor) -> float:
    """Percentage (0-100) of images whose cluster is mapped to their class.

    ``sum_c counts[c, mapping[c]] / N`` over the mapped clusters (``mapping[c] = -1`` counts
    nothing); ``counts`` from :func:`contingency`, ``mapping`` from :func:`match_clusters`.
    Raises ``ValueError`` when ``counts`` holds no image.
    """
    total = int(counts.sum())
    if total == 0:
        raise ValueError("accuracy of an empty set: counts holds no image")
    mapped = (mapping >= 0).nonzero().squeeze(1)
    hits = int(counts[mapped, mapping[mapped]].sum())
    return 100.0 * hits / total


def aligned_order(mapping: Tensor, num_classes: int) -> Tensor:
    """Clusters in the order of their classes: the cluster mapped to class 0, to class 1, ...,
    then the clusters without a class (by index). int64 (K,); ``counts[order].T`` is the
    ``C x K`` confusion matrix whose diagonal holds the matched pairs (when ``K = C``)."""
    matched = [int(c) for y in range(num_classes) for c in (mapping == y).nonzero().flatten()]
    unmatched = (mapping < 0).nonzero().flatten().tolist()
    return torch.tensor(matched + unmatched, dtype=torch.long)


def cluster_alignment(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    *,
    num_clusters: int | None = None,
    iters: int = 20,
    seed: int = 0,
    score: Score = "precision",
    backend: str = "faiss",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Cluster-alignment accuracy (%) on train and val, the map fitted on train (CompRess).

    ``train_feats`` (N x D) and ``val_feats`` (Q x D): float features, L2-normalised here;
    ``train_labels`` (N,) and ``val_labels`` (Q,): integer labels in ``[0, num_classes)``.
    k-means (:func:`~ssl_lib.memory.kmeans.kmeans_fit`, ``backend``, ``iters``, ``seed``) into
    ``num_clusters`` (default ``num_classes``) clusters on the train features; every train and
    val image goes to its nearest centroid (L2). The map comes from the train contingency table
    (:func:`alignment_scores` with ``score``, :func:`match_clusters`) and is applied unchanged
    to val.

    Returns ``(results, counts)``: ``results`` is JSON-ready (``train_acc``, ``val_acc``,
    ``mapping``: class index of each cluster or ``-1``, ``cluster_sizes`` on train, and the
    settings); ``counts`` holds the int64 ``K x C`` contingency tables ``train`` and ``val``.
    Raises ``ValueError`` for bad features or labels, or ``num_clusters`` outside ``[1, N]``.
    """
    check_features(train_feats, "train_feats")
    check_features(val_feats, "val_feats")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: train_feats has {train_feats.shape[1]}, "
            f"val_feats has {val_feats.shape[1]}"
        )
    k = num_classes if num_clusters is None else num_clusters
    train_x = l2_normalize_rows(train_feats).float()
    centroids, train_ids = kmeans_fit(train_x, k, iters, seed, backend)
    val_ids = nearest_centroid(l2_normalize_rows(val_feats).float(), centroids.to(val_feats.device))
    counts = {
        "train": contingency(train_ids, train_labels, k, num_classes),
        "val": contingency(val_ids, val_labels, k, num_classes),
    }
    mapping = match_clusters(alignment_scores(counts["train"], score))
    results = {
        "train_acc": aligned_accuracy(counts["train"], mapping),
        "val_acc": aligned_accuracy(counts["val"], mapping),
        "num_clusters": k,
        "num_classes": num_classes,
        "score": score,
        "iters": iters,
        "seed": seed,
        "backend": backend,
        "mapping": mapping.tolist(),
        "cluster_sizes": counts["train"].sum(dim=1).tolist(),
    }
    return results, counts


def plot_confusion(counts: dict[str, Tensor], mapping: Tensor, classes: list[str], out) -> None:
    """Write the train and val confusion matrices (classes x clusters, clusters permuted to
    their matched classes, :func:`aligned_order`; each row divided by its class's size) as one
    PNG at ``out``."""
    order = aligned_order(mapping, len(classes))
    fig = _figure(11.0, 5.0)
    for ax, (split, table) in zip(fig.subplots(1, 2), counts.items(), strict=True):
        matrix = table[order].T.double()
        matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
        image = ax.imshow(np.asarray(matrix), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"{split}: fraction of each class per cluster", fontsize="medium")
        ax.set_xlabel("cluster (ordered by matched class)")
        ax.set_ylabel("class")
        if len(order) <= 20:
            ax.set_xticks(range(len(order)), [str(c) for c in order.tolist()], fontsize="small")
        if len(classes) <= 20:
            ax.set_yticks(range(len(classes)), classes, fontsize="small")
        fig.colorbar(image, ax=ax)
    fig.savefig(out, dpi=100)
