"""Linear probes on a frozen backbone: the UMBC and MoCo protocols and a cached-feature mode.

* ``umbc``: ``L2-normalise -> (x - mu) / sqrt(var + 1e-5) -> Linear``, where ``mu`` and ``var``
  are per-dimension statistics of the L2-normalised train features under the evaluation
  transform (fixed, not learnt); training crops are recomputed by the frozen backbone (eval
  mode) every step.
* ``moco``: a plain ``Linear`` on the raw backbone features, same training loop.
* ``cached``: the UMBC head trained on cached centre-crop features; the learning rate is picked
  on a held-out part of the train set only, then the head is retrained on all of it.

Every protocol reports top-1 / top-5 (see :func:`evaluate` for ties and few classes) on the val
set after the last epoch and at the best epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lib import console

STANDARDIZE_EPS = 1e-5
_EVAL_BATCH = 4096


def standardization_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and (population) variance of the L2-normalised rows of ``feats``."""
    x = F.normalize(feats.float(), dim=1)
    return x.mean(dim=0), x.var(dim=0, correction=0)


class LinearProbe(nn.Module):
    """A linear classifier, optionally behind L2 normalisation and fixed standardisation."""

    def __init__(
        self, dim: int, num_classes: int, stats: tuple[Tensor, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.standardize = stats is not None
        if stats is not None:
            mean, var = stats
            self.register_buffer("mean", mean.float().clone())
            self.register_buffer("inv_std", torch.rsqrt(var.float() + STANDARDIZE_EPS))
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.standardize:
            x = (F.normalize(x, dim=1) - self.mean) * self.inv_std
        return self.fc(x)


def make_optimizer(
    probe: nn.Module, cfg, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """SGD with momentum and weight decay, x ``gamma`` at each epoch in ``milestones``."""
    optimizer = torch.optim.SGD(
        probe.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma
    )
    return optimizer, scheduler


def topn_hits(logits: Tensor, labels: Tensor, n: int) -> Tensor:
    """Which rows of ``logits`` (Q x C, float) rank their label among the top ``n`` for certain.

    A row is a hit when its logits are all finite and at most ``n`` classes, the label
    included, score at least as high as the label: the label is in the top ``n`` however ties
    are broken. A tie at the boundary therefore gives no credit, and constant (e.g. all-zero)
    logits are never a hit. ``labels``: integer, shape ``(Q,)``, in ``[0, C)`` (not checked
    here, so that a training step needs no device sync; :func:`evaluate` checks them). Returns
    a bool tensor of shape ``(Q,)`` on ``logits``' device. Raises ``ValueError`` for mismatched
    shapes or ``n`` outside ``[1, C - 1]`` (a top-``n`` of ``n`` or fewer classes holds every
    class).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be Q x C and labels (Q,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    if not 1 <= n < num_classes:
        raise ValueError(f"top-{n} needs more than {n} classes, the logits have {num_classes}")
    label_logit = logits.gather(1, labels.to(logits.device)[:, None].long())
    at_least = (logits >= label_logit).sum(dim=1)
    return torch.isfinite(logits).all(dim=1) & (at_least <= n)


@torch.no_grad()
def evaluate(probe: nn.Module, feats: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Top-1 and top-5 accuracy (%, float) of ``probe`` on precomputed features.

    ``feats``: Q x D floating-point features; ``labels``: integer, shape ``(Q,)``, in
    ``[0, num_classes)``; the probe's logits must have ``num_classes`` columns. A row counts
    only when its label is in the top 1 / top 5 whatever the tie-break (:func:`topn_hits`):
    equal maximum logits credit no class, not class 0, and rows with non-finite logits are
    misses. ``top5`` is ``None`` when there are 5 or fewer classes (it would hold every class).
    Raises ``ValueError`` for an empty set, fewer than 2 classes, mismatched shapes or labels
    out of range.
    """
    if len(feats) == 0:
        raise ValueError("no rows to evaluate: the feature set is empty")
    if num_classes < 2:
        raise ValueError(f"accuracy needs at least 2 classes, got num_classes={num_classes}")
    if labels.shape != (len(feats),) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integers of shape ({len(feats)},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    device = next(probe.parameters()).device
    logits = torch.cat(
        [probe(feats[i : i + _EVAL_BATCH].to(device)) for i in range(0, len(feats), _EVAL_BATCH)]
    )
    if logits.shape[1] != num_classes:
        raise ValueError(f"the probe gives {logits.shape[1]} logits for {num_classes} classes")
    target = labels.to(device)

    def accuracy(n: int) -> float:
        return 100.0 * topn_hits(logits, target, n).double().mean().item()

    return {"top1": accuracy(1), "top5": accuracy(5) if num_classes > 5 else None}


def _train_epochs(
    probe: nn.Module,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    cfg,
    lr: float,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: bool = False,
) -> None:
    """``cfg.epochs`` epochs of SGD on ``(features, labels)`` batches (one fresh pass each)."""
    optimizer, scheduler = make_optimizer(probe, cfg, lr)
    device = next(probe.parameters()).device
    for epoch in console.progress(range(cfg.epochs), f"linear lr={lr:g}", progress):
        probe.train()
        for feats, labels in batches():
            loss = F.cross_entropy(probe(feats.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)


def _tensor_batches(
    feats: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator
) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
    def batches():
        order = torch.randperm(len(feats), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield feats[idx], labels[idx]

    return batches


def train_and_track(
    probe: nn.Module,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg,
    lr: float,
    progress: bool = False,
) -> dict:
    """Train ``probe`` and evaluate it on ``val`` after every epoch.

    Returns the last epoch's and the best epoch's accuracies and the per-epoch history.
    """
    history: list[dict] = []

    def record(epoch: int) -> None:
        history.append({"epoch": epoch + 1, **evaluate(probe, *val, num_classes)})

    _train_epochs(probe, batches, cfg, lr, record, progress)
    best = max(history, key=lambda r: r["top1"])
    last = history[-1]
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "best_epoch": best["epoch"],
        "history": history,
    }


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint ``(fit, held_out)`` row indices; ``fraction`` of ``n`` held out."""
    if n < 2:
        raise ValueError(f"the train set has {n} sample(s): too few to hold some out")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(n - 1, max(1, round(fraction * n)))
    return order[held:], order[:held]


def _standardized_setup(feats: Tensor, labels: Tensor, num_classes: int, cfg, device):
    """A seeded fresh UMBC head (statistics of ``feats``) and seeded shuffled batches."""
    torch.manual_seed(cfg.seed)
    probe = LinearProbe(feats.shape[1], num_classes, standardization_stats(feats)).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    return probe, _tensor_batches(feats, labels, cfg.batch_size, generator)


def select_lr(feats: Tensor, labels: Tensor, num_classes: int, cfg, device) -> dict:
    """Pick ``cfg.lr_grid``'s best learning rate using the train features only.

    Each candidate trains a fresh head (statistics from the fit part) on the fit part and is
    scored by top-1 on the held-out ``cfg.val_fraction``; ties go to the first in the grid.
    """
    fit, held = holdout_split(len(feats), cfg.val_fraction, cfg.seed)
    scores = {}
    for lr in cfg.lr_grid:
        probe, batches = _standardized_setup(feats[fit], labels[fit], num_classes, cfg, device)
        _train_epochs(probe, batches, cfg, lr)
        scores[float(lr)] = evaluate(probe, feats[held], labels[held], num_classes)["top1"]
    best = max(scores, key=lambda lr: (scores[lr], -list(scores).index(lr)))
    return {"lr": best, "holdout_top1": scores, "num_fit": len(fit), "num_holdout": len(held)}


def linear_cached(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """The cached-feature probe: LR selection on held-out train rows, then a full retrain."""
    return fit_linear_cached(train, val, num_classes, cfg, device, progress)[0]


def fit_linear_cached(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict, LinearProbe]:
    """:func:`linear_cached`'s results and the trained probe (last epoch)."""
    feats, labels = train
    selection = select_lr(feats, labels, num_classes, cfg, device)
    probe, batches = _standardized_setup(feats, labels, num_classes, cfg, device)
    result = train_and_track(probe, batches, val, num_classes, cfg, selection["lr"], progress)
    return {**result, "lr": selection["lr"], "lr_selection": selection}, probe


def linear_augmented(
    model: nn.Module,
    loader: Iterable,
    train_feats: Tensor,
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """The UMBC (standardised head) or MoCo (plain head) probe on augmented training crops.

    ``model`` is the frozen feature extractor, kept in eval mode; ``loader`` yields
    ``(images, labels, index)`` with training augmentation; ``train_feats`` (centre-crop
    features of the train set) give the UMBC standardisation statistics.
    """
    args = (model, loader, train_feats, val, num_classes, cfg, device, progress)
    return fit_linear_augmented(*args)[0]


def fit_linear_augmented(
    model: nn.Module,
    loader: Iterable,
    train_feats: Tensor,
    val: tuple[Tensor, Tensor],
    num_classes: int,
    cfg,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict, LinearProbe]:
    """:func:`linear_augmented`'s results and the trained probe (last epoch)."""
    torch.manual_seed(cfg.seed)
    stats = standardization_stats(train_feats) if cfg.protocol == "umbc" else None
    probe = LinearProbe(train_feats.shape[1], num_classes, stats).to(device)
    model.eval().requires_grad_(False)

    def batches():
        for images, labels, _ in loader:
            with torch.no_grad():
                feats = model(images.to(device, non_blocking=True)).flatten(1)
            yield feats, labels

    return train_and_track(probe, batches, val, num_classes, cfg, cfg.lr, progress), probe
