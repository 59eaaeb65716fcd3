"""BYOL: loss against its formula, view assignment, the EMA target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lib.methods import build_method
from ssl_lib.methods.losses import regression_loss


def numpy_regression(p: np.ndarray, z: np.ndarray) -> float:
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.mean(2 - 2 * np.sum(pn * zn, axis=1)))


def test_regression_loss_matches_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, z = rng.normal(size=(9, 7)), rng.normal(size=(9, 7))
        got = regression_loss(torch.tensor(p), torch.tensor(z)).item()
        assert got == pytest.approx(numpy_regression(p, z), rel=1e-5)


def test_regression_loss_gradient_only_to_prediction():
    p = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def _views(batch=6):
    torch.manual_seed(1)
    return [torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)]


def _manual(model, online_view, target_view):
    p = model.predictor(model.projector(model.backbone(online_view)))
    with torch.no_grad():
        z = model.target["projector"](model.target["backbone"](target_view))
    return numpy_regression(p.detach().numpy(), z.numpy())


@pytest.mark.parametrize("symmetric", [False, True])
def test_byol_loss_and_view_assignment(make_config, symmetric):
    torch.manual_seed(0)
    model = build_method(make_config("byol", method={"symmetric": symmetric}))
    # make target differ from online so swapping the views changes the loss
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    views = _views()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = model.compute_loss(views, torch.zeros(6), torch.arange(6))
    model.load_state_dict(state)  # undo the BN running-stat updates of that pass
    expected = _manual(model, views[0], views[1])
    if symmetric:
        model.load_state_dict(state)
        expected += _manual(model, views[1], views[0])
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    if not symmetric:  # views[0] -> online, views[1] -> target; swapping changes the value
        model.load_state_dict(state)
        assert loss.item() != pytest.approx(_manual(model, views[1], views[0]), rel=1e-3)


def test_ema_update_parameters_only(make_config):
    model = build_method(make_config("byol", method={"ema_momentum": 0.9}))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    online = dict(model.backbone.named_parameters())
    model.log = lambda *a, **k: None  # not attached to a Trainer
    model.current_ema_momentum = lambda: 0.9
    model.update_target()
    for name, p in model.target["backbone"].named_parameters():
        expected = 0.9 * before[f"backbone.{name}"] + 0.1 * online[name]
        torch.testing.assert_close(p, expected)
    for name, buf in model.target["backbone"].named_buffers():  # BN buffers untouched
        torch.testing.assert_close(buf, before[f"backbone.{name}"])


def test_target_is_frozen_and_not_optimised(make_config):
    model = build_method(make_config("byol"))
    assert not any(p.requires_grad for p in model.target.parameters())
    trainable = {id(p) for m in model.trainable_modules() for p in m.parameters()}
    assert not trainable & {id(p) for p in model.target.parameters()}
    assert {id(p) for p in model.predictor.parameters()} <= trainable


def test_umbc_mlp_shape(make_config):
    model = build_method(
        make_config(
            "byol",
            model={
                "projector": {"hidden_dim": 64, "out_dim": 32},
                "predictor": {"hidden_dim": 64, "out_dim": 32},
            },
        )
    )
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.projector[0].bias is not None  # the UMBC MLP keeps the pre-BN bias
    assert model.predictor[0].in_features == 32 and model.predictor[-1].out_features == 32
