"""i-CutMix: the box and ratio, the mixed images, the mixed losses and their wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_lib.config import ConfigError
from ssl_lib.methods import build_method
from ssl_lib.methods.icutmix import apply_box, cutmix_box, icutmix
from ssl_lib.methods.losses import regression_loss
from ssl_lib.methods.moco import icutmix_infonce_loss, infonce_loss


def test_box_and_ratio_by_hand():
    # lam 0.75 on 8x8: sides 8 * sqrt(0.25) = 4, centred at (4, 4) -> rows/cols 2..6
    assert cutmix_box(0.75, 8, 8, 4, 4) == ((2, 6, 2, 6), 0.75)
    # same box centred at the corner (0, 7): clipped to rows 0..2, cols 5..8 -> 6 pixels
    box, lam = cutmix_box(0.75, 8, 8, 0, 7)
    assert box == (0, 2, 5, 8) and lam == pytest.approx(1 - 6 / 64)
    # non-square image, lam 0.5: sides int(6 * 0.707) = 4 and int(10 * 0.707) = 7 (half 3)
    assert cutmix_box(0.5, 6, 10, 3, 5) == ((1, 5, 2, 8), pytest.approx(1 - 24 / 60))
    assert cutmix_box(1.0, 8, 8, 3, 3) == ((3, 3, 3, 3), 1.0)  # no box: own image only


def test_apply_box_takes_the_partners_pixels():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).contiguous()
    partner = torch.tensor([2, 0, 1])
    mixed = apply_box(images, partner, (1, 3, 0, 2))
    for i in range(3):
        inside = mixed[i, :, 1:3, 0:2]
        assert torch.all(inside == partner[i].item())
        outside = mixed[i].clone()
        outside[:, 1:3, 0:2] = i
        assert torch.all(outside == i)
    assert torch.all(images[:, :, 1:3, 0:2] == torch.arange(3.0).view(3, 1, 1, 1))  # unchanged


def test_icutmix_ratio_is_the_share_of_own_pixels():
    torch.manual_seed(0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    for _ in range(20):
        mixed, partner, lam = icutmix(images, alpha=1.0)
        assert 0.5 <= lam <= 1.0
        assert sorted(partner.tolist()) == list(range(8))
        own = (mixed == images).all(dim=1).float().mean(dim=(1, 2))
        moved = partner != torch.arange(8)
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam))


def numpy_mixed_infonce(q, k, queue, t, partner, lam):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = np.concatenate([q @ k.T, q @ queue.T], axis=1) / t
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    rows = np.arange(len(q))
    return float(np.mean(-lam * log_p[rows, rows] - (1 - lam) * log_p[rows, partner]))


def test_mixed_infonce_matches_formula():
    rng = np.random.default_rng(1)
    q, k, queue = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    partner = np.array([3, 0, 4, 1, 2])
    for lam in (1.0, 0.8, 0.55):
        got = icutmix_infonce_loss(
            torch.tensor(q), torch.tensor(k), torch.tensor(queue), 0.2, torch.tensor(partner), lam
        )
        assert got.item() == pytest.approx(numpy_mixed_infonce(q, k, queue, 0.2, partner, lam))


def small(make_config, name, **method):
    return make_config(
        name,
        method={"icutmix": {"alpha": 1.0}, **method},
        model={"projector": {"hidden_dim": 32, "out_dim": 16, "batch_norm": False}},
    )


@pytest.mark.parametrize("name", ["moco", "byol", "msf"])
def test_methods_weigh_own_and_partner_targets(make_config, name):
    extra = {"bank_size": 40} if name != "byol" else {}
    model = build_method(small(make_config, name, **extra))
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    labels = torch.arange(8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    loss, _ = model.compute_loss(views, labels, labels)
    model.load_state_dict(state)
    torch.manual_seed(3)
    mixed, partner, lam = icutmix(views[0], 1.0)
    assert lam < 1 and not torch.equal(partner, torch.arange(8))
    with torch.no_grad():
        q = model.predictor(model.project(mixed))
        targets = model.target_project(views[1])
        if name == "moco":
            expected = icutmix_infonce_loss(q, targets, model.bank.embeddings, 0.2, partner, lam)
            plain = infonce_loss(q, targets, model.bank.embeddings, 0.2)
        else:
            if name == "msf":
                u = torch.nn.functional.normalize(targets, dim=1)
                model.bank.enqueue(u, labels=labels)
                targets = model.bank.gather(model.bank.knn(u, 5)[1])
            own, other = regression_loss(q, targets), regression_loss(q, targets[partner])
            expected = lam * own + (1 - lam) * other
            plain = own
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - plain.item()) > 1e-4  # the partner's term counts


def test_off_by_default_and_alpha_checked(make_config):
    cfg = make_config("moco", method={"bank_size": 40})
    assert cfg.method.icutmix is None
    assert make_config("byol", method={"icutmix": {}}).method.icutmix.alpha == 1.0
    with pytest.raises(ConfigError, match=r"method.icutmix.alpha must be > 0, got 0.0"):
        make_config("msf", method={"icutmix": {"alpha": 0.0}})
