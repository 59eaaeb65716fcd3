"""A small k-NN probe for tests: unweighted k-NN majority vote on L2-normalised features."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ssl_lib.data import build_base_dataset
from ssl_lib.data.transforms import VIEWS


@torch.no_grad()
def features(encode: Callable[[Tensor], Tensor], data_cfg, train: bool, batch: int = 100):
    """``(features, labels)`` of a split of ``data_cfg``'s dataset with the ``eval`` view."""
    ds = build_base_dataset(data_cfg, train=train)
    view = VIEWS.get("eval")(data_cfg.image_size)
    feats, labels = [], []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        feats.append(encode(torch.stack([view(img) for img, _ in items])))
        labels += [label for _, label in items]
    return torch.nn.functional.normalize(torch.cat(feats), dim=1), torch.tensor(labels)


def knn_accuracy(encode: Callable[[Tensor], Tensor], data_cfg, k: int = 20) -> float:
    """k-NN accuracy on the held-out split, with the training split as the labelled bank."""
    bank, bank_labels = features(encode, data_cfg, train=True)
    queries, labels = features(encode, data_cfg, train=False)
    idx = (queries @ bank.T).topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(bank_labels[idx], int(bank_labels.max()) + 1).sum(1)
    return (votes.argmax(1) == labels).float().mean().item()


@pytest.fixture
def single_thread():
    """One intra-op thread for CPU training runs: on a shared machine, more threads contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
