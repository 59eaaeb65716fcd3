"""Attention rollout against a direct computation, hooks removed, and patch blocking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ssl_lib.interpret.blocking import (
    block_at_peaks,
    block_squares,
    box_filter,
    peak_positions,
    scaled_block_size,
    scaled_filter_size,
    square_box,
)
from ssl_lib.interpret.rollout import AttentionRecorder, rollout_maps
from ssl_lib.models import build_backbone

timm = pytest.importorskip("timm")


def tiny_classifier(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    vit = build_backbone("vit_micro_p8", image_size=32)  # 2 blocks, 2 heads, 4x4 patches
    return nn.Sequential(vit, nn.Linear(32, 5)), vit


def direct_attentions(vit: nn.Module, images: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The ViT's forward written out, keeping every attention matrix (B, heads, N, N)."""
    x = vit._pos_embed(vit.patch_embed(images))
    attentions = []
    for block in vit.blocks:
        h = block.norm1(x)
        b, n, c = h.shape
        attn = block.attn
        heads = attn.num_heads
        qkv = attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = torch.softmax(q @ k.transpose(-2, -1) / (c // heads) ** 0.5, dim=-1)
        attentions.append(a)
        x = x + attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + block.mlp(block.norm2(x))
    return attentions, vit.norm(x)[:, 0]


def numpy_rollout(per_block: list[np.ndarray], discard: float) -> np.ndarray:
    """Row-normalised (A + I) / 2 products, one image, entries discarded by sorting."""
    n = per_block[0].shape[0]
    result = np.eye(n)
    for a in per_block:
        a = a.copy()
        flat = a.reshape(-1)
        count = int(flat.size * discard)
        for idx in np.argsort(flat, kind="stable")[:count]:
            if idx != 0:
                flat[idx] = 0.0
        a = (a + np.eye(n)) / 2
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    return result


def test_recorded_attention_is_the_direct_attention():
    clf, vit = tiny_classifier()
    images = torch.randn(3, 3, 32, 32)
    direct, features = direct_attentions(vit.eval(), images)
    with AttentionRecorder(vit) as recorder:
        out = vit(images)
    assert len(recorder.attentions) == 2
    for got, want in zip(recorder.attentions, direct, strict=True):
        assert got.shape == (3, 2, 17, 17)
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(out, features, atol=1e-5)


@pytest.mark.parametrize("kind", ["gradient", "plain"])
def test_rollout_maps_match_a_direct_computation(kind):
    clf, vit = tiny_classifier()
    images = torch.randn(2, 3, 32, 32)
    maps, logits = rollout_maps(clf, vit, images, kind=kind, discard_ratio=0.9)
    direct, features = direct_attentions(vit, images)
    head_logits = clf[1](features)
    assert torch.allclose(logits, head_logits, atol=1e-5)
    predicted = head_logits.argmax(1)
    grads = torch.autograd.grad(head_logits.gather(1, predicted[:, None]).sum(), direct)
    for i in range(2):
        if kind == "gradient":
            per_block = [
                np.clip((a[i] * g[i]).mean(0).detach().numpy(), 0, None)
                for a, g in zip(direct, grads, strict=True)
            ]
        else:
            per_block = [a[i].mean(0).detach().numpy() for a in direct]
        cls_row = numpy_rollout(per_block, 0.9)[0, 1:].reshape(1, 1, 4, 4)
        grid = torch.tensor(cls_row / cls_row.max(), dtype=torch.float32)
        want = nn.functional.interpolate(grid, size=(32, 32), mode="bilinear")[0, 0]
        assert torch.allclose(maps[i], want, atol=1e-5)


def no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


def test_no_hooks_remain_and_fused_attention_restored():
    clf, vit = tiny_classifier()
    fused = [m.attn.fused_attn for m in vit.blocks]
    clf.train()
    rollout_maps(clf, vit, torch.randn(2, 3, 32, 32))
    assert no_hooks(clf) and clf.training
    assert [m.attn.fused_attn for m in vit.blocks] == fused
    with pytest.raises(RuntimeError, match="boom"), AttentionRecorder(vit):
        raise RuntimeError("boom")
    assert no_hooks(clf)


def test_torchvision_vit_explicit_attention_keeps_the_output():
    torch.manual_seed(0)
    vit = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    want = vit(images)
    first = vit.encoder.layers[0]
    tokens = vit.encoder.pos_embedding + torch.cat(
        [vit.class_token.expand(2, -1, -1), vit._process_input(images)], dim=1
    )
    h = first.ln_1(tokens)
    _, direct = first.self_attention(h, h, h, need_weights=True, average_attn_weights=False)
    with AttentionRecorder(vit) as recorder:
        got = vit(images)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(recorder.attentions[0], direct, atol=1e-5)
    maps, _ = rollout_maps(vit, vit, images)
    assert maps.shape == (2, 32, 32) and no_hooks(vit)


def test_rollout_refuses_a_cnn():
    with pytest.raises(ValueError, match="needs a vision transformer"):
        AttentionRecorder(build_backbone("tiny_cnn"))


def test_sizes_scale_with_the_image():
    assert (scaled_block_size(224), scaled_filter_size(224)) == (30, 31)
    assert (scaled_block_size(32), scaled_filter_size(32)) == (4, 5)
    assert (scaled_block_size(448), scaled_filter_size(448)) == (60, 61)


def test_square_position_and_clamping():
    assert square_box(10, 12, 4, 32, 32) == (8, 12, 10, 14)  # centred
    assert square_box(0, 31, 4, 32, 32) == (0, 4, 28, 32)  # moved inside, same size
    assert square_box(31, 1, 4, 32, 32) == (28, 32, 0, 4)
    assert square_box(5, 5, 32, 32, 32) == (0, 32, 0, 32)
    with pytest.raises(ValueError, match="block size 33 px does not fit in a 32x32 image"):
        square_box(5, 5, 33, 32, 32)


def test_box_filter_peak_and_black_square():
    maps = torch.zeros(1, 9, 9)
    maps[0, 0, 0] = 1.0  # a lone maximum in the corner ...
    maps[0, 5:8, 4:7] = 0.5  # ... loses to a brighter 3x3 region once smoothed
    filtered = box_filter(maps, 3)
    assert filtered[0, 6, 5] == pytest.approx(0.5)
    assert peak_positions(filtered).tolist() == [[6, 5]]
    images = torch.randn(2, 3, 8, 8)
    blocked = block_squares(images, [(0, 2, 1, 3), (6, 8, 6, 8)])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = blocked * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(pixels[0, :, 0:2, 1:3], torch.zeros(3, 2, 2), atol=1e-6)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 0:2, 1:3] = mask[1, :, 6:8, 6:8] = False
    assert torch.equal(blocked.masked_select(mask), images.masked_select(mask))


def test_block_at_peaks_blocks_the_attended_square():
    clf, vit = tiny_classifier()
    images = torch.randn(2, 3, 32, 32)
    before, after, boxes = block_at_peaks(clf, vit, images, block_size=4, filter_size=5)
    maps, _ = rollout_maps(clf, vit, images)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        y, x = peak_positions(box_filter(maps, 5))[i].tolist()
        assert (y1, y2, x1, x2) == square_box(y, x, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(after, clf(block_squares(images, boxes)), atol=1e-5)
        assert torch.allclose(before, clf(images), atol=1e-5)
    with pytest.raises(ValueError, match="block size 40 px does not fit"):
        block_at_peaks(clf, vit, images, block_size=40, filter_size=5)
