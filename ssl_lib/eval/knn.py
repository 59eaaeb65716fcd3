"""Exact k-nearest-neighbour classification on precomputed features.

The search is chunked over both the bank and the queries and keeps a running top-k per query, so
no ``queries x bank`` similarity matrix is ever materialised: besides the ``Q x k`` results, the
extra memory is one ``query_chunk x bank_chunk`` block of float32 similarities, one float32 copy
of a bank chunk (only when the bank is not already float32 on the compute device) and one
float32 query chunk. All votes for every requested ``k`` and temperature are derived from a
single top-``max(k)`` search.

Similarities are inner products: :func:`knn_topk` expects L2-normalised rows (cosine similarity)
and does not renormalise; :func:`knn_evaluate` normalises its inputs unless they already are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "faiss"]
Vote = Literal["majority", "weighted"]

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_BANK_CHUNK = 16384
# Rows per step when validating or normalising features, and queries per step when voting.
_ROW_CHUNK = 8192
_NORM_TOL = 1e-3

BlockSearch = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


def _row_chunks(x: Tensor, chunk: int) -> Iterator[tuple[int, Tensor]]:
    for start in range(0, x.shape[0], chunk):
        yield start, x[start : start + chunk]


def _check_features(x: Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (rows x dim) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for start, rows in _row_chunks(x, _ROW_CHUNK):
        bad = ~torch.isfinite(rows).all(dim=1)
        if bad.any():
            row = start + int(bad.nonzero()[0])
            raise ValueError(f"{name} contains NaN or infinite values (first at row {row})")


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
        for _, rows in _row_chunks(x, _ROW_CHUNK)
    )
    if normalised:
        return x
    out = torch.empty_like(x)
    for start, rows in _row_chunks(x, _ROW_CHUNK):
        out[start : start + rows.shape[0]] = torch.nn.functional.normalize(rows.float(), dim=1)
    return out


def _torch_block(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    sims = torch.mm(queries, bank.T)
    return torch.topk(sims, k, dim=1)


def _faiss_cpu_block(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    import faiss

    sims, idx = faiss.knn(
        queries.contiguous().numpy(),
        bank.contiguous().numpy(),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return torch.from_numpy(sims), torch.from_numpy(idx)


def _faiss_gpu_block_fn(device: torch.device) -> BlockSearch:
    """Brute-force block search on one GPU via ``faiss.knn_gpu`` (needs a faiss GPU build).

    The bank chunk is passed in its storage dtype (float16/bfloat16 are read natively); FAISS
    GPU limits k to 2048. Not exercised by the test-suite, which runs on CPU-only machines.
    """
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take CUDA tensors)

    resources = faiss.StandardGpuResources()
    gpu = device.index if device.index is not None else torch.cuda.current_device()

    def block(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
        sims = torch.empty(queries.shape[0], k, device=device, dtype=torch.float32)
        idx = torch.empty(queries.shape[0], k, device=device, dtype=torch.int64)
        faiss.knn_gpu(
            resources,
            queries.contiguous(),
            bank.contiguous(),
            k,
            D=sims,
            I=idx,
            metric=faiss.METRIC_INNER_PRODUCT,
            device=gpu,
        )
        return sims, idx

    return block


def resolve_backend(backend: Backend) -> str:
    """Validate ``backend`` and resolve ``auto``.

    ``auto`` is torch on every device: on the 2-core reference CPU the chunked GEMM + ``topk``
    took 13.2-13.4 s of CPU time for the 10 000 x 50 000 x 512 benchmark search against
    15.4-17.5 s for ``faiss.knn`` (see ``benchmarks/README.md``), and on GPUs it needs no FAISS
    GPU build. ``faiss`` stays available for CPU tensors and, with a GPU build, CUDA tensors.
    """
    if backend == "auto":
        return "torch"
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ValueError("backend='faiss' needs the faiss package (faiss-cpu)") from None
    return backend


def knn_topk(
    bank: Tensor,
    queries: Tensor,
    k: int,
    *,
    backend: Backend = "auto",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search of ``queries`` (Q x D) against ``bank`` (N x D).

    Rows should be L2-normalised so that scores are cosine similarities; they are not
    renormalised here. The bank may be stored in float16/bfloat16 and may live on the CPU while
    the queries live on a GPU: each bank chunk is moved to the queries' device and cast to
    float32 once. Returns ``(sims, idx)`` on the queries' device, float32 and int64 of shape
    ``Q x k``, sorted by decreasing similarity.
    """
    _check_features(bank, "bank")
    _check_features(queries, "queries")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: bank has {bank.shape[1]}, queries have {queries.shape[1]}"
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the bank size ({bank.shape[0]} rows)")
    if query_chunk < 1 or bank_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got {query_chunk=} {bank_chunk=}")

    device = queries.device
    name = resolve_backend(backend)
    if name == "torch":
        block = _torch_block
    elif device.type == "cuda":
        block = _faiss_gpu_block_fn(device)
    elif device.type == "cpu":
        block = _faiss_cpu_block
    else:
        raise ValueError(f"backend='faiss' supports CPU or CUDA tensors, got {device}")
    keep_bank_dtype = name == "faiss" and device.type == "cuda"  # knn_gpu reads fp16 directly

    num_q = queries.shape[0]
    top_sims = torch.empty(num_q, 0, device=device, dtype=torch.float32)
    top_idx = torch.empty(num_q, 0, device=device, dtype=torch.int64)
    for b_start, b_rows in _row_chunks(bank, bank_chunk):
        b_rows = b_rows.to(device, None if keep_bank_dtype else torch.float32)
        kk = min(k, b_rows.shape[0])
        new_sims, new_idx = [], []
        for q_start, q_rows in _row_chunks(queries, query_chunk):
            sims, idx = block(q_rows.float(), b_rows, kk)
            cand_sims = torch.cat([top_sims[q_start : q_start + q_rows.shape[0]], sims], dim=1)
            cand_idx = torch.cat([top_idx[q_start : q_start + q_rows.shape[0]], idx + b_start], 1)
            keep = min(k, cand_sims.shape[1])
            sims, pos = torch.topk(cand_sims, keep, dim=1)
            new_sims.append(sims)
            new_idx.append(torch.gather(cand_idx, 1, pos))
        top_sims, top_idx = torch.cat(new_sims), torch.cat(new_idx)
    return top_sims, top_idx


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
        for start, rows_idx in _row_chunks(idx, _ROW_CHUNK):
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
    neighbours serves every vote, ``k`` and temperature. Result keys look like
    ``"majority/k=20/top1"`` and ``"weighted/k=200/T=0.1/top5"``; the settings used are stored
    alongside, so the dict can be written to JSON as is.

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
    _check_features(train_feats, "train_feats")
    _check_features(test_feats, "test_feats")
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
        backend=resolve_backend(backend),
        ks=[int(k) for k in ks],
        temperatures=[float(t) for t in temperatures],
        votes=list(votes),
        seed=seed,
    )
    return results
