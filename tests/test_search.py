"""Exact search: backends agree with a numpy brute force; constraints equal masked brute force."""

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lib.memory import AllowedIndices, MemoryBank, SameCluster, SameLabel, search
from ssl_lib.memory.search import faiss_available, resolve_backend

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


def test_auto_rule():
    cpu = torch.device("cpu")
    for device in (cpu, torch.device("cuda")):
        assert resolve_backend("auto", device, masked=False) == "torch"
        assert resolve_backend("torch", device, masked=False) == "torch"
    if faiss_available():
        assert resolve_backend("faiss", cpu, masked=False) == "faiss"
    assert resolve_backend("faiss", cpu, masked=True) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'x'; accepted: auto, torch, faiss"):
        resolve_backend("x", cpu, masked=False)


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
