"""ISD: the KL loss against its formula, anchors before enqueue, purity, both variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lib.methods import build_method
from ssl_lib.methods.isd import isd_loss


def numpy_kl(s_sims: np.ndarray, t_sims: np.ndarray, ts: float, tt: float) -> float:
    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    log_ps, log_pt = log_softmax(s_sims / ts), log_softmax(t_sims / tt)
    return float(np.sum(np.exp(log_pt) * (log_pt - log_ps)) / s_sims.shape[0])


def test_isd_loss_matches_formula():
    rng = np.random.default_rng(0)
    for ts, tt in ((0.1, 0.01), (0.02, 0.02)):
        s, t = rng.uniform(-1, 1, size=(5, 30)), rng.uniform(-1, 1, size=(5, 30))
        got = isd_loss(torch.tensor(s), torch.tensor(t), ts, tt)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(numpy_kl(s, t, ts, tt), rel=1e-4)


def test_isd_loss_gradient_only_to_student():
    s = torch.randn(3, 10, requires_grad=True)
    t = torch.randn(3, 10, requires_grad=True)
    isd_loss(s, t, 0.1, 0.01).backward()
    assert s.grad is not None and t.grad is None


def isd_config(make_config, **method):
    return make_config("isd", method={"bank_size": 48, **method})


def test_anchors_exclude_the_current_batch_and_purity(make_config):
    torch.manual_seed(0)
    model = build_method(isd_config(make_config))
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    labels = torch.arange(16) % 4
    anchors = model.bank.embeddings.clone()
    model.bank.payload("labels").copy_(torch.arange(48) % 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, extra = model.compute_loss(views, labels, torch.arange(16))
    model.flush_enqueue()  # what the Trainer does after the optimiser step
    written = model.bank.embeddings[:16].clone(), int(model.bank.ptr)
    model.load_state_dict(state)
    student = nn.functional.normalize(model.predictor(model.project(views[0])), dim=1)
    teacher = nn.functional.normalize(model.target_project(views[1]), dim=1)
    expected = isd_loss(student @ anchors.T, teacher @ anchors.T, 0.1, 0.01)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    top5 = (teacher @ anchors.T).topk(5, dim=1).indices
    purity = ((top5 % 4) == labels[:, None]).float().mean()
    assert extra["purity"].item() == pytest.approx(purity.item())
    # the teacher embeddings are written after the loss, with their labels
    torch.testing.assert_close(written[0], teacher)
    assert written[1] == 16


def test_isd_r18_variant(make_config):
    cfg = make_config(
        "isd",
        method={"bank_size": 64, "bank_init": "columns", "teacher_temperature": 0.02},
        model={
            "projector": None,
            "predictor": {"hidden_dim": 128, "out_dim": 128, "hidden_bias": False},
        },
    )
    model = build_method(cfg)
    assert isinstance(model.projector, nn.Identity) and model.bank.dim == 128  # backbone dim
    assert model.predictor[0].bias is None and model.predictor[-1].bias is not None
    columns = model.bank.embeddings.norm(dim=0)
    torch.testing.assert_close(columns, torch.ones(128))  # train_isd.py's dim-0 normalisation
    loss, _ = model.compute_loss([torch.randn(8, 3, 32, 32)] * 2, torch.zeros(8), torch.arange(8))
    assert torch.isfinite(loss)


def test_bad_settings(make_config):
    with pytest.raises(ValueError, match="predictor.out_dim"):
        build_method(
            make_config(
                "isd",
                method={"bank_size": 48},
                model={"predictor": {"hidden_dim": 32, "out_dim": 8}},
            )
        )
    with pytest.raises(ValueError, match="bank_size"):
        build_method(isd_config(make_config, bank_size=1))
