"""kNN classification on precomputed features: votes and accuracies.

The neighbours come from one exact top-``max(k)`` search
(:func:`ssl_lib.memory.search.knn_topk`, chunked over the bank and the queries, so no
``queries x bank`` similarity matrix is ever materialised); every requested ``k``, vote and
temperature is derived from that single result. Similarities are inner products:
:func:`knn_evaluate` L2-normalises its inputs unless they already are, so they are cosine
similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ssl_lib.memory.search import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    SearchCase,
    check_features,
    knn_topk,
    resolve_backend,
    row_chunks,
)

Backend = Literal["auto", "torch", "faiss"]
Vote = Literal["majority", "weighted"]

# Queries per step when voting, and rows per step when normalising features.
_ROW_CHUNK = 8192
_NORM_TOL = 1e-3


def _check_labels(labels: Tensor, rows: int, num_classes: int, name: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"got values in [{low}, {high}]"
        )


def l2_normalize_rows(x: Tensor) -> Tensor:
    """Return ``x`` with unit-norm rows in its own dtype; ``x`` itself if it already has them.

    Works chunk by chunk, so at most one copy of ``x`` (in its dtype) is allocated, and none for
    features that :func:`~ssl_lib.eval.features.extract_features` already normalised.
    """
    # Rounding a unit row to a low-precision dtype moves its norm by up to a few eps.
    tol = max(_NORM_TOL, 4 * torch.finfo(x.dtype).eps)
    normalised = all(
        bool(((rows.float().norm(dim=1) - 1).abs() <= tol).all())
        for _, rows in row_chunks(x, _ROW_CHUNK)
    )
    if normalised:
        return x
    out = torch.empty_like(x)
    for start, rows in row_chunks(x, _ROW_CHUNK):
        out[start : start + rows.shape[0]] = torch.nn.functional.normalize(rows.float(), dim=1)
    return out


def _rank_ties_at_random(scores: Tensor, ncols: int, generator: torch.Generator) -> Tensor:
    """Columns of the ``ncols`` largest positive ``scores`` per row, best first, then ``-1``.

    Columns scoring 0 (no votes) are never ranked. Columns with equal scores are ordered
    uniformly at random by ``generator``: only rows whose first ``ncols + 1`` scores hold a tie
    are re-sorted (after a random column permutation, with a stable sort), so a vote without
    ties costs one ``topk``.
    """
    width = min(ncols + 1, scores.shape[1])
    values, ranked = torch.topk(scores, width, dim=1)
    ranked = ranked[:, :ncols].clone()
    tied = ((values[:, 1:] == values[:, :-1]) & (values[:, 1:] > 0)).any(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub = scores[rows]
        keys = torch.rand(sub.shape, generator=generator, dtype=torch.float64, device=sub.device)
        perm = keys.argsort(dim=1)
        order = sub.gather(1, perm).argsort(dim=1, descending=True, stable=True)[:, :ncols]
        ranked[rows] = perm.gather(1, order)
    return ranked.masked_fill(scores.gather(1, ranked) <= 0, -1)


def knn_classify(
    sims: Tensor,
    idx: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    *,
    vote: Vote = "majority",
    temperature: float = 0.07,
    seed: int = 0,
    topn: int = 5,
) -> dict[int, Tensor]:
    """Rank the classes that received votes, for every ``k`` in ``ks``, from one search.

    ``sims`` (float, cosine similarities) and ``idx`` (int64 bank rows) come from
    :func:`knn_topk`: both ``Q x K``, sorted by decreasing similarity, ``K >= max(ks)``.
    ``bank_labels`` is an int64 tensor of the bank's labels in ``[0, num_classes)``. Votes:

    * ``majority``: unweighted count of each class among the ``k`` neighbours.
    * ``weighted``: each neighbour adds ``exp(sim / temperature)`` to its class (computed as
      ``exp((sim - max_sim) / temperature)``, which ranks the same and cannot overflow).

    Only classes with at least one of the ``k`` neighbours are ranked (a weight is never less
    than the smallest normal float64, so a far neighbour still counts as a vote); the others
    never appear, and their places are filled with ``-1``, which matches no label. Classes
    with equal scores are ordered uniformly at random by a generator seeded with ``seed`` (one
    stream per ``k``, so a result does not depend on which other ``k`` were requested).

    Returns ``{k: ranked}``, ``ranked`` int64 of shape ``Q x min(topn, num_classes)`` on
    ``idx``'s device, best class first, ``-1`` after the last voted class. Raises
    ``ValueError`` for mismatched shapes, an unknown vote, a non-positive temperature or
    ``topn``, or a ``k`` outside ``[1, K]``.
    """
    if sims.shape != idx.shape or sims.dim() != 2:
        raise ValueError(
            f"sims and idx must both be Q x K, got {tuple(sims.shape)} and {tuple(idx.shape)}"
        )
    if vote not in ("majority", "weighted"):
        raise ValueError(f"vote must be 'majority' or 'weighted', got {vote!r}")
    if vote == "weighted" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if topn < 1:
        raise ValueError(f"topn must be positive, got {topn}")
    if not ks:
        raise ValueError("ks is empty")
    if min(ks) < 1 or max(ks) > sims.shape[1]:
        raise ValueError(
            f"every k must be between 1 and the number of neighbours searched ({sims.shape[1]}), "
            f"got ks={list(ks)}"
        )
    labels = bank_labels.to(idx.device)
    ncols = min(topn, num_classes)
    out: dict[int, Tensor] = {}
    for k in dict.fromkeys(ks):
        generator = torch.Generator(device=idx.device).manual_seed(seed)
        ranked = []
        for start, rows_idx in row_chunks(idx, _ROW_CHUNK):
            neighbour_labels = labels[rows_idx[:, :k]]
            scores = torch.zeros(
                rows_idx.shape[0], num_classes, dtype=torch.float64, device=idx.device
            )
            if vote == "majority":
                weights = torch.ones(neighbour_labels.shape, dtype=torch.float64, device=idx.device)
                scores.scatter_add_(1, neighbour_labels, weights)
                # Counts are integers, so a uniform jitter in [0, 1) only reorders tied classes;
                # a class without votes scores below 1.
                scores += torch.rand(
                    scores.shape, generator=generator, dtype=torch.float64, device=idx.device
                )
                values, top = torch.topk(scores, ncols, dim=1)
                ranked.append(top.masked_fill(values < 1, -1))
            else:
                rows_sims = sims[start : start + rows_idx.shape[0], :k].double()
                weights = torch.exp((rows_sims - rows_sims[:, :1]) / temperature)
                # A neighbour far below the nearest still votes: its weight never underflows to 0.
                weights.clamp_(min=torch.finfo(torch.float64).tiny)
                scores.scatter_add_(1, neighbour_labels, weights)
                ranked.append(_rank_ties_at_random(scores, ncols, generator))
        out[k] = torch.cat(ranked)
    return out


def topk_accuracy(ranked: Tensor, labels: Tensor, n: int) -> float:
    """Percentage (0-100) of rows whose label is among the first ``n`` columns of ``ranked``.

    ``ranked``: int64, ``Q x C`` classes best first (``-1`` = no class, never a hit), as
    :func:`knn_classify` returns; ``labels``: integer, shape ``(Q,)``. Raises ``ValueError``
    for an empty ``ranked``, mismatched shapes, or ``n`` outside ``[1, C]`` (a top-``n`` of
    fewer than ``n`` ranked columns is not computed).
    """
    if ranked.dim() != 2 or ranked.shape[0] == 0:
        raise ValueError(f"ranked must be a non-empty Q x C tensor, got {tuple(ranked.shape)}")
    if labels.shape != ranked.shape[:1]:
        raise ValueError(f"labels must have shape ({ranked.shape[0]},), got {tuple(labels.shape)}")
    if not 1 <= n <= ranked.shape[1]:
        raise ValueError(f"n={n} must be between 1 and the {ranked.shape[1]} ranked columns")
    hits = (ranked[:, :n] == labels.to(ranked.device)[:, None]).any(dim=1)
    return 100.0 * hits.double().mean().item()


def knn_evaluate(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (1, 20, 200),
    temperatures: Sequence[float] = (0.07, 0.1),
    votes: Sequence[Vote] = ("majority", "weighted"),
    *,
    num_classes: int | None = None,
    backend: Backend = "auto",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
    seed: int = 0,
) -> dict[str, float | int | str | list | None]:
    """kNN top-1/top-5 accuracy (in %) of ``test_feats`` against the ``train_feats`` bank.

    ``train_feats`` (N x D) and ``test_feats`` (Q x D) are floating-point features (the bank
    may be float16/bfloat16); ``train_labels`` (N,) and ``test_labels`` (Q,) are integer labels
    in ``[0, num_classes)``; ``num_classes`` defaults to the largest label + 1. Features are
    L2-normalised here unless their rows already have unit norm. One search for ``max(ks)``
    neighbours (:func:`~ssl_lib.memory.search.knn_topk` with ``backend``, ``query_chunk`` and
    ``bank_chunk``) serves every vote, ``k`` and temperature. Result keys look like
    ``"majority/k=20/top1"`` and ``"weighted/k=200/T=0.1/top5"``; the settings used are stored
    alongside (``backend`` is the one the search ran: ``auto`` reports its choice), so the dict
    can be written to JSON as is.

    Accuracies come from the votes only (see :func:`knn_classify`): a query is a top-n hit when
    its label received at least one vote and is among the ``n`` best-scored classes, so a class
    without votes is never credited and top-5 never exceeds the share of queries whose label is
    among their ``k`` neighbours. Top-5 needs more than 5 classes: with 5 or fewer every class
    would be in it, and its value is ``None`` (JSON ``null``).

    Raises ``ValueError`` for empty, non-2-D, non-float or non-finite features, mismatched
    dimensions, labels of the wrong shape, dtype or range, fewer than 2 classes, an empty
    ``ks`` or ``votes``, an unknown vote, a ``k`` larger than the bank, or a weighted vote
    without temperatures.
    """
    check_features(train_feats, "train_feats")
    check_features(test_feats, "test_feats")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: train_feats has {train_feats.shape[1]}, "
            f"test_feats has {test_feats.shape[1]}"
        )
    if not ks or not votes:
        raise ValueError(f"ks and votes must be non-empty, got ks={list(ks)}, votes={list(votes)}")
    if not set(votes) <= {"majority", "weighted"}:
        raise ValueError(f"votes must be 'majority' and/or 'weighted', got {list(votes)}")
    if max(ks) > train_feats.shape[0]:
        raise ValueError(
            f"k={max(ks)} is larger than the bank ({train_feats.shape[0]} training rows)"
        )
    if "weighted" in votes and not temperatures:
        raise ValueError("the weighted vote needs at least one temperature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes < 2:
        raise ValueError(
            f"accuracy needs at least 2 classes, got num_classes={num_classes} "
            "(pass num_classes if the labels present do not show them all)"
        )
    _check_labels(train_labels, train_feats.shape[0], num_classes, "train_labels")
    _check_labels(test_labels, test_feats.shape[0], num_classes, "test_labels")

    bank = l2_normalize_rows(train_feats)
    queries = l2_normalize_rows(test_feats)
    sims, idx = knn_topk(
        bank, queries, max(ks), backend=backend, query_chunk=query_chunk, bank_chunk=bank_chunk
    )
    case = SearchCase.of(
        bank, queries.shape[0], max(ks), queries.device, bank_chunk, query_chunk, "ip"
    )
    used_backend = resolve_backend(backend, case) or backend
    topn = min(5, num_classes)
    results: dict[str, float | int | str | list | None] = {}
    for vote in votes:
        for temperature in temperatures if vote == "weighted" else [None]:
            prefix = f"{vote}/k={{k}}" + ("" if temperature is None else f"/T={temperature:g}")
            vote_kwargs = {} if temperature is None else {"temperature": temperature}
            ranked = knn_classify(
                sims,
                idx,
                train_labels,
                num_classes,
                ks,
                vote=vote,
                seed=seed,
                topn=topn,
                **vote_kwargs,
            )
            for k, pred in ranked.items():
                results[prefix.format(k=k) + "/top1"] = topk_accuracy(pred, test_labels, 1)
                top5 = topk_accuracy(pred, test_labels, 5) if num_classes > 5 else None
                results[prefix.format(k=k) + "/top5"] = top5
    results.update(
        num_train=train_feats.shape[0],
        num_test=test_feats.shape[0],
        dim=train_feats.shape[1],
        num_classes=num_classes,
        bank_dtype=str(train_feats.dtype).removeprefix("torch."),
        backend=used_backend,
        ks=[int(k) for k in ks],
        temperatures=[float(t) for t in temperatures],
        votes=list(votes),
        seed=seed,
    )
    return results
