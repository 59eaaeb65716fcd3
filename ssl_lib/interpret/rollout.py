"""Attention rollout of vision transformers, plain and weighted by attention gradients.

* Plain rollout (Abnar & Zuidema, ACL 2020): per block the head-fused attention ``A``,
  ``(A + I) / 2`` (the residual connection), rows normalised, multiplied across blocks.
* Attention-gradient rollout, the map the ViT patch-blocking defence uses (Subramanya et al.,
  "Backdoor Attacks on Vision Transformers", arXiv 2206.08477): per block the head
  mean of ``attention * d(class logit)/d(attention)``, negatives clipped to 0, the lowest
  ``discard_ratio`` of the entries set to 0, then the same ``(A + I) / 2``, row normalisation
  and product.

The map of an image is the class token's row of the product over the patch tokens, reshaped to
the patch grid, scaled to a maximum of 1 and resized (bilinear) to the image.

Attention is materialised explicitly: timm's fused attention (``scaled_dot_product_attention``)
never forms the attention matrix, so :class:`AttentionRecorder` switches it off while it
records, and torchvision's ``nn.MultiheadAttention`` is re-run by a forward hook that computes
``softmax(q k^T / sqrt(d))`` itself and returns the same output through it. Every hook is
removed (and every switch restored) when recording ends. Backward hooks are not used: the
gradients are taken with ``torch.autograd.grad`` on the recorded attention tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionRecorder",
    "attention_rollout",
    "gradient_rollout",
    "rollout_maps",
    "vit_patch_size",
]


def _timm_attention_modules(vit: nn.Module) -> list[nn.Module]:
    # timm's Attention: q, k, v from `qkv`, attention probabilities through `attn_drop`.
    return [
        m
        for m in vit.modules()
        if hasattr(m, "fused_attn") and hasattr(m, "qkv") and hasattr(m, "attn_drop")
    ]


def _explicit_multihead_attention(
    module: nn.MultiheadAttention, x: Tensor
) -> tuple[Tensor, Tensor]:
    """Self-attention of ``module`` on ``x`` (B, N, E) with the attention (B, H, N, N) formed."""
    batch, tokens, dim = x.shape
    heads = module.num_heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return module.out_proj(out), attention


class AttentionRecorder:
    """Context manager that records every attention matrix of a ViT's forward passes.

    Supports timm ``VisionTransformer`` blocks (timm ``Attention``) and torchvision
    ``VisionTransformer`` blocks (batch-first ``nn.MultiheadAttention`` with one input
    projection). ``attentions`` holds, per block in forward order, the post-softmax attention
    ``(B, heads, N, N)`` (float, part of the autograd graph). Raises ``ValueError`` for a model
    without such blocks. Inside the context the model should be in eval mode (attention dropout
    is not applied by the torchvision path).
    """

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit
        self.timm = _timm_attention_modules(vit)
        self.torch_mha = [
            m for m in vit.modules() if isinstance(m, nn.MultiheadAttention) and m.batch_first
        ]
        if not self.timm and not self.torch_mha:
            raise ValueError(
                f"{type(vit).__name__} has no timm Attention or batch-first MultiheadAttention "
                "blocks: attention rollout needs a vision transformer"
            )
        self.attentions: list[Tensor] = []
        self._handles: list = []
        self._fused: list[tuple[nn.Module, bool]] = []

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.attentions.append(output)

    def _replace(self, module: nn.MultiheadAttention, args: tuple, output: tuple) -> tuple:
        if module.in_proj_weight is None:
            raise ValueError("attention rollout needs MultiheadAttention with one in_proj_weight")
        out, attention = _explicit_multihead_attention(module, args[0])
        self.attentions.append(attention)
        return out, None

    def __enter__(self) -> AttentionRecorder:
        self.attentions = []
        for m in self.timm:
            self._fused.append((m, m.fused_attn))
            m.fused_attn = False
            self._handles.append(m.attn_drop.register_forward_hook(self._record))
        for m in self.torch_mha:
            self._handles.append(m.register_forward_hook(self._replace))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module, fused in self._fused:
            module.fused_attn = fused
        self._handles, self._fused = [], []


def _discard_lowest(weights: Tensor, discard_ratio: float) -> Tensor:
    """``weights`` (B, N, N) with the lowest ``discard_ratio`` of each image's entries set to
    0; the class token's attention to itself (entry 0, 0) is always kept, as in the public
    rollout code the defence builds on."""
    if discard_ratio <= 0:
        return weights
    flat = weights.flatten(1).clone()
    count = int(flat.shape[1] * discard_ratio)
    lowest = flat.topk(count, dim=1, largest=False).indices
    keep_cls = flat[:, 0].clone()
    flat.scatter_(1, lowest, 0.0)
    flat[:, 0] = keep_cls
    return flat.view_as(weights)


def _roll(per_block: Sequence[Tensor], column_quirk: bool) -> Tensor:
    """Product over blocks of the row-normalised ``(A + I) / 2``; (B, N, N)."""
    tokens = per_block[0].shape[-1]
    eye = torch.eye(tokens, device=per_block[0].device, dtype=per_block[0].dtype)
    result = eye.expand_as(per_block[0]).clone()
    for weights in per_block:
        a = (weights + eye) / 2
        sums = a.sum(dim=-1)
        # column_quirk: each column j divided by row j's sum (the public code's broadcast)
        a = a / (sums.unsqueeze(-2) if column_quirk else sums.unsqueeze(-1))
        result = a @ result
    return result


def attention_rollout(
    attentions: Sequence[Tensor], discard_ratio: float = 0.0, column_quirk: bool = False
) -> Tensor:
    """Plain rollout of per-block attentions ``(B, heads, N, N)``; returns ``(B, N, N)``.

    Heads are fused by their mean; ``discard_ratio`` of the lowest fused entries (per image)
    are set to 0 before the residual identity is added (0: none). ``column_quirk`` divides
    column j by row j's sum instead of each row by its own sum (see :func:`gradient_rollout`).
    """
    fused = [_discard_lowest(a.float().mean(dim=1), discard_ratio) for a in attentions]
    return _roll(fused, column_quirk)


def gradient_rollout(
    attentions: Sequence[Tensor],
    gradients: Sequence[Tensor],
    discard_ratio: float = 0.9,
    column_quirk: bool = False,
) -> Tensor:
    """Attention-gradient rollout; attentions and their gradients ``(B, heads, N, N)`` per block.

    Per block: head mean of ``attention * gradient``, negatives clipped to 0, the lowest
    ``discard_ratio`` entries zeroed, ``(A + I) / 2``, rows normalised; multiplied across the
    blocks (first block rightmost). Returns ``(B, N, N)`` float32.

    ``column_quirk=True`` reproduces the public implementation the defence was published with,
    which divides a (1, N, N) matrix by its (1, N) row sums and so divides each *column* j by
    row j's sum (broadcasting); ``False`` (default) normalises each row by its own sum.
    """
    per_block = [
        _discard_lowest((a.float() * g.float()).mean(dim=1).clamp(min=0), discard_ratio)
        for a, g in zip(attentions, gradients, strict=True)
    ]
    return _roll(per_block, column_quirk)


def vit_patch_size(vit: nn.Module) -> int:
    """Patch side (pixels) of a timm or torchvision vision transformer."""
    if hasattr(vit, "patch_embed"):
        return int(vit.patch_embed.patch_size[0])
    if hasattr(vit, "patch_size"):
        return int(vit.patch_size)
    raise ValueError(f"{type(vit).__name__} is not a timm or torchvision vision transformer")


def rollout_maps(
    classifier: nn.Module,
    vit: nn.Module,
    images: Tensor,
    kind: str = "gradient",
    discard_ratio: float = 0.9,
    column_quirk: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rollout maps of ``images`` (B, 3, H, W) for the classes ``classifier`` predicts.

    ``classifier`` maps images to logits (B, C) through ``vit`` (e.g. backbone + linear probe).
    ``kind``: ``gradient`` (attention-gradient rollout for each image's predicted class) or
    ``plain``. Returns ``(maps, logits)``: maps (B, H, W) float32 in [0, 1] (the class token's
    rolled-out attention to the patches, scaled to a maximum of 1, bilinearly resized), and the
    logits of the unmodified forward pass (detached). The model runs in eval mode and its
    training flags are restored; no hook remains afterwards. Raises ``ValueError`` for an
    unknown ``kind`` or a model that is not a ViT.
    """
    if kind not in ("gradient", "plain"):
        raise ValueError(f"rollout kind must be 'gradient' or 'plain', got '{kind}'")
    modes = [(m, m.training) for m in classifier.modules()]
    classifier.eval()
    # a leaf that needs a gradient, so the attentions do even with frozen weights
    images = images.detach().requires_grad_(kind == "gradient")
    try:
        with torch.enable_grad(), AttentionRecorder(vit) as recorder:
            logits = classifier(images)
            attentions = recorder.attentions
            if kind == "gradient":
                predicted = logits.argmax(dim=1)
                score = logits.gather(1, predicted[:, None]).sum()
                gradients = torch.autograd.grad(score, attentions)
                rolled = gradient_rollout(attentions, gradients, discard_ratio, column_quirk)
            else:
                rolled = attention_rollout(
                    [a.detach() for a in attentions], discard_ratio, column_quirk
                )
    finally:
        for module, training in modes:
            module.training = training
    height, width = images.shape[-2:]
    patch = vit_patch_size(vit)
    grid_h, grid_w = height // patch, width // patch
    cls_row = rolled[:, 0, rolled.shape[-1] - grid_h * grid_w :].detach()
    grid = cls_row.reshape(-1, 1, grid_h, grid_w)
    grid = grid / grid.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    maps = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return maps[:, 0], logits.detach()
