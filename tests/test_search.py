"""Exact search: backends agree with a numpy brute force; constraints equal masked brute force;
the auto rule; k-means assignment through the same search."""

import importlib
import logging
import types

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lib.memory import AllowedIndices, MemoryBank, SameCluster, SameLabel, search
from ssl_lib.memory.kmeans import kmeans
from ssl_lib.memory.search import SearchCase, faiss_available, resolve_backend

# The module itself: ``ssl_lib.memory.search`` as an attribute is the function of that name.
search_mod = importlib.import_module("ssl_lib.memory.search")

BACKEND_NAMES = ["torch", "auto"] + (["faiss"] if faiss_available() else [])


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _brute(bank: torch.Tensor, queries: torch.Tensor, k: int):
    sims = queries.double().numpy() @ bank.double().numpy().T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def _masked_brute(bank, queries, k, allowed: np.ndarray, strict: bool):
    """Allowed rows by descending similarity, then (non-strict) disallowed rows likewise."""
    sims = queries.double().numpy() @ bank.double().numpy().T
    out_sims = np.full((len(sims), k), -np.inf)
    out_idx = np.full((len(sims), k), -1)
    valid = np.zeros((len(sims), k), dtype=bool)
    for i, row in enumerate(sims):
        good = np.flatnonzero(allowed[i])
        good = good[np.argsort(-row[good], kind="stable")][:k]
        order = list(good)
        valid[i, : len(good)] = True
        if not strict:
            bad = np.flatnonzero(~allowed[i])
            order += list(bad[np.argsort(-row[bad], kind="stable")][: k - len(good)])
        out_idx[i, : len(order)] = order
        out_sims[i, : len(order)] = row[order]
    return out_sims, out_idx, valid


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize(
    ("num_rows", "dim", "k", "chunk_size"),
    [(1000, 32, 5, 65536), (1000, 32, 20, 128), (777, 512, 7, 100), (50, 16, 50, 3), (9, 8, 1, 4)],
)
def test_backends_match_brute_force(backend, num_rows, dim, k, chunk_size):
    bank = _unit(num_rows, dim, 0)
    queries = _unit(13, dim, 1)
    result = search(bank, queries, k, backend=backend, chunk_size=chunk_size)
    ref_sims, ref_idx = _brute(bank, queries, k)
    assert result.similarities.dtype == torch.float32 and result.indices.dtype == torch.int64
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    assert np.array_equal(result.indices.numpy(), ref_idx)
    assert result.valid.all() and result.num_short == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backends_low_precision_bank(backend, dtype):
    bank = _unit(600, 256, 2).to(dtype)
    queries = _unit(9, 256, 3)
    result = search(bank, queries, 10, backend=backend, chunk_size=250)
    ref_sims, ref_idx = _brute(bank.float(), queries, 10)
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    assert np.array_equal(result.indices.numpy(), ref_idx)


def test_backends_agree_up_to_ties():
    # Duplicated rows create exact ties: similarities must agree, index sets may differ.
    base = _unit(200, 16, 4)
    bank = torch.cat([base, base])
    queries = _unit(5, 16, 5)
    results = [search(bank, queries, 6, backend=b, chunk_size=64) for b in BACKEND_NAMES]
    for r in results[1:]:
        torch.testing.assert_close(r.similarities, results[0].similarities, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.indices % 200, results[0].indices % 200)


def _labelled_bank(num_rows=300, dim=16, num_classes=6, backend="torch", chunk_size=70):
    bank = MemoryBank(
        num_rows, dim, payloads=("labels", "clusters"), backend=backend, chunk_size=chunk_size
    )
    g = torch.Generator().manual_seed(6)
    n = num_rows - 40  # the last 40 rows stay unwritten (label -1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[labels == num_classes - 1] = -1  # stored "unknown" labels
    labels[:3] = num_classes  # a rare class with 3 members
    bank.enqueue(_unit(n, dim, 7), labels=labels, clusters=labels % 3)
    return bank


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_same_label_matches_masked_brute_force(strict, backend):
    bank = _labelled_bank(backend=backend)
    queries = _unit(8, 16, 8)
    query_labels = torch.tensor([0, 1, 2, 3, -1, 6, 6, 7])  # -1: unconstrained; 7: no member
    k = 10
    result = bank.search(queries, k, SameLabel(query_labels, strict=strict))
    q = query_labels.numpy()[:, None]
    b = bank.labels.numpy()[None, :]
    allowed = ((q == b) & (b >= 0)) | (q < 0)
    ref_sims, ref_idx, ref_valid = _masked_brute(bank.embeddings, queries, k, allowed, strict)
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    assert np.array_equal(result.indices.numpy(), ref_idx)
    assert np.array_equal(result.valid.numpy(), ref_valid)
    # Queries 5, 6 (3 members of class 6) and 7 (no member) have fewer than k valid rows.
    assert result.num_short == 3
    assert result.num_valid.tolist() == [k, k, k, k, k, 3, 3, 0]
    sims, idx = bank.knn(queries, k, SameLabel(query_labels, strict=strict))
    assert torch.equal(sims, result.similarities) and torch.equal(idx, result.indices)


def test_same_label_ignores_unwritten_rows_and_unconstrained_query_is_plain_knn():
    bank = _labelled_bank()
    queries = _unit(4, 16, 9)
    result = bank.search(queries, 15, SameLabel(torch.tensor([0, 1, 2, 3])))
    assert (bank.labels[result.indices] >= 0).all()
    free = bank.search(queries, 15, SameLabel(torch.full((4,), -1)))
    plain = bank.search(queries, 15)
    assert torch.equal(free.indices, plain.indices)


@pytest.mark.parametrize("strict", [False, True])
def test_same_cluster_matches_masked_brute_force(strict):
    bank = _labelled_bank(chunk_size=33)
    queries = _unit(6, 16, 10)
    query_clusters = torch.tensor([0, 1, 2, 0, -1, 5])
    result = bank.search(queries, 12, SameCluster(query_clusters, strict=strict))
    q = query_clusters.numpy()[:, None]
    b = bank.clusters.numpy()[None, :]
    allowed = ((q == b) & (b >= 0)) | (q < 0)
    ref_sims, ref_idx, ref_valid = _masked_brute(bank.embeddings, queries, 12, allowed, strict)
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    assert np.array_equal(result.indices.numpy(), ref_idx)
    assert np.array_equal(result.valid.numpy(), ref_valid)
    assert result.num_short == 1


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("form", ["mask", "padded", "lists"])
def test_allowed_indices_matches_masked_brute_force(strict, form):
    bank = _labelled_bank(chunk_size=64)
    queries = _unit(5, 16, 11)
    g = torch.Generator().manual_seed(12)
    lists = [torch.randperm(300, generator=g)[: int(n)] for n in (0, 2, 8, 40, 120)]
    allowed = np.zeros((5, 300), dtype=bool)
    for i, ix in enumerate(lists):
        allowed[i, ix.numpy()] = True
    if form == "mask":
        constraint = AllowedIndices(torch.from_numpy(allowed), strict=strict)
    elif form == "padded":
        padded = torch.full((5, 120), -1, dtype=torch.long)
        for i, ix in enumerate(lists):
            padded[i, : len(ix)] = ix
        constraint = AllowedIndices(padded, strict=strict)
    else:
        constraint = AllowedIndices([ix.tolist() for ix in lists], strict=strict)
    result = bank.search(queries, 8, constraint)
    ref_sims, ref_idx, ref_valid = _masked_brute(bank.embeddings, queries, 8, allowed, strict)
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    assert np.array_equal(result.indices.numpy(), ref_idx)
    assert np.array_equal(result.valid.numpy(), ref_valid)
    assert result.num_short == 2


def test_constraint_errors():
    bank = _labelled_bank()
    queries = _unit(3, 16, 13)
    with pytest.raises(ValueError, match="defined for 2 queries, got 3"):
        bank.knn(queries, 2, SameLabel(torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="unknown payload 'pseudo'; accepted: labels, clusters"):
        bank.knn(queries, 2, SameLabel(torch.tensor([0, 1, 2]), payload="pseudo"))
    with pytest.raises(ValueError, match="index 300 >= bank size 300"):
        bank.knn(queries, 2, AllowedIndices([[0], [300], [1]]))
    with pytest.raises(ValueError, match="expected the bank size 300"):
        bank.knn(queries, 2, AllowedIndices(torch.ones(3, 299, dtype=torch.bool)))
    with pytest.raises(ValueError, match="got shape"):
        AllowedIndices(torch.ones(300, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        search(bank.embeddings, queries, 2, chunk_size=0)


# --- one search: query chunks, metrics, ties ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize(("query_chunk", "chunk_size"), [(None, 1000), (4, 64), (5, 7), (1, 333)])
def test_query_and_bank_chunks_match_brute_force(backend, metric, query_chunk, chunk_size):
    g = torch.Generator().manual_seed(20)
    bank = torch.randn(333, 12, generator=g)  # not normalised: l2 and ip rank differently
    queries = torch.randn(11, 12, generator=g)
    result = search(
        bank,
        queries,
        9,
        backend=backend,
        chunk_size=chunk_size,
        query_chunk=query_chunk,
        metric=metric,
    )
    b, q = bank.double().numpy(), queries.double().numpy()
    if metric == "ip":
        scores = q @ b.T
    else:
        scores = -((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :9]
    assert np.array_equal(result.indices.numpy(), idx)
    np.testing.assert_allclose(
        result.similarities.numpy(), np.take_along_axis(scores, idx, 1), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("query_chunk", [None, 3])
def test_constraint_with_query_chunks_matches_masked_brute_force(strict, query_chunk):
    bank = _labelled_bank(chunk_size=64)
    queries = _unit(8, 16, 8)
    query_labels = torch.tensor([0, 1, 2, 3, -1, 6, 6, 7])
    constraint = SameLabel(query_labels, strict=strict)
    columns = {"labels": bank.labels}
    result = search(
        bank.embeddings,
        queries,
        10,
        chunk_size=45,
        query_chunk=query_chunk,
        mask_fn=lambda a, b: constraint.chunk_mask(columns, a, b),
        strict=strict,
    )
    q, b = query_labels.numpy()[:, None], bank.labels.numpy()[None, :]
    allowed = ((q == b) & (b >= 0)) | (q < 0)
    ref_sims, ref_idx, ref_valid = _masked_brute(bank.embeddings, queries, 10, allowed, strict)
    assert np.array_equal(result.indices.numpy(), ref_idx)
    assert np.array_equal(result.valid.numpy(), ref_valid)
    np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [100, 3])
def test_k1_ties_go_to_the_lowest_row(chunk_size):
    rows = _unit(4, 8, 21)
    bank = torch.cat([rows, rows, rows])  # rows i, i + 4 and i + 8 are equal
    result = search(bank, rows, 1, backend="torch", chunk_size=chunk_size)
    assert result.indices[:, 0].tolist() == [0, 1, 2, 3]


def test_search_blocks_moves_rows_and_masks():
    from ssl_lib.memory.search import search_blocks

    bank = _unit(50, 8, 22)
    queries = _unit(4, 8, 23)
    allowed = torch.arange(50) % 3 == 0
    blocks = ((s, bank[s : s + 16].half(), allowed[s : s + 16]) for s in range(0, 50, 16))
    sims, idx = search_blocks(blocks, queries, 5)
    ref_sims, ref_idx = _brute(bank.half().float()[allowed], queries, 5)
    assert np.array_equal(idx.numpy(), torch.arange(50)[allowed][ref_idx].numpy())
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-5)
    # Fewer allowed rows than k: -inf slots with valid row indices.
    sims, idx = search_blocks([(0, bank, torch.arange(50) < 2)], queries, 4)
    assert torch.isinf(sims[:, 2:]).all() and bool(((idx >= 0) & (idx < 50)).all())


def test_chunk_and_metric_errors():
    bank, queries = _unit(10, 4, 0), _unit(2, 4, 1)
    with pytest.raises(ValueError, match="query_chunk must be >= 1, got 0"):
        search(bank, queries, 2, query_chunk=0)
    with pytest.raises(ValueError, match="unknown metric 'cos'; accepted: ip, l2"):
        search(bank, queries, 2, metric="cos")
    with pytest.raises(ValueError, match="unknown backend 'x'; accepted: auto, torch, faiss"):
        search(bank, queries, 2, backend="x")


# --- the backend rule ----------------------------------------------------------------------------


def _case(device="cpu", queries=256, rows=131072, dim=512, k=5):
    return SearchCase.of(
        torch.empty(rows, 1).expand(rows, dim), queries, k, torch.device(device), 65536, None, "ip"
    )


def test_backend_rule_without_timing():
    small = _case(queries=4, rows=1000, dim=16)
    assert small.block_macs < search_mod.AUTO_MIN_BLOCK_MACS
    assert resolve_backend("auto", small) == "torch"
    assert resolve_backend("torch", _case()) == "torch"
    assert resolve_backend("faiss", _case(), masked=True) == "torch"  # faiss cannot mask
    with pytest.raises(ValueError, match="unknown backend 'x'; accepted: auto, torch, faiss"):
        resolve_backend("x", small)
    with pytest.raises(ValueError, match="backend 'faiss' supports CPU or CUDA tensors, got meta"):
        resolve_backend("faiss", _case("meta"))
    assert resolve_backend("auto", _case("meta")) == "torch"
    if not search_mod.faiss_gpu_available():
        assert resolve_backend("auto", _case("cuda")) == "torch"
        with pytest.raises(ValueError, match="needs a GPU build of faiss"):
            resolve_backend("faiss", _case("cuda"))
    if faiss_available():
        assert resolve_backend("faiss", _case()) == "faiss"
        assert resolve_backend("auto", _case()) is None  # to be timed
        assert resolve_backend("auto", _case(), may_time=False) == "torch"


@pytest.fixture
def timed(monkeypatch):
    """Auto timing on tiny cases, a fresh cache, kernel calls recorded in order, and a fake
    clock that only the slow backend's kernel advances (1 s per block)."""
    if not faiss_available():
        pytest.skip("needs faiss")
    monkeypatch.setattr(search_mod, "AUTO_MIN_BLOCK_MACS", 0)
    monkeypatch.setattr(search_mod, "_CHOICES", {})
    clock = [0.0]
    monkeypatch.setattr(search_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls: list[str] = []

    def make(slow_backend: str) -> list[str]:
        for name, attr in (("torch", "_torch_kernel"), ("faiss", "_faiss_cpu_kernel")):
            kernel = getattr(search_mod, attr)

            def run(*args, kernel=kernel, name=name):
                calls.append(name)
                clock[0] += 1.0 if name == slow_backend else 0.0
                return kernel(*args)

            monkeypatch.setattr(search_mod, attr, run)
        return calls

    return make


@pytest.mark.parametrize("slow_backend", ["torch", "faiss"])
def test_auto_times_its_own_blocks_once_and_logs_the_choice(timed, caplog, slow_backend):
    calls = timed(slow_backend)
    faster = "faiss" if slow_backend == "torch" else "torch"
    bank, queries = _unit(300, 8, 30), _unit(12, 8, 31)
    ref_sims, ref_idx = _brute(bank, queries, 4)
    with caplog.at_level(logging.INFO, logger="ssl_lib.memory.search"):
        # 2 query chunks x 6 bank chunks: the six timed blocks are the search's own blocks.
        first = search(bank, queries, 4, chunk_size=50, query_chunk=6)
        assert calls == list(search_mod._TIMING_ORDER) + [faster] * 6
        calls.clear()
        second = search(bank, queries, 4, chunk_size=50, query_chunk=6)
        assert calls == [faster] * 12
    for result in (first, second):
        assert np.array_equal(result.indices.numpy(), ref_idx)
        np.testing.assert_allclose(result.similarities.numpy(), ref_sims, rtol=0, atol=1e-5)
    records = [r.getMessage() for r in caplog.records]
    assert len(records) == 1
    ms = "1000.00, faiss 0.00" if faster == "faiss" else "0.00, faiss 1000.00"
    assert f": {faster} (median ms per block: torch {ms})" in records[0]
    assert "12 queries" not in records[0] and "6 queries x 300 rows x 8 dims" in records[0]


def test_auto_with_too_few_blocks_repeats_its_first_block(timed):
    calls = timed("torch")
    bank, queries = _unit(40, 8, 32), _unit(5, 8, 33)
    result = search(bank, queries, 3)  # one block: five extra timed runs of it
    assert calls == list(search_mod._TIMING_ORDER)
    assert np.array_equal(result.indices.numpy(), _brute(bank, queries, 3)[1])
    calls.clear()
    search(bank, queries, 3)
    assert calls == ["faiss"]
    calls.clear()
    search(bank, queries, 2)  # another k is another case
    assert calls == list(search_mod._TIMING_ORDER)


def test_bank_choose_backend_settles_auto_before_the_first_search(timed, caplog):
    calls = timed("torch")
    bank = MemoryBank(64, 8, payloads=(), backend="auto")
    with caplog.at_level(logging.INFO, logger="ssl_lib.memory.search"):
        assert bank.choose_backend(6, 3) == "faiss"
    assert calls == list(search_mod._TIMING_ORDER)
    calls.clear()
    bank.knn(_unit(6, 8, 34), 3)
    assert calls == ["faiss"]
    assert len(caplog.records) == 1
    explicit = MemoryBank(64, 8, payloads=(), backend="torch")
    assert explicit.choose_backend(6, 3) == "torch"


# --- k-means assignment ---------------------------------------------------------------------------


def _old_torch_kmeans(x, num_clusters, iters, seed):
    """The torch k-means as it was before its assignments went through the search module."""

    def nearest(c):
        return (x @ c.T - 0.5 * (c * c).sum(dim=1)).argmax(dim=1)

    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:num_clusters]].clone()
    for _ in range(iters):
        assign = nearest(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1)
        filled = counts.squeeze(1) > 0
        centroids[filled] = sums[filled] / counts[filled]
    return nearest(centroids)


def test_kmeans_torch_is_unchanged_and_auto_small_is_torch():
    g = torch.Generator().manual_seed(40)
    x = nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    ids = kmeans(x, 12, iters=5, seed=3, backend="torch")
    assert torch.equal(ids, _old_torch_kmeans(x, 12, 5, 3))
    assert torch.equal(kmeans(x, 12, iters=5, seed=3), ids)  # too small to time: torch


@pytest.mark.skipif(not faiss_available(), reason="needs faiss")
def test_kmeans_faiss_final_assignment_is_faiss_nearest_centroid():
    import faiss

    g = torch.Generator().manual_seed(41)
    x = nn.functional.normalize(torch.randn(400, 16, generator=g), dim=1)
    ids = kmeans(x, 10, iters=4, seed=2, backend="faiss")
    km = faiss.Kmeans(16, 10, niter=4, seed=2, max_points_per_centroid=10_000_000)
    km.train(x.numpy())
    assert torch.equal(ids, torch.from_numpy(km.index.search(x.numpy(), 1)[1][:, 0]))
