"""Semi-supervised CMSF with pseudo-labels (CMSF-Pseudo; Navaneet et al., ECCV 2022).

A labelled subset of the training images (``data.labelled_subset`` or
``data.labelled_fraction``) keeps its labels. An MLP pseudo-labeller on the normalised target
projection ``u`` labels the rest: a query whose pseudo-label confidence reaches
``method.confidence`` (0.85) is constrained to bank rows with the same (pseudo-)label; a less
confident one is unconstrained and is stored with label -1, which no labelled query matches.
Labelled queries always use their true label. ``L = L_c`` with k = 10.

The pseudo-labeller is trained on a ring buffer of the labelled samples' target embeddings
(``sup_cache_size`` rows, all-gathered), twice per epoch (mid-epoch when the global batch is
below 1024, and after the epoch) for ``pseudo_epochs`` passes with a fresh SGD optimiser each
round; its weights persist across rounds. Between rounds it is frozen (eval mode) and outside
the main optimiser and DDP's gradient synchronisation; after a round rank 0's weights are
broadcast so every rank labels identically.

The step is CMSF's (``CMSFBase.compute_loss``); this variant adds the pseudo-label and
labelled-mask columns to the gathered batch, stores the pseudo-labels with the bank rows,
writes the labelled rows into the buffer and constrains on the pseudo-labels.

Differences from the original, by design: the buffer of labelled embeddings wraps around like
the memory bank instead of sliding its pointer back to write a batch contiguously (same
contents up to which old rows are replaced first). With ``unwritten_entries: use`` (the
default without a warm-up) the untrained labeller labels from the first step and the first
round also trains on the never-filled rows (random vectors, class 0), as the original does;
with ``ignore`` those rows are left out and no pseudo-label is used before the first round and
the end of the warm-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from ssl_lib.data.sampling import batch_bounds
from ssl_lib.distributed import is_dist
from ssl_lib.memory import MemoryBank, SameLabel, SearchResult
from ssl_lib.methods.cmsf import CMSFBase, CMSFConfig, set_num_samples
from ssl_lib.methods.registry import METHODS
from ssl_lib.models import MLPConfig, build_mlp
from ssl_lib.schema import ConfigError, require


@dataclass
class CMSFSemiConfig(CMSFConfig):
    """CMSF-Pseudo. ``num_samples`` / ``num_classes``: ``null`` = taken from the data."""

    name: str = "cmsf_semi"
    k: int = 10
    num_samples: int | None = None
    num_classes: int | None = None
    confidence: float = 0.85
    pseudo_hidden_dim: int = 1024
    pseudo_lr: float = 0.01
    pseudo_momentum: float = 0.9
    pseudo_weight_decay: float = 1e-4
    pseudo_epochs: int = 10
    pseudo_batch_size: int = 256
    sup_cache_size: int = 128000

    def check(self) -> None:
        super().check()
        require(
            0 < self.confidence <= 1, "confidence", f"must lie in (0, 1], got {self.confidence}"
        )


def train_classifier(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
) -> float:
    """Train ``head`` in place with cross-entropy and a fresh SGD; returns the last epoch's loss.

    ``features`` (N, D) float, ``labels`` (N,) int64; each epoch is a seeded permutation cut
    into batches of ``batch_size`` rows, a last row alone joining the batch before it (the
    head's BatchNorm cannot train on one row). Needs N >= 2.
    """
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(features.device)
        total, count = 0.0, 0
        for rows in batch_bounds(n, batch_size):  # no batch of one row: BatchNorm needs two
            batch = order[rows.start : rows.stop]
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * batch.numel()
            count += batch.numel()
        last = total / max(count, 1)
    head.eval()
    return last


@METHODS.register("cmsf_semi")
class CMSFSemiSupervised(CMSFBase):
    """CMSF-Pseudo: constraint by true labels (labelled) or confident pseudo-labels (others)."""

    config_class = CMSFSemiConfig
    bank_payloads = ("labels", "index", "pseudo")

    @classmethod
    def prepare_config(cls, cfg, datamodule) -> None:
        train_set = datamodule.build_train_set()
        set_num_samples(cfg, len(train_set))
        if datamodule.labelled_mask() is None:
            raise ConfigError(
                "method cmsf_semi needs the labelled images: set data.labelled_subset (a file "
                "of image paths) or data.labelled_fraction (e.g. 0.1)"
            )
        classes = len(train_set.classes)
        if cfg.method.num_classes is None:
            cfg.method.num_classes = classes
        elif cfg.method.num_classes < classes:
            raise ConfigError(
                f"method.num_classes={cfg.method.num_classes} but the training data has "
                f"{classes} classes"
            )

    def __init__(self, config) -> None:
        super().__init__(config)
        m = self.cfg.method
        for key in ("num_samples", "num_classes"):
            if getattr(m, key) is None or getattr(m, key) < 1:
                raise ValueError(
                    f"method.{key} must be set for cmsf_semi (null is filled in by "
                    f"`ssl-lib train` from the data), got {getattr(m, key)}"
                )
        for key in ("pseudo_batch_size", "sup_cache_size"):
            if getattr(m, key) < 2:
                raise ValueError(
                    f"method.{key}={getattr(m, key)}: the pseudo-labeller has BatchNorm, which "
                    "needs at least 2 labelled embeddings per batch in training; set it to 2 "
                    "or more"
                )
        self.pseudo_head = build_mlp(
            self.embed_dim, MLPConfig(hidden_dim=m.pseudo_hidden_dim, out_dim=m.num_classes)
        )
        self.pseudo_head.requires_grad_(False)  # trained in its own rounds, not by DDP
        self.sup_cache = MemoryBank(
            m.sup_cache_size, self.embed_dim, payloads=("labels",), seed=self.cfg.run.seed + 2
        )
        self.register_buffer("is_labelled", torch.zeros(m.num_samples, dtype=torch.bool))
        self.register_buffer("pseudo_rounds", torch.zeros((), dtype=torch.long))

    def trainable_modules(self) -> list[nn.Module]:
        return [m for m in super().trainable_modules() if m is not self.pseudo_head]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        mask = datamodule.labelled_mask() if datamodule is not None else None
        if mask is None:
            raise ValueError(
                "cmsf_semi trains with ssl_lib.data.SSLDataModule and data.labelled_subset or "
                "data.labelled_fraction"
            )
        if mask.shape != self.is_labelled.shape:
            raise ValueError(
                f"labelled mask covers {mask.numel()} images, method.num_samples is "
                f"{self.is_labelled.numel()}"
            )
        self.is_labelled.copy_(mask)

    # ----------------------------------------------------------------- step hooks
    @torch.no_grad()
    def pseudo_labels(self, u: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        """True label for labelled images, confident pseudo-label or -1 for the others."""
        labelled = self.is_labelled[index.to(self.is_labelled.device)].to(u.device)
        unknown = torch.full_like(labels, -1)
        trained = self.constraint_active() and int(self.pseudo_rounds) > 0
        if trained or not self.ignore_unwritten:  # the original labels from the first step
            self.pseudo_head.eval()
            conf, pred = F.softmax(self.pseudo_head(u), dim=1).max(dim=1)
            unknown = torch.where(conf >= self.cfg.method.confidence, pred, unknown)
        return torch.where(labelled, labels, unknown)

    def batch_columns(self, u: Tensor, labels: Tensor, index: Tensor) -> dict[str, Tensor]:
        labelled = self.is_labelled[index.to(self.is_labelled.device)].to(u.device)
        pseudo = self.pseudo_labels(u, labels, index)
        return {**super().batch_columns(u, labels, index), "pseudo": pseudo, "sup": labelled}

    def write_caches(self, g: dict[str, Tensor]) -> None:
        self.sup_cache.enqueue(g["u"][g["sup"]], gathered=True, labels=g["labels"][g["sup"]])

    def bank_row_payloads(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**super().bank_row_payloads(g), "pseudo": g["pseudo"]}

    def constrained(self, u: Tensor, labels: Tensor, index: Tensor) -> SearchResult:
        pseudo = self.pseudo_labels(u, labels.long(), index)
        return self.bank.search(u, self.cfg.method.k, SameLabel(pseudo, payload="pseudo"))

    def batch_metrics(self, columns: dict[str, Tensor]) -> dict[str, Tensor]:
        """``confident_unlabelled``: the share of unlabelled queries with a pseudo-label."""
        unlabelled = ~columns["sup"]
        confident = ((columns["pseudo"] >= 0) & unlabelled).sum() / unlabelled.sum().clamp(min=1)
        return {"confident_unlabelled": confident.float()}

    # ----------------------------------------------------------------- pseudo-labeller
    @torch.no_grad()
    def train_pseudo_labeller(self) -> None:
        """One round on the cached labelled embeddings (identical result on every rank)."""
        m = self.cfg.method
        feats = self.sup_cache.gather(torch.arange(self.sup_cache.size))
        labels = self.sup_cache.payload("labels")
        if self.ignore_unwritten:
            keep = labels >= 0
            feats, labels = feats[keep], labels[keep]
        else:
            labels = labels.clamp(min=0)  # unfilled rows train as class 0, as in the original
        if labels.numel() >= 2:
            head = copy.deepcopy(self.pseudo_head).requires_grad_(True)
            with torch.enable_grad():
                loss = train_classifier(
                    head,
                    feats,
                    labels,
                    m.pseudo_epochs,
                    m.pseudo_batch_size,
                    m.pseudo_lr,
                    m.pseudo_momentum,
                    m.pseudo_weight_decay,
                    seed=self.cfg.run.seed + int(self.pseudo_rounds),
                )
            self.pseudo_head.load_state_dict(head.state_dict())
            self.log("train/pseudo_labeller_loss", loss)
        else:
            rank_zero_warn(
                f"pseudo-labeller round skipped: the labelled buffer holds {labels.numel()} "
                "embedding(s) so far, and its BatchNorm needs 2; the pseudo-labels stay as they "
                "were"
            )
        if is_dist():
            for t in self.pseudo_head.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        self.pseudo_rounds += 1

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None):
        """The step, then the mid-epoch pseudo-labeller round (global batch below 1024).

        The round runs here, not at the end of the batch, so that a checkpoint written at the
        end of that batch already includes it and resuming from it is exact.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        n = self._trainer.num_training_batches if self._trainer is not None else None
        mid_epoch = self.cfg.data.batch_size < 1024 and isinstance(n, int) and n >= 2
        if mid_epoch and batch_idx == n // 2 - 1:
            self.train_pseudo_labeller()

    def on_train_epoch_end(self) -> None:
        self.train_pseudo_labeller()
