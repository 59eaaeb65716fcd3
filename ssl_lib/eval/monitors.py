"""Evaluation during pretraining, as Lightning callbacks (the ``monitor:`` config section).

* :class:`KNNMonitor`: every N epochs, backbone features of a bounded labelled subset under the
  evaluation transform (BatchNorm in eval mode), kNN majority vote of ``knn_val_samples`` images
  against a bank of ``knn_train_samples`` images; logs ``monitor/knn_top1`` and ``_top5``
  (top-5 only with more than 5 classes; classes without votes are never credited).
* :class:`OnlineLinearMonitor`: a linear classifier trained on the *detached* backbone features
  of views[0] with its own optimiser; it never touches the method's parameters, gradients,
  optimiser or EMA target. Logs ``monitor/online_linear_acc`` (a row counts only when its
  label's logit is strictly the largest: tied maxima credit no class) and ``_loss``.

Both need labels; :func:`build_monitors` leaves them out, with a logged note, for data with a
single class (an unlabelled image folder).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ssl_lib.data import VIEWS, IndexedDataset, build_base_dataset
from ssl_lib.eval.features import extract_features
from ssl_lib.eval.knn import knn_evaluate
from ssl_lib.eval.linear import topn_hits

log = logging.getLogger(__name__)


def monitor_subsets(data_cfg: DictConfig, train_samples: int, val_samples: int, seed: int):
    """Seeded ``(bank, queries)`` subsets of labelled data for the kNN monitor.

    Datasets with their own evaluation split (synthetic, CIFAR) draw the queries from it; an
    image folder or file list draws bank and queries from disjoint parts of the training data.
    """
    g = torch.Generator().manual_seed(seed)
    train = build_base_dataset(data_cfg, train=True)
    order = torch.randperm(len(train), generator=g).tolist()
    if data_cfg.dataset in ("image_folder", "file_list"):
        train_samples = min(train_samples, len(train) // 2)
        val, val_order = train, order[train_samples:]
    else:
        val = build_base_dataset(data_cfg, train=False)
        val_order = torch.randperm(len(val), generator=g).tolist()
    return Subset(train, order[:train_samples]), Subset(val, val_order[:val_samples])


class KNNMonitor(pl.Callback):
    """kNN accuracy of the online backbone on a bounded labelled subset every N epochs.

    Logs ``monitor/knn_top1`` (also shown in the progress bar until the next measurement) and,
    with more than 5 classes, ``monitor/knn_top5`` (percent), as
    :func:`~ssl_lib.eval.knn.knn_evaluate` computes them for the majority vote.
    """

    def __init__(self, bank: Dataset, queries: Dataset, num_classes: int, cfg, image_size: int):
        self.sets = {"bank": bank, "queries": queries}
        self.num_classes = num_classes
        self.cfg = cfg
        self.transform = VIEWS.get("eval")(image_size)

    def _features(self, trainer: pl.Trainer, module: nn.Module, ds: Dataset) -> tuple:
        indexed = IndexedDataset(ds, self.transform)
        sampler = DistributedSampler(indexed, shuffle=False) if trainer.world_size > 1 else None
        # Its own generator: iterating a loader draws a seed, which must not shift training's.
        loader = DataLoader(
            indexed,
            batch_size=self.cfg.knn_batch_size,
            sampler=sampler,
            generator=torch.Generator(),
        )
        feats, labels, _ = extract_features(module, loader, device=module.device, progress=False)
        return feats, labels

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Epochs without a measurement must not repeat the last one in metrics.json.
        for n in ("top1", "top5"):
            trainer.callback_metrics.pop(f"monitor/knn_{n}", None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.cfg.knn_every_n_epochs
        if (trainer.current_epoch + 1) % every:
            return
        bank, bank_labels = self._features(trainer, pl_module, self.sets["bank"])
        queries, query_labels = self._features(trainer, pl_module, self.sets["queries"])
        results = knn_evaluate(
            bank,
            bank_labels,
            queries,
            query_labels,
            ks=[min(self.cfg.knn_k, len(bank))],
            votes=["majority"],
            num_classes=self.num_classes,
        )
        k = results["ks"][0]
        for n in ("top1", "top5"):
            value = results[f"majority/k={k}/{n}"]
            if value is not None:  # top-5 is undefined with 5 or fewer classes
                # Every process holds the same value (features are gathered); syncing it is
                # one small all-reduce that every process joins, and keeps Lightning's
                # epoch-level metrics uniform across processes.
                pl_module.log(f"monitor/knn_{n}", value, sync_dist=True, prog_bar=n == "top1")


class OnlineLinearMonitor(pl.Callback):
    """Stop-gradient linear classifier on the online backbone's features of views[0].

    The features are captured from the method's own forward pass (a forward hook that fires when
    the backbone's input is views[0] itself); a method that never feeds views[0] unchanged to
    its backbone gets one extra forward in eval mode under ``no_grad``. Under DDP the
    classifier's gradients are averaged over processes, so every copy stays identical.

    ``monitor/online_linear_acc`` (percent, epoch mean over the training batches, measured
    before each step) counts a sample only when its label's logit is finite and strictly the
    largest (:func:`~ssl_lib.eval.linear.topn_hits` with ``n=1``): equal maximum logits, e.g.
    constant ones, credit no class rather than the lowest class index.
    """

    def __init__(self, feat_dim: int, num_classes: int, lr: float) -> None:
        self.feat_dim, self.num_classes, self.lr = feat_dim, num_classes, lr
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._restored: dict | None = None
        self._captured: Tensor | None = None
        self._hook = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the training's random stream alone
            self.classifier = nn.Linear(self.feat_dim, self.num_classes).to(pl_module.device)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=self.lr, momentum=0.9)
        if self._restored is not None:
            self.classifier.load_state_dict(self._restored["classifier"])
            self.optimizer.load_state_dict(self._restored["optimizer"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first_view = batch[0][0]

        def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._captured is None and args and args[0] is first_view:
                self._captured = output.detach()

        self._captured = None
        self._hook = pl_module.backbone.register_forward_hook(capture)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._hook.remove()
        views, labels, _ = batch
        feats, self._captured = self._captured, None
        if feats is None:
            training = pl_module.backbone.training
            with torch.no_grad():
                feats = pl_module.backbone.eval()(views[0])
            pl_module.backbone.train(training)
        with torch.enable_grad():
            logits = self.classifier(feats.flatten(1).float())
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if dist.is_available() and dist.is_initialized():
            for p in self.classifier.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.optimizer.step()
        acc = 100.0 * topn_hits(logits.detach(), labels, 1).float().mean()
        batch_size = labels.shape[0]
        kwargs = {"on_step": False, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        pl_module.log("monitor/online_linear_acc", acc, **kwargs)
        pl_module.log("monitor/online_linear_loss", loss.detach(), **kwargs)

    def state_dict(self) -> dict:
        if self.classifier is None:
            return {}
        return {
            "classifier": self.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None


def build_monitors(cfg: DictConfig, train_set: Dataset, feat_dim: int) -> list[pl.Callback]:
    """The monitors ``cfg.monitor`` asks for; none (with a logged note) without labels."""
    m = cfg.monitor
    if not m.knn_every_n_epochs and not m.online_linear:
        return []
    num_classes = len(getattr(train_set, "classes", []))
    if num_classes < 2:
        log.warning("monitor: the training data has no labels (one class); monitors are off")
        return []
    monitors: list[pl.Callback] = []
    if m.knn_every_n_epochs:
        bank, queries = monitor_subsets(
            cfg.data, m.knn_train_samples, m.knn_val_samples, cfg.run.seed
        )
        monitors.append(KNNMonitor(bank, queries, num_classes, m, cfg.data.image_size))
    if m.online_linear:
        monitors.append(OnlineLinearMonitor(feat_dim, num_classes, m.online_linear_lr))
    return monitors
