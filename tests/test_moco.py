"""MoCo v2: InfoNCE against its formula, the queue seen by the logits, the head shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lib.config import ConfigError
from ssl_lib.methods import build_method
from ssl_lib.methods.moco import infonce_loss


def numpy_infonce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = np.concatenate([np.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1) / t
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float(np.mean(log_z - logits[:, 0]))


def test_infonce_matches_formula():
    rng = np.random.default_rng(0)
    for t in (0.07, 0.2, 1.0):
        q, k, queue = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), rng.normal(size=(20, 8))
        got = infonce_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), t).item()
        assert got == pytest.approx(numpy_infonce(q, k, queue, t), rel=1e-5)


def test_infonce_gradient_only_to_query():
    q, k, queue = (torch.randn(4, 5, requires_grad=True) for _ in range(3))
    loss = infonce_loss(q, k, queue, 0.2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def moco_config(make_config, **method):
    return make_config(
        "moco",
        method={"bank_size": 40, **method},
        model={"projector": {"hidden_dim": 32, "out_dim": 16, "batch_norm": False}},
    )


def test_logits_use_the_queue_before_enqueue(make_config):
    torch.manual_seed(0)
    model = build_method(moco_config(make_config))
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    labels = torch.arange(16)
    queue = model.bank.embeddings.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = model.compute_loss(views, labels, labels)
    model.flush_enqueue()  # what the Trainer does after the optimiser step
    keys = nn.functional.normalize(model.target_project(views[1]), dim=1)
    assert torch.allclose(model.bank.embeddings[:16], keys, atol=1e-6)  # enqueued after
    assert torch.equal(model.bank.payload("labels")[:16], labels)
    model.load_state_dict(state)
    q = model.project(views[0])
    keys = model.target_project(views[1])
    expected = infonce_loss(q, keys, queue, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with_current = infonce_loss(q, keys, torch.cat([keys, queue[16:]]), 0.2)
    assert loss.item() != pytest.approx(with_current.item(), rel=1e-3)


def test_head_has_no_batch_norm_and_no_predictor(make_config):
    model = build_method(moco_config(make_config))
    assert [type(m) for m in model.projector] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(model.predictor, nn.Identity)
    assert model.bank.dim == 16 and model.cfg.method.ema_momentum == 0.999


def test_bad_bank_settings(make_config):
    with pytest.raises(ValueError, match="bank_size"):
        build_method(moco_config(make_config, bank_size=0))
    with pytest.raises(ConfigError, match="bank_dtype"):
        moco_config(make_config, bank_dtype="fp8")
