import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ssl_lib.eval import knn
from ssl_lib.eval.knn import knn_classify, knn_evaluate, knn_topk, l2_normalize_rows

BACKENDS = ["torch", "faiss"]
# Float32 search vs. float64 reference: near-equal similarities may swap places.
EPS = 1e-5


def make_data(seed: int, n: int, q: int, d: int, classes: int, bank_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(bank_dtype)
    queries = torch.nn.functional.normalize(torch.randn(q, d, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    return bank, queries, labels


def reference_order(bank: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 similarity matrix and its per-row descending argsort."""
    full = queries.double().numpy() @ bank.double().numpy().T
    return full, np.argsort(-full, axis=1, kind="stable")


def reference_scores(full, order, labels, classes, k, vote, temperature=0.07):
    rows = np.arange(full.shape[0])[:, None]
    nn_idx = order[:, :k]
    if vote == "majority":
        weights = np.ones(nn_idx.shape)
    else:
        weights = np.exp(full[rows, nn_idx] / temperature)
    scores = np.zeros((full.shape[0], classes))
    np.add.at(scores, (np.repeat(rows, k, axis=1), labels.numpy()[nn_idx]), weights)
    return scores


def unambiguous(full, order, k):
    """Rows whose k-th and (k+1)-th reference neighbours are separated by more than EPS."""
    sorted_sims = np.take_along_axis(full, order, axis=1)
    if k == full.shape[1]:
        return np.ones(full.shape[0], dtype=bool)
    return sorted_sims[:, k - 1] - sorted_sims[:, k] > EPS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_matches_bruteforce(seed, backend):
    # Sizes are not multiples of the chunks; bank chunks smaller than k force many merges.
    bank, queries, _ = make_data(seed, n=457, q=83, d=24, classes=5)
    sims, idx = knn_topk(bank, queries, 200, backend=backend, query_chunk=16, bank_chunk=37)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64
    assert sims.shape == idx.shape == (83, 200)
    full, order = reference_order(bank, queries)
    sorted_sims = np.take_along_axis(full, order, axis=1)
    np.testing.assert_allclose(sims.numpy(), sorted_sims[:, :200], atol=EPS)
    # Every returned index really has the returned similarity, and no index repeats.
    np.testing.assert_allclose(np.take_along_axis(full, idx.numpy(), 1), sims.numpy(), atol=EPS)
    assert all(len(set(row)) == 200 for row in idx.tolist())
    for k in (1, 5, 20, 200):
        ok = unambiguous(full, order, k)
        assert ok.mean() > 0.9
        for row in np.flatnonzero(ok):
            assert set(idx[row, :k].tolist()) == set(order[row, :k].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_votes_match_bruteforce(seed, backend):
    classes = 7  # few classes, so majority ties are frequent
    bank, queries, labels = make_data(seed, n=613, q=97, d=16, classes=classes)
    sims, idx = knn_topk(bank, queries, 200, backend=backend, query_chunk=29, bank_chunk=101)
    full, order = reference_order(bank, queries)
    ks = (1, 5, 20, 200)
    majority = knn_classify(sims, idx, labels, classes, ks, vote="majority", seed=3)
    ties_seen = 0
    for k in ks:
        ok = unambiguous(full, order, k)
        ref = reference_scores(full, order, labels, classes, k, "majority")
        ranked = majority[k].numpy()
        assert ranked.shape == (97, 5)
        best = ref.max(axis=1, keepdims=True)
        tied = (ref == best).sum(axis=1) > 1
        ties_seen += int((tied & ok).sum())
        for row in np.flatnonzero(ok):
            # The ranking's counts are exactly the reference's largest positive counts, in
            # order, then -1 (no class); the top class is one of the maximal classes and is
            # the reference's when unique.
            expected = np.sort(ref[row])[::-1][:5]
            voted = ranked[row] >= 0
            np.testing.assert_array_equal(voted, expected > 0)
            np.testing.assert_array_equal(ref[row, ranked[row][voted]], expected[voted])
            if not tied[row]:
                assert ranked[row, 0] == ref[row].argmax()
    assert ties_seen > 0
    for temperature in (0.07, 0.1, 0.5):
        weighted = knn_classify(
            sims, idx, labels, classes, ks, vote="weighted", temperature=temperature
        )
        for k in ks:
            ok = unambiguous(full, order, k)
            ref = reference_scores(full, order, labels, classes, k, "weighted", temperature)
            ranked = weighted[k].numpy()[ok]
            # -1 (no class) scores 0, like a class without votes in the reference.
            got = np.where(ranked >= 0, np.take_along_axis(ref[ok], ranked, axis=1), 0.0)
            np.testing.assert_allclose(got, -np.sort(-ref[ok], axis=1)[:, :5], rtol=1e-4)
            assert ((ranked >= 0) == (got > 0)).all()


def test_majority_tie_break_is_seeded_and_uniform():
    # Every query has one neighbour of class 0 and one of class 1: a two-way tie.
    n = 4000
    idx = torch.tensor([[0, 1]]).repeat(n, 1)
    sims = torch.tensor([[0.9, 0.8]]).repeat(n, 1)
    labels = torch.tensor([0, 1])
    a = knn_classify(sims, idx, labels, 3, [2], seed=0)[2]
    b = knn_classify(sims, idx, labels, 3, [2], seed=0)[2]
    c = knn_classify(sims, idx, labels, 3, [2], seed=1)[2]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a[:, 0].tolist()) == {0, 1}
    assert 0.45 < (a[:, 0] == 0).double().mean() < 0.55
    assert (a[:, 2] == -1).all()  # the class without votes is not ranked at all
    # A k's result does not depend on which other k are requested.
    assert torch.equal(knn_classify(sims, idx, labels, 3, [1, 2], seed=0)[2], a)


@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_bank_matches_its_float64_values(bank_dtype):
    bank, queries, _ = make_data(5, n=300, q=40, d=32, classes=3, bank_dtype=bank_dtype)
    full, order = reference_order(bank, queries)
    sorted_sims = np.take_along_axis(full, order, axis=1)
    results = [knn_topk(bank, queries, 20, backend=b, bank_chunk=64) for b in BACKENDS]
    for sims, _ in results:
        np.testing.assert_allclose(sims.numpy(), sorted_sims[:, :20], atol=EPS)
    ok = unambiguous(full, order, 20)
    assert torch.equal(results[0][1][torch.from_numpy(ok)], results[1][1][torch.from_numpy(ok)])


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an aten operation."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
def test_no_query_by_bank_tensor_is_created(bank_dtype):
    num_q, n, d, k, qc, bc = 300, 2000, 8, 10, 64, 256
    bank, queries, _ = make_data(0, n=n, q=num_q, d=d, classes=2, bank_dtype=bank_dtype)
    with _LargestOutput() as naive:
        queries @ bank.float().T
    assert naive.largest == num_q * n  # the probe does see a full similarity matrix
    with _LargestOutput() as probe:
        knn_topk(bank, queries, k, backend="torch", query_chunk=qc, bank_chunk=bc)
    # Largest legitimate temporaries: one similarity block, a float32 bank chunk, the results.
    assert probe.largest <= max(qc * bc, bc * d, num_q * k)
    assert probe.largest < num_q * n // 5


def test_evaluate_searches_once_and_is_json_serialisable(monkeypatch):
    bank, queries, labels = make_data(0, n=500, q=60, d=16, classes=4)
    test_labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1))
    calls = []
    real = knn.knn_topk

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(knn, "knn_topk", counting)
    res = knn_evaluate(bank, labels, queries, test_labels, backend="torch", query_chunk=7)
    assert calls == [200]
    json.dumps(res)
    expected = {f"majority/k={k}/top{n}" for k in (1, 20, 200) for n in (1, 5)}
    expected |= {
        f"weighted/k={k}/T={t}/top{n}"
        for k in (1, 20, 200)
        for t in ("0.07", "0.1")
        for n in (1, 5)
    }
    assert expected <= res.keys()
    assert all(0 <= res[key] <= 100 for key in expected if key.endswith("top1"))
    assert res["majority/k=1/top1"] == res["weighted/k=1/T=0.1/top1"]  # one neighbour, one vote
    # Top-5 of 4 classes would be all of them: not reported.
    assert all(res[key] is None for key in expected if key.endswith("top5"))
    assert (res["num_train"], res["num_test"], res["dim"], res["num_classes"]) == (500, 60, 16, 4)
    assert res["backend"] == "torch" and res["bank_dtype"] == "float32"
    # Evaluation normalises: scaling rows changes nothing; backends give the same numbers.
    scaled = knn_evaluate(bank * 3.0, labels, queries * 0.5, test_labels, backend="torch")
    assert {k: scaled[k] for k in expected} == {k: res[k] for k in expected}
    other = knn_evaluate(bank, labels, queries, test_labels, backend="faiss")
    assert {k: other[k] for k in expected} == {k: res[k] for k in expected}


def test_evaluate_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 5
    train_labels = torch.arange(10).repeat(30)
    test_labels = torch.arange(10).repeat(5)
    train = centres[train_labels] + torch.randn(300, 64, generator=g)
    test = centres[test_labels] + torch.randn(50, 64, generator=g)
    res = knn_evaluate(
        train.half(), train_labels, test, test_labels, ks=(1, 20), votes=["majority"]
    )
    assert res["majority/k=1/top1"] == res["majority/k=20/top1"] == 100.0
    assert res["bank_dtype"] == "float16" and "weighted/k=1/T=0.07/top1" not in res
    assert res["backend"] == "torch"  # what "auto" resolves to


def test_l2_normalize_rows():
    x = torch.randn(50, 8)
    y = l2_normalize_rows(x)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(50))
    assert l2_normalize_rows(y) is y
    h = l2_normalize_rows(x.half())
    assert h.dtype == torch.float16 and l2_normalize_rows(h) is h


def test_bad_inputs_raise_clear_errors():
    bank, queries, labels = make_data(0, n=50, q=10, d=8, classes=3)
    with pytest.raises(ValueError, match=r"k=51 .*bank size \(50 rows\)"):
        knn_topk(bank, queries, 51)
    with pytest.raises(ValueError, match=r"k=200 is larger than the bank \(50 training rows\)"):
        knn_evaluate(bank, labels, queries, labels[:10])
    with pytest.raises(ValueError, match="dimension mismatch: bank has 8, queries have 4"):
        knn_topk(bank, queries[:, :4], 5)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn_evaluate(bank, labels, queries[:, :4], labels[:10], ks=(1,))
    with pytest.raises(ValueError, match="queries is empty"):
        knn_topk(bank, queries[:0], 5)
    with pytest.raises(ValueError, match="train_feats is empty"):
        knn_evaluate(bank[:0], labels[:0], queries, labels[:10], ks=(1,))
    with pytest.raises(ValueError, match="2-D"):
        knn_topk(bank[0], queries, 1)
    nan_bank = bank.clone()
    nan_bank[17, 3] = float("nan")
    with pytest.raises(ValueError, match="bank contains NaN .* row 17"):
        knn_topk(nan_bank, queries, 5)
    with pytest.raises(ValueError, match="test_feats contains NaN"):
        knn_evaluate(bank, labels, queries * float("nan"), labels[:10], ks=(1,))
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 3\).*\[0, 5\]"):
        knn_evaluate(
            bank,
            torch.cat([labels[:-1], torch.tensor([5])]),
            queries,
            labels[:10],
            ks=(1,),
            num_classes=3,
        )
    with pytest.raises(ValueError, match=r"test_labels must lie in \[0, 3\)"):
        knn_evaluate(bank, labels, queries, torch.full((10,), -1), ks=(1,), num_classes=3)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(10,\)"):
        knn_evaluate(bank, labels, queries, labels[:9], ks=(1,))
    with pytest.raises(ValueError, match="backend"):
        knn_topk(bank, queries, 1, backend="annoy")
    with pytest.raises(ValueError, match="votes"):
        knn_evaluate(bank, labels, queries, labels[:10], ks=(1,), votes=("soft",))
    sims, idx = knn_topk(bank, queries, 5)
    with pytest.raises(ValueError, match="number of neighbours searched \\(5\\)"):
        knn_classify(sims, idx, labels, 3, [1, 20])
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_classify(sims, idx, labels, 3, [1], vote="weighted", temperature=0.0)


# --- Reported accuracies come from the votes only --------------------------------------------


def test_classes_without_votes_earn_no_top5_credit():
    # Query i is e_i; its only 1-NN votes for class (i + 1) % 10, never its own label.
    r = knn_evaluate(
        torch.eye(10),
        torch.arange(10),
        torch.eye(10).repeat(10, 1),
        (torch.arange(100) % 10 + 1) % 10,
        ks=[1],
        num_classes=10,
    )
    assert r["majority/k=1/top1"] == 0.0 and r["majority/k=1/top5"] == 0.0
    for t in ("0.07", "0.1"):
        assert r[f"weighted/k=1/T={t}/top1"] == 0.0 and r[f"weighted/k=1/T={t}/top5"] == 0.0


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_only_voted_classes_are_ranked(vote):
    bank, queries, labels = make_data(3, n=120, q=40, d=8, classes=12)
    sims, idx = knn_topk(bank, queries, 3)
    ranked = knn_classify(sims, idx, labels, 12, [1, 3], vote=vote)
    for k, pred in ranked.items():
        for row in range(40):
            voted = set(labels[idx[row, :k]].tolist())
            got = pred[row].tolist()
            assert set(got[: len(voted)]) == voted and got[len(voted) :] == [-1] * (5 - len(voted))


def plain_knn_reference(bank, bank_labels, queries, query_labels, k, classes, temperature):
    """Per query, in float64 and plain Python: is the label among the k neighbours' labels, is
    it a weighted top-5 class (positive score, fewer than 5 classes scoring more), and is the
    k-th neighbour clearly closer than the (k+1)-th (so float32 search finds the same set)."""
    among, top5, clear = [], [], []
    b, q = bank.double(), queries.double()
    for i in range(q.shape[0]):
        sims = (b @ q[i]).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        nearest = order[:k]
        scores = [0.0] * classes
        for j in nearest:
            scores[int(bank_labels[j])] += math.exp(sims[j] / temperature)
        label = int(query_labels[i])
        among.append(label in {int(bank_labels[j]) for j in nearest})
        better = sum(s > scores[label] for s in scores)
        top5.append(scores[label] > 0 and better < 5)
        clear.append(sims[order[k - 1]] - sims[order[k]] > EPS)
    return np.array(among), np.array(top5), np.array(clear)


@pytest.mark.parametrize("seed", [0, 5])  # seeds without near-ties (asserted below)
def test_top5_follows_the_neighbours_labels_on_random_data(seed):
    classes = 10
    bank, queries, bank_labels = make_data(seed, n=300, q=120, d=12, classes=classes)
    query_labels = torch.randint(0, classes, (120,), generator=torch.Generator().manual_seed(9))
    ks = [1, 2, 3, 4, 20]
    res = knn_evaluate(
        bank, bank_labels, queries, query_labels, ks=ks, temperatures=[0.1], num_classes=classes
    )
    for k in ks:
        among, top5, clear = plain_knn_reference(
            bank, bank_labels, queries, query_labels, k, classes, 0.1
        )
        assert clear.all()  # no near-tie between the k-th and (k+1)-th neighbour
        share = 100.0 * among.mean()
        for key in (f"majority/k={k}/top5", f"weighted/k={k}/T=0.1/top5"):
            assert res[key] <= share + 1e-9, key
            if k < 5:  # at most k < 5 classes have votes, and all of them are in the top 5
                assert res[key] == pytest.approx(share), key
        # Weighted scores are real-valued (no ties): the top-5 is exactly the reference's.
        assert res[f"weighted/k={k}/T=0.1/top5"] == pytest.approx(100.0 * top5.mean())


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_tied_classes_are_ordered_at_random_not_by_index(vote):
    # Every query's two neighbours are equally close and of classes 3 and 1: a tie either way.
    n = 4000
    idx = torch.tensor([[0, 1]]).repeat(n, 1)
    sims = torch.full((n, 2), 0.5)
    labels = torch.tensor([3, 1])
    a = knn_classify(sims, idx, labels, 6, [2], vote=vote, seed=0)[2]
    assert torch.equal(a, knn_classify(sims, idx, labels, 6, [2], vote=vote, seed=0)[2])
    assert not torch.equal(a, knn_classify(sims, idx, labels, 6, [2], vote=vote, seed=1)[2])
    assert 0.45 < (a[:, 0] == 1).double().mean() < 0.55
    assert set(a[:, :2].flatten().tolist()) == {1, 3} and (a[:, 2:] == -1).all()
    # As accuracies: the same image twice in the bank, labelled 3 and 1. Queries of class 1
    # are top-1 hits about half the time; queries of class 0 (nobody voted for it) never.
    bank = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    key = "majority/k=2/top1" if vote == "majority" else "weighted/k=2/T=0.1/top1"
    for label, low, high in ((1, 45, 55), (0, 0, 0)):
        res = knn_evaluate(
            bank,
            torch.tensor([3, 1]),
            bank[:1].repeat(n, 1),
            torch.full((n,), label),
            ks=[2],
            votes=[vote],
            temperatures=[0.1],
            num_classes=6,
        )
        assert low <= res[key] <= high, (label, res[key])


def test_top5_is_not_reported_with_five_or_fewer_classes():
    bank, queries, labels = make_data(0, n=60, q=20, d=8, classes=5)
    query_labels = labels[:20]
    for classes in (2, 5):
        res = knn_evaluate(
            bank, labels % classes, queries, query_labels % classes, ks=(1, 20), votes=["majority"]
        )
        assert res["majority/k=20/top5"] is None and res["majority/k=1/top5"] is None
        assert 0 <= res["majority/k=20/top1"] <= 100
    res = knn_evaluate(bank, labels, queries, query_labels, ks=(20,), num_classes=6)
    assert isinstance(res["majority/k=20/top5"], float)
    with pytest.raises(ValueError, match="at least 2 classes"):
        knn_evaluate(bank, labels * 0, queries, query_labels * 0, ks=(1,))


def test_topk_accuracy_rejects_what_it_cannot_score():
    ranked = torch.tensor([[2, -1], [0, 1]])
    assert knn.topk_accuracy(ranked, torch.tensor([1, 1]), 2) == 50.0  # -1 is never a hit
    with pytest.raises(ValueError, match="n=5 must be between 1 and the 2 ranked columns"):
        knn.topk_accuracy(ranked, torch.tensor([1, 1]), 5)
    with pytest.raises(ValueError, match="non-empty"):
        knn.topk_accuracy(ranked[:0], torch.tensor([], dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        knn.topk_accuracy(ranked, torch.tensor([1]), 1)


def test_a_far_neighbour_still_votes_when_its_weight_underflows():
    # exp((-1 - 1) / 1e-4) is 0 in float64; the class of that neighbour has a vote all the same.
    sims, idx = torch.tensor([[1.0, -1.0]]), torch.tensor([[0, 1]])
    ranked = knn_classify(
        sims, idx, torch.tensor([2, 4]), 6, [2], vote="weighted", temperature=1e-4
    )
    assert ranked[2].tolist() == [[2, 4, -1, -1, -1]]
