"""The shared regression loss (BYOL, MSF, CMSF) and neighbour purity against their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_lib.memory import MemoryBank
from ssl_lib.methods.losses import neighbour_purity, regression_loss


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_loss(p: np.ndarray, t: np.ndarray, valid: np.ndarray) -> float:
    """2 - 2 cos per (query, valid target), mean per query, mean over queries with any."""
    cos = np.einsum("bd,bkd->bk", unit(p), unit(t))
    per_query = [(2 - 2 * cos[i][valid[i]]).mean() for i in range(len(p)) if valid[i].any()]
    return float(np.mean(per_query))


def test_k_targets_with_and_without_a_mask_match_the_formula():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(6, 8)), 3 * rng.normal(size=(6, 4, 8))  # targets not unit
    valid = rng.random((6, 4)) < 0.5
    valid[2] = False  # a query without any valid target is left out
    got = regression_loss(torch.tensor(p), torch.tensor(t), torch.tensor(valid))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(numpy_loss(p, t, valid), rel=1e-5)
    everything = np.ones((6, 4), dtype=bool)
    got = regression_loss(torch.tensor(p), torch.tensor(t))
    assert got.item() == pytest.approx(numpy_loss(p, t, everything), rel=1e-5)
    one = regression_loss(torch.tensor(p), torch.tensor(t[:, 0]))  # (B, D): one target each
    assert one.item() == pytest.approx(numpy_loss(p, t[:, :1], everything[:, :1]), rel=1e-5)


def test_gradient_reaches_predictions_only_and_no_valid_target_gives_zero():
    p = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 3, 5, requires_grad=True)
    none = regression_loss(p, t, torch.zeros(4, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p)) and t.grad is None


def test_low_precision_targets_are_used_in_float32():
    rng = np.random.default_rng(1)
    p = torch.tensor(rng.normal(size=(5, 16)), dtype=torch.float32)
    t = torch.nn.functional.normalize(torch.randn(5, 2, 16), dim=-1).to(torch.bfloat16)
    got = regression_loss(p, t)
    expected = numpy_loss(p.numpy(), t.float().numpy(), np.ones((5, 2), dtype=bool))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-6)


def test_neighbour_purity_counts_labelled_queries_only():
    bank = MemoryBank(6, 4, payloads=("labels",))
    rows = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    bank.enqueue(rows, labels=torch.arange(6) % 2)
    idx = torch.tensor([[0, 1], [2, 4], [1, 3]])  # stored labels [0, 1], [0, 0], [1, 1]
    labels = torch.tensor([0, 0, -1])  # the third query has no label and does not count
    assert neighbour_purity(bank, idx, labels)["purity"].item() == pytest.approx(3 / 4)
    assert neighbour_purity(bank, idx, torch.full((3,), -1)) == {}
