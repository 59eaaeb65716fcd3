"""Blockwise Barlow Twins (Siddiqui, Krueger, LeCun, Deny; TMLR 2024).

The backbone's stages are grouped into blocks (by default one block per stage: stem+layer1,
layer2, layer3, layer4 for ResNets). Block b+1 receives block b's output *detached*, so no
gradient crosses a block boundary. Every block has a pooling head (conv -> BN -> ReLU ->
global average pool) and its own Barlow Twins projector; the projectors are deep copies of one
template (identical initial weights) and one Barlow Twins criterion (the affine-free global
standardisation and the cross-correlation) serves all blocks.

Structure relative to :class:`SSLMethod`: ``self.projector`` is an ``nn.ModuleList`` with one
projector per block (built by :meth:`BlockwiseBarlowTwins.build_projector`), ``self.heads``
holds the pooling heads, and ``forward(x)`` returns the last block's head output (what the
linear probe of the paper reads); :meth:`BlockwiseBarlowTwins.block_features` gives any
block's head output.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssl_lib.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from ssl_lib.methods.registry import METHODS
from ssl_lib.models import MLPConfig, StagedBackbone, build_mlp
from ssl_lib.schema import ConfigError

# Dimensions the noise std is taken over, per mode (None: one scalar over the whole tensor).
# "c" follows the released code (std over dim 2, the height); "channel" is the per-position
# std over channels that the code's comment describes.
NOISE_DIMS: dict[str, tuple[int, ...] | None] = {
    "all": None,
    "hw": (2, 3),
    "c": (2,),
    "channel": (1,),
}
SCHEDULES = ("simultaneous", "sequential")


def inject_noise(h: Tensor, ratio: float, mode: str) -> Tensor:
    """``h + ratio * std(h) * eps`` with ``eps ~ N(0, I)``, std over ``NOISE_DIMS[mode]``."""
    dims = NOISE_DIMS[mode]
    std = h.std() if dims is None else h.std(dim=dims, keepdim=True)
    return h + ratio * std * torch.randn_like(h)


def pool_head(in_channels: int, out_dim: int, kernel: int = 1) -> nn.Sequential:
    """Conv (``kernel`` x ``kernel``, no bias) -> BN -> ReLU -> global average pool -> flatten."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_dim, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )


def block_layout(blocks: list[list[int]] | None, num_stages: int) -> list[list[int]]:
    """Stage indices of each block; ``None`` gives one block per stage.

    The blocks must cover the stages ``0 .. num_stages - 1`` in order, each stage once.
    """
    if blocks is None:
        return [[s] for s in range(num_stages)]
    layout = [list(b) for b in blocks]
    if any(not b for b in layout) or [s for b in layout for s in b] != list(range(num_stages)):
        raise ValueError(
            f"method.blocks={layout} must split the stages 0..{num_stages - 1} into non-empty, "
            f"consecutive groups, e.g. {[[s] for s in range(num_stages)]}"
        )
    return layout


@dataclass
class BlockwiseConfig(BarlowTwinsConfig):
    """Blockwise Barlow Twins (the Barlow Twins keys apply to every block).

    ``blocks``: stage indices per block (``null``: one block per stage). ``block_weights``:
    weight of each block's loss (``null``: all 1). ``head_dim`` / ``head_kernel``: the pooling
    head's conv. ``noise_std``: noise ratio (0 disables); ``noise_type``: ``all`` | ``hw`` |
    ``c`` | ``channel``. ``schedule``: ``simultaneous`` (all blocks every step) or
    ``sequential`` (one block at a time, earlier ones frozen) with ``epochs_per_block``
    (``null``: the epochs split evenly).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "noise_type": tuple(NOISE_DIMS),
        "schedule": SCHEDULES,
    }

    name: str = "blockwise_barlow_twins"
    loss_scale: float = 0.024
    blocks: list[list[int]] | None = None
    block_weights: list[float] | None = None
    head_dim: int = 2048
    head_kernel: int = 1
    noise_std: float = 0.25
    noise_type: str = "all"
    schedule: str = "simultaneous"
    epochs_per_block: int | None = None


@METHODS.register("blockwise_barlow_twins")
class BlockwiseBarlowTwins(BarlowTwins):
    """Barlow Twins trained block by block with gradient isolation between blocks."""

    config_class = BlockwiseConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        self.block_stages = block_layout(m.blocks, len(self.backbone.stages))
        n = len(self.block_stages)
        self.block_weights = list(m.block_weights) if m.block_weights is not None else [1.0] * n
        if len(self.block_weights) != n:
            raise ValueError(f"method.block_weights needs {n} values, got {self.block_weights}")
        dims = self.backbone.stage_dims
        self.heads = nn.ModuleList(
            pool_head(dims[stages[-1]], m.head_dim, m.head_kernel) for stages in self.block_stages
        )
        self.frozen_before = 0  # blocks below this index are frozen (sequential schedule)

    def build_projector(self, proj_cfg: MLPConfig | None) -> nn.ModuleList:
        """One projector per block: deep copies of one template, so their init is identical."""
        if not isinstance(self.backbone, StagedBackbone):
            raise ValueError("blockwise training needs a backbone with stages (not timm:...)")
        if proj_cfg is None:
            raise ValueError("blockwise_barlow_twins needs model.projector (got null)")
        n = len(block_layout(self.cfg.method.blocks, len(self.backbone.stages)))
        template = build_mlp(self.cfg.method.head_dim, proj_cfg)
        return nn.ModuleList(copy.deepcopy(template) for _ in range(n))

    @property
    def num_blocks(self) -> int:
        return len(self.block_stages)

    # ----------------------------------------------------------------- networks
    def block_outputs(self, x: Tensor, last: int) -> list[Tensor]:
        """Feature maps of blocks ``0..last``; each block gets its predecessor's output detached.

        In training mode the noise is added to each block's output before the detach (the
        next block and the block's own head both see the noisy tensor).
        """
        m = self.cfg.method
        outs: list[Tensor] = []
        for b in range(last + 1):
            if b:
                x = x.detach()
            for s in self.block_stages[b]:
                x = self.backbone.stages[s](x)
            if self.training and m.noise_std > 0:
                x = inject_noise(x, m.noise_std, m.noise_type)
            outs.append(x)
        return outs

    def block_features(self, x: Tensor, block: int) -> Tensor:
        """Pooled head output of ``block`` (0-based; negative counts from the end)."""
        block = range(self.num_blocks)[block]
        return self.heads[block](self.block_outputs(x, block)[-1])

    def forward(self, x: Tensor) -> Tensor:
        """The last block's pooled head output: what the paper's linear probe reads."""
        return self.block_features(x, -1)

    def block_modules(self, block: int) -> list[nn.Module]:
        """The backbone stages, head and projector of one block."""
        stages = [self.backbone.stages[s] for s in self.block_stages[block]]
        return stages + [self.heads[block], self.projector[block]]

    # ----------------------------------------------------------------- schedule
    def active_block(self) -> int:
        """The block trained in the current epoch by the sequential schedule."""
        m = self.cfg.method
        per = m.epochs_per_block or math.ceil(self.cfg.trainer.max_epochs / self.num_blocks)
        return min(self.current_epoch // per, self.num_blocks - 1)

    def trained_blocks(self) -> list[int]:
        """Blocks whose losses the current step optimises."""
        if self.cfg.method.schedule == "simultaneous":
            return list(range(self.num_blocks))
        return [self.active_block()]

    def freeze_blocks_before(self, block: int) -> None:
        """Blocks ``< block``: no gradients, BatchNorm in eval mode; the others trainable."""
        self.frozen_before = block
        for b in range(self.num_blocks):
            for module in self.block_modules(b):
                module.requires_grad_(b >= block)
        self.train(self.training)

    def train(self, mode: bool = True) -> BlockwiseBarlowTwins:
        super().train(mode)
        for b in range(self.frozen_before if mode else 0):
            for module in self.block_modules(b):
                module.eval()
        return self

    def on_fit_start(self) -> None:
        """Under DDP the sequential schedule leaves parameters unused: DDP must expect that."""
        super().on_fit_start()
        wrapped = getattr(self._trainer.strategy, "model", None) if self._trainer else None
        if (
            self.cfg.method.schedule == "sequential"
            and isinstance(wrapped, DistributedDataParallel)
            and not wrapped.find_unused_parameters
        ):
            raise ConfigError(
                "method.schedule=sequential trains one block at a time, so DDP must allow unused "
                "parameters: set trainer.strategy=ddp_find_unused_parameters_true (or "
                "ddp_spawn_find_unused_parameters_true)"
            )

    def on_train_epoch_start(self) -> None:
        if self.cfg.method.schedule == "sequential":
            self.freeze_blocks_before(self.active_block())

    def on_train_start(self) -> None:
        super().on_train_start()
        self.on_train_epoch_start()  # a run resumed mid-epoch gets no epoch-start hook

    # ----------------------------------------------------------------- training
    def block_loss(self, f1: Tensor, f2: Tensor, block: int) -> Tensor:
        """Barlow Twins loss of one block from its two feature maps."""
        head, projector = self.heads[block], self.projector[block]
        return self.criterion(projector(head(f1)), projector(head(f2)))

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        blocks = self.trained_blocks()
        outs1 = self.block_outputs(views[0], blocks[-1])
        outs2 = self.block_outputs(views[1], blocks[-1])
        total = outs1[0].new_zeros(())
        extra = {}
        for b in blocks:
            loss = self.block_loss(outs1[b], outs2[b], b)
            total = total + self.block_weights[b] * loss
            extra[f"loss_block{b}"] = loss.detach()
        return total, extra
