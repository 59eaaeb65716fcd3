"""Vision-transformer backbones: one training step of every method, the CLS feature, sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import teacher_override, tiny_config, write_tiny_teacher
from test_methods_ddp import CASES, META_KEYS

from ssl_lib.config import ConfigError, config_from_dict
from ssl_lib.export import load_code
from ssl_lib.methods import build_method
from ssl_lib.models import build_backbone

pytest.importorskip("timm")

VIT = {"backbone": "vit_micro_p8"}


def vit_config(case: str, teacher_dir=None):
    """A ViT student; the distillation cases keep their tiny_cnn teacher (in ``teacher_dir``)."""
    entry = CASES[case]
    sections = {k: v for k, v in entry.items() if k not in META_KEYS}
    sections["model"] = {**sections.get("model", {}), **VIT}
    teacher = []
    if entry.get("teacher"):
        teacher = [teacher_override(write_tiny_teacher(teacher_dir / "teacher.pt"))]
    return config_from_dict(tiny_config(entry.get("name", case), **sections), teacher)


STAGED = {"blockwise_barlow_twins", "blockwise_sequential"}  # need a backbone with stages


@pytest.mark.parametrize("case", sorted(set(CASES) - STAGED))
def test_every_method_trains_one_step_with_a_vit(case: str, tmp_path):
    torch.manual_seed(0)
    model = build_method(vit_config(case, tmp_path))
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    labels = torch.arange(16) % 4
    before = model.backbone.cls_token.detach().clone()
    loss, _ = model.compute_loss(views, labels, torch.arange(16))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.backbone.cls_token, before)  # the CLS token got a gradient


def test_blockwise_refuses_a_vit():
    with pytest.raises(ConfigError, match="stages"):
        build_method(vit_config("blockwise_barlow_twins"))


def test_feature_is_the_cls_token():
    net = build_backbone("vit_micro_p8", image_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = net.forward_features(x)  # (B, 1 + 16 patches, 32), after the final LayerNorm
    assert tokens.shape == (3, 17, 32)
    assert torch.allclose(net(x), tokens[:, 0], atol=1e-6)


def test_patch_must_divide_the_image():
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_config("byol", model=VIT, data={"image_size": 36}))
    message = str(err.value)
    assert "\n" not in message
    assert "data.image_size 36 is not a multiple of the 8-pixel patch side" in message
    assert "'vit_micro_p8'" in message and "32 or 40" in message
    with pytest.raises(ValueError, match="image size 100 is not a multiple of the 16-pixel"):
        build_backbone("vit_b_16", image_size=100)


def test_exported_state_dict_loads_at_the_trained_size(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(build_backbone("vit_micro_p8", image_size=48).state_dict(), path)
    scope: dict = {}
    exec(load_code("vit_micro_p8", "state_dict", path, image_size=48), scope)
    assert scope["model"](torch.randn(1, 3, 48, 48)).shape == (1, 32)
