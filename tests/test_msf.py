"""MSF: the loss against the dense formula, k = 1 is BYOL-asym, self in the neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cpu_trainer
from torch import nn

from ssl_lib.config import ConfigError
from ssl_lib.data.module import SSLDataModule
from ssl_lib.memory import MemoryBank
from ssl_lib.methods import build_method
from ssl_lib.methods.losses import regression_loss
from ssl_lib.methods.losses import regression_loss as msf_loss


def test_msf_loss_matches_dense_formula():
    """The official step: d_q = 2 - 2 q M^T (B x K), gathered at the target's neighbours."""
    rng = np.random.default_rng(0)
    q, bank = rng.normal(size=(6, 8)), rng.normal(size=(50, 8))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    idx = rng.integers(0, 50, size=(6, 5))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d_q = 2 - 2 * qn @ bank.T
    expected = np.take_along_axis(d_q, idx, axis=1).mean()
    got = msf_loss(torch.tensor(q), torch.tensor(bank)[torch.tensor(idx)])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_msf_loss_gradient_matches_naive():
    q = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    n = nn.functional.normalize(torch.randn(4, 3, 6, dtype=torch.float64), dim=-1)
    msf_loss(q, n).backward()
    q2 = q.detach().clone().requires_grad_()
    qn = nn.functional.normalize(q2, dim=-1)
    (2 - 2 * torch.einsum("bd,bkd->bk", qn, n)).mean().backward()
    torch.testing.assert_close(q.grad.double(), q2.grad, rtol=1e-5, atol=1e-6)


def msf_config(make_config, **method):
    return make_config("msf", method={"bank_size": 48, **method})


def _step(model, views, labels):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, extra = model.compute_loss(views, labels, torch.arange(len(labels)))
    after = model.bank.embeddings.clone()
    model.load_state_dict(state)  # undo BN running-stat updates and the enqueue
    return loss, extra, after


def test_k1_is_byol_asym(make_config):
    torch.manual_seed(0)
    model = build_method(msf_config(make_config, k=1))
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    loss, extra, _ = _step(model, views, torch.arange(16))
    byol = regression_loss(model.predictor(model.project(views[0])), model.target_project(views[1]))
    assert loss.item() == pytest.approx(byol.item(), rel=1e-5, abs=1e-6)
    assert extra["purity"].item() == 1.0  # the self entry carries the query's own label


def test_neighbours_include_self_and_loss_uses_them(make_config):
    torch.manual_seed(0)
    model = build_method(msf_config(make_config, k=4))
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    loss, _, bank_after = _step(model, views, torch.arange(16))
    u = nn.functional.normalize(model.target_project(views[1]), dim=1)
    torch.testing.assert_close(bank_after[:16], u)  # enqueued before the search
    sims, idx = (u @ bank_after.T).topk(4, dim=1)
    assert torch.equal(idx[:, 0], torch.arange(16))  # each sample's own target comes first
    q = model.predictor(model.project(views[0]))
    assert loss.item() == pytest.approx(msf_loss(q, bank_after[idx]).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_bank(make_config, dtype):
    model = build_method(msf_config(make_config, bank_dtype=dtype))
    loss, _ = model.compute_loss(
        [torch.randn(16, 3, 32, 32)] * 2, torch.zeros(16), torch.arange(16)
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.bank.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def test_bad_settings(make_config):
    with pytest.raises(ValueError, match="method.k=60"):
        build_method(msf_config(make_config, k=60))  # k > bank size
    with pytest.raises(ValueError, match="global batch"):
        build_method(msf_config(make_config, bank_size=8))  # batch 16 does not fit
    with pytest.raises(ValueError, match="method.k must be"):
        build_method(msf_config(make_config, k=0))
    with pytest.raises(ValueError, match="predictor.out_dim"):
        build_method(
            make_config(
                "msf",
                method={"bank_size": 48},
                model={"predictor": {"hidden_dim": 32, "out_dim": 8}},
            )
        )
    with pytest.raises(ConfigError, match="search_backend"):
        msf_config(make_config, search_backend="annoy")


def test_training_start_settles_the_search_backend(make_config, monkeypatch):
    """``on_train_start`` settles ``search_backend: auto`` for the step's exact search shape."""
    cfg = msf_config(make_config, k=3)
    dm = SSLDataModule(cfg.data)
    dm.check()
    model = build_method(cfg)
    calls = []
    real = MemoryBank.choose_backend

    def spy(bank, num_queries, k):
        calls.append((bank, num_queries, k))
        return real(bank, num_queries, k)

    monkeypatch.setattr(MemoryBank, "choose_backend", spy)
    cpu_trainer(max_steps=1).fit(model, datamodule=dm)
    assert calls == [(model.bank, cfg.data.batch_size, 3)]
