"""Barlow Twins (Zbontar et al., 2021).

Both views go through the same backbone + projector; the loss drives the cross-correlation
matrix of the two standardised embeddings towards the identity. No target network, no
predictor.

Distributed semantics (as the official code): the embeddings are standardised with the
statistics of the **global** batch, the cross-correlation is the local product divided by the
global batch size and summed over processes. Backbone / projector BatchNorms become
``SyncBatchNorm`` under DDP (``sync_bn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_fn
import torchvision
from torch import Tensor, nn

from ssl_lib.distributed import world_size
from ssl_lib.methods.base import SSLMethod
from ssl_lib.methods.registry import METHODS
from ssl_lib.schema import ConfigError, MethodConfig

ReduceSum = Callable[[Tensor], Tensor]


def _local(t: Tensor) -> Tensor:
    return t


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over processes with gradients (the backward pass sums the gradients, too)."""
    return dist_fn.all_reduce(t)


def global_standardize(z: Tensor, n: Tensor, reduce_sum: ReduceSum, eps: float = 1e-5) -> Tensor:
    """Affine-free BatchNorm (training mode) over the global batch of ``n`` rows.

    Mean and biased variance are summed over processes by ``reduce_sum``, which also carries
    their gradients, so each process gets the exact gradient for its rows, as SyncBatchNorm.
    """
    mean = reduce_sum(z.sum(dim=0)) / n
    centred = z - mean
    var = reduce_sum(centred.pow(2).sum(dim=0)) / n
    return centred * torch.rsqrt(var + eps)


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float = 0.0051,
    scale: float = 1.0,
    reduce_sum: ReduceSum | None = None,
) -> Tensor:
    """``scale * (sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2)``, in float32.

    ``C = BN(z1)^T BN(z2) / B`` with ``BN`` the affine-free batch standardisation and ``B`` the
    global batch. ``reduce_sum`` sums a tensor over processes (``None``: one process). The
    local products are summed without gradient, as the official ``all_reduce`` of ``C``: every
    process gets the exact gradient of the loss with respect to its own rows.
    """
    reduce_sum = reduce_sum or _local
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        n = reduce_sum(z1.new_tensor(float(z1.shape[0])))
        c = global_standardize(z1, n, reduce_sum).T @ global_standardize(z2, n, reduce_sum) / n
        c = c + (reduce_sum(c.detach()) - c.detach())
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return scale * (on_diag + lambd * off_diag)


class BarlowTwinsLoss(nn.Module):
    """:func:`barlow_twins_loss` summed over all processes when distributed.

    lightly's ``BarlowTwinsLoss`` is not reused: it standardises each process's embeddings
    with that process's batch statistics (the official code uses global statistics), has no
    loss scale and computes ``C`` in the input precision (half under autocast).
    """

    def __init__(self, lambd: float = 0.0051, scale: float = 1.0) -> None:
        super().__init__()
        self.lambd = lambd
        self.scale = scale

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        reduce_sum = all_reduce_sum if world_size() > 1 else None
        return barlow_twins_loss(z1, z2, self.lambd, self.scale, reduce_sum)


def zero_init_residual(backbone: nn.Module) -> None:
    """Zero the last BN scale of every torchvision residual block (``zero_init_residual``)."""
    for m in backbone.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins.

    ``lambd``: weight of the off-diagonal (redundancy) term. ``loss_scale``: multiplies the loss
    (0.024 in the older official recipe, 1.0 in the current one). ``sync_bn``: convert every
    BatchNorm to SyncBatchNorm under DDP (the official code does). ``zero_init_residual``: zero
    the last BN scale of each ResNet block at init (torchvision's option, used by the official
    ResNet-50).
    """

    name: str = "barlow_twins"
    lambd: float = 0.0051
    loss_scale: float = 1.0
    sync_bn: bool = True
    zero_init_residual: bool = False


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    """Barlow Twins: redundancy reduction between the embeddings of two views."""

    config_class = BarlowTwinsConfig
    needs_predictor = False
    uses_target = False

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        self.criterion = BarlowTwinsLoss(m.lambd, m.loss_scale)
        if m.zero_init_residual:
            zero_init_residual(self.backbone)

    def setup(self, stage: str) -> None:
        """Under DDP, before the optimiser is built: BatchNorm -> SyncBatchNorm (``sync_bn``)."""
        if self.cfg.method.sync_bn and world_size() > 1:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)  # replaces the children in place

    def on_fit_start(self) -> None:
        """PyTorch's SyncBatchNorm runs on GPUs only: fail before the first step on CPUs."""
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
        if synced and world_size() > 1 and self.device.type == "cpu":
            raise ConfigError(
                "method.sync_bn=true needs GPU processes (PyTorch's SyncBatchNorm does not run "
                "on CPUs); set method.sync_bn=false for a multi-process CPU run (per-process "
                "BatchNorm statistics)"
            )

    def check_batch(self, per_process: int, world: int) -> None:
        """The loss standardises over the global batch: it needs two samples in all. With
        ``sync_bn`` over several processes, BatchNorm statistics are global too."""
        if per_process * world < 2:
            raise ConfigError(
                f"data.batch_size={self.cfg.data.batch_size}: Barlow Twins standardises the "
                "embeddings over the global batch, which needs at least 2 samples; set "
                f"data.batch_size to a multiple of {world} of at least 2"
            )
        if self.cfg.method.sync_bn and world > 1:
            return  # SyncBatchNorm: statistics over the global batch
        super().check_batch(per_process, world)

    def compute_loss(self, views: list[Tensor], labels: Tensor, index: Tensor):
        loss = self.criterion(self.project(views[0]), self.project(views[1]))
        return loss, {}
