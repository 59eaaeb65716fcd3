"""``ssl-lib eval knn|linear|cluster``: checkpoint -> features -> results JSON.

Features are extracted once per checkpoint, dataset, transform and feature source and kept in
a :class:`~ssl_lib.eval.features.FeatureCache` (default ``<run folder>/eval/features``), so a
second evaluation of the same checkpoint reads them from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import ConfigError, DataConfig
from ssl_lib.data import VIEWS, IndexedDataset, build_base_dataset, file_list, image_folder
from ssl_lib.data.datasets import CIFAR, DataError, cifar, subsample
from ssl_lib.eval import features as feature_io
from ssl_lib.eval.cluster import cluster_alignment, plot_confusion
from ssl_lib.eval.features import FeatureCache
from ssl_lib.eval.knn import knn_evaluate
from ssl_lib.eval.linear import linear_augmented, linear_cached
from ssl_lib.files import atomic_write_text, run_folder_of, unused_path
from ssl_lib.memory.search import faiss_available
from ssl_lib.methods import SSLMethod, load_method
from ssl_lib.models.backbones import VIT_PATCH_SIZES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def load_checkpoint_model(checkpoint: Path) -> SSLMethod:
    """Any method from an ``ssl-lib train`` checkpoint, or a ``CheckpointError``."""
    try:
        return load_method(str(checkpoint))
    except KeyError as err:  # a method this installation does not register
        raise CheckpointError(f"checkpoint '{checkpoint}': {err.args[0]}") from None
    except RuntimeError as err:  # weights that do not fit the model of the stored config
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"checkpoint '{checkpoint}' does not match its config: {first}"
        ) from None


class FeatureSource(nn.Module):
    """Images -> the features named by ``features.source`` of a method."""

    def __init__(self, method: SSLMethod, source: str) -> None:
        super().__init__()
        self.method = method
        self.source = source
        self.block = int(source.split(":")[1]) if source.startswith("block:") else None
        if self.block is not None and not hasattr(method, "block_features"):
            raise ConfigError(
                f"features.source={source}: method '{method.cfg.method.name}' has no "
                "block_features; use backbone or projector"
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.block is not None:
            return self.method.block_features(x, self.block)
        if self.source == "projector":
            return self.method.project(x)
        return self.method(x)


def _split(cfg: DictConfig, train: bool) -> Dataset:
    d = cfg.data
    key = "train_root" if train else "val_root"
    if d.dataset == "image_folder":
        root = d[key]
        if root is None:
            raise ConfigError(f"data.{key} is not set (the {'train' if train else 'val'} folder)")
        if not Path(root).is_dir():
            raise DataError(f"data.{key}: folder '{root}' does not exist")
        if train and d.labelled_subset:
            return file_list(root, d.labelled_subset, max_image_pixels=d.max_image_pixels)
        return image_folder(root, max_image_pixels=d.max_image_pixels)
    if d.labelled_subset:
        raise ConfigError("data.labelled_subset needs data.dataset=image_folder")
    if d.dataset in CIFAR:  # both splits from the one copy in train_root
        return cifar(d.dataset, d.train_root, train, d.download, root_key="data.train_root")
    data_cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"dataset": d.dataset, "image_size": d.image_size, "synthetic": d.synthetic},
    )
    return build_base_dataset(data_cfg, train=train)


def eval_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """Train and val datasets of ``(PIL image, label)``, checked to share their classes."""
    train, val = _split(cfg, True), _split(cfg, False)
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = "same names, different order"
        if only_train or only_val:
            detail = (
                f"only in train: {', '.join(only_train) or '-'}; "
                f"only in val: {', '.join(only_val) or '-'}"
            )
        raise DataError(f"class folders differ between train and val ({detail})")
    if len(train.classes) < 2:
        raise DataError(
            f"data.train_root: {len(train.classes)} class found ({', '.join(train.classes)}); "
            "kNN and linear accuracies need at least 2 classes (one sub-folder per class)"
        )
    d = cfg.data
    return subsample(train, d.max_train_samples, d.seed), subsample(val, d.max_val_samples, d.seed)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _loader(ds: Dataset, transform, cfg: DictConfig, shuffle: bool = False) -> DataLoader:
    return DataLoader(
        IndexedDataset(ds, transform),
        batch_size=cfg.data.batch_size,
        shuffle=shuffle,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


class Evaluation:
    """One evaluation of one checkpoint: model, datasets, cached features and the output."""

    def __init__(self, checkpoint: str | Path, cfg: DictConfig) -> None:
        self.checkpoint = Path(checkpoint)
        self.cfg = cfg
        self.method = load_checkpoint_model(self.checkpoint)
        trained = self.method.cfg.data.image_size
        if self.method.cfg.model.backbone in VIT_PATCH_SIZES and trained != cfg.data.image_size:
            raise ConfigError(  # its position embeddings cover one patch grid
                f"data.image_size={cfg.data.image_size} differs from the {trained} px the ViT "
                f"of '{self.checkpoint}' was built for: set data.image_size={trained}"
            )
        self.model = FeatureSource(self.method, cfg.features.source)
        self.train_set, self.val_set = eval_datasets(cfg)
        self.num_classes = len(self.train_set.classes)
        self.device = resolve_device(cfg.features.device)
        cache_dir = cfg.features.cache_dir or run_folder_of(self.checkpoint) / "eval" / "features"
        self.cache = FeatureCache(cache_dir)

    def _dataset_id(self, train: bool) -> str:
        d = self.cfg.data
        root = d.train_root if train or d.dataset != "image_folder" else d.val_root
        description = {
            "dataset": d.dataset,
            "root": str(Path(root).resolve()) if root else None,
            "split": "train" if train else "val",
            "labelled_subset": d.labelled_subset if train else None,
            "max_samples": d.max_train_samples if train else d.max_val_samples,
            "seed": d.seed,
            "size": len(self.train_set if train else self.val_set),
            "synthetic": OmegaConf.to_container(d.synthetic) if d.dataset == "synthetic" else None,
        }
        return json.dumps(description, sort_keys=True)

    def features(self, train: bool) -> tuple[Tensor, Tensor]:
        """Centre-crop features and labels of the train or val set, from the cache if present."""
        f = self.cfg.features
        key = self.cache.key(
            self.checkpoint,
            self._dataset_id(train),
            f"eval:{self.cfg.data.image_size}",
            {"source": f.source, "dtype": f.dtype},
        )
        cached = self.cache.load(key)
        if cached is not None:
            return cached[0], cached[1]
        ds = self.train_set if train else self.val_set
        self.model.to(self.device)
        feats, labels, indices = feature_io.extract_features(
            self.model,
            _loader(ds, VIEWS.get("eval")(self.cfg.data.image_size), self.cfg),
            device=self.device,
            dtype=DTYPES[f.dtype],
            normalize=False,
            progress=f.progress_bar,
        )
        self.cache.save(key, feats, labels, indices)
        return feats, labels

    def report(self, command: str, results: dict, path: Path | None = None) -> tuple[dict, Path]:
        """The JSON record (results + exact settings) and the new file it was written to
        (``path``, else ``output`` or ``<run>/eval/<command>_<checkpoint stem>.json``)."""
        record = {
            "command": command,
            "checkpoint": str(self.checkpoint.resolve()),
            "method": self.method.cfg.method.name,
            "backbone": self.method.cfg.model.backbone,
            "num_train": len(self.train_set),
            "num_val": len(self.val_set),
            "classes": list(self.train_set.classes),
            "results": results,
            "settings": OmegaConf.to_container(self.cfg, resolve=True),
        }
        if path is None:
            name = f"{command}_{self.checkpoint.stem}.json"
            default = run_folder_of(self.checkpoint) / "eval" / name
            path = unused_path(Path(self.cfg.output) if self.cfg.output else default)
        atomic_write_text(path, json.dumps(record, indent=2))
        return record, path


def run_knn(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """kNN evaluation of ``checkpoint``; returns the JSON record and its path."""
    ev = Evaluation(checkpoint, cfg)
    k = cfg.knn
    if max(k.ks) > len(ev.train_set):
        raise ConfigError(
            f"knn.ks: k={max(k.ks)} is larger than the bank ({len(ev.train_set)} train images); "
            "lower knn.ks or use more train images"
        )
    train_feats, train_labels = ev.features(train=True)
    val_feats, val_labels = ev.features(train=False)
    results = knn_evaluate(
        train_feats,
        train_labels,
        val_feats,
        val_labels,
        ks=list(k.ks),
        temperatures=list(k.temperatures),
        votes=list(k.votes),
        num_classes=ev.num_classes,
        backend=k.backend,
        seed=k.seed,
    )
    return ev.report("knn", results)


def run_linear(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """Linear-probe evaluation of ``checkpoint``; returns the JSON record and its path."""
    ev = Evaluation(checkpoint, cfg)
    lin = cfg.linear
    progress = cfg.features.progress_bar
    train = ev.features(train=True)
    val = ev.features(train=False)
    if lin.protocol == "cached":
        results = linear_cached(train, val, ev.num_classes, lin, ev.device, progress)
    else:
        ev.model.to(ev.device)
        loader = _loader(ev.train_set, VIEWS.get("probe")(cfg.data.image_size), cfg, True)
        results = linear_augmented(
            ev.model, loader, train[0], val, ev.num_classes, lin, ev.device, progress
        )
    return ev.report("linear", {"protocol": lin.protocol, **results})


def run_cluster(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """Cluster alignment of ``checkpoint`` (:func:`ssl_lib.eval.cluster.cluster_alignment`).

    Writes the JSON record, and beside it (same name, ``.png``) the train and val confusion
    matrices with the clusters permuted to their matched classes; returns the record and the
    JSON path. Raises ``ConfigError`` before anything is written when ``cluster.num_clusters``
    exceeds the number of train images.
    """
    ev = Evaluation(checkpoint, cfg)
    c = cfg.cluster
    k = ev.num_classes if c.num_clusters is None else c.num_clusters
    if k > len(ev.train_set):
        raise ConfigError(
            f"cluster.num_clusters: {k} clusters need at least {k} train images, got "
            f"{len(ev.train_set)}; lower cluster.num_clusters or use more train images"
        )
    if c.backend == "faiss" and not faiss_available():
        raise ConfigError(
            "cluster.backend=faiss needs the faiss package; or set cluster.backend=torch"
        )
    train_feats, train_labels = ev.features(train=True)
    val_feats, val_labels = ev.features(train=False)
    results, counts = cluster_alignment(
        train_feats,
        train_labels,
        val_feats,
        val_labels,
        ev.num_classes,
        num_clusters=k,
        iters=c.iters,
        seed=c.seed,
        score=c.score,
        backend=c.backend,
    )
    classes = list(ev.train_set.classes)
    results["mapping_classes"] = [classes[y] if y >= 0 else None for y in results["mapping"]]
    record, path = ev.report("cluster", results)
    plot_confusion(counts, torch.tensor(results["mapping"]), classes, path.with_suffix(".png"))
    return record, path


def results_table(command: str, results: dict) -> str:
    """The accuracies of a results dict as an aligned text table (``n/a`` for ``None``)."""
    if command == "cluster":
        head = f"cluster alignment (K={results['num_clusters']}, {results['score']})"
        return f"{head}\n  train  {results['train_acc']:7.2f}\n  val    {results['val_acc']:7.2f}"
    if command == "knn":
        rows = {}
        for key, value in results.items():
            if key.endswith(("/top1", "/top5")):
                name, metric = key.rsplit("/", 1)
                rows.setdefault(name.replace("/", " "), {})[metric] = value
    else:
        rows = {
            f"{results['protocol']} last epoch": {"top1": results["top1"], "top5": results["top5"]},
            f"{results['protocol']} best epoch ({results['best_epoch']})": {
                "top1": results["best_top1"],
                "top5": results["best_top5"],
            },
        }

    def cell(value: float | None) -> str:
        return f"{'n/a':>7}" if value is None else f"{value:7.2f}"

    width = max(len(name) for name in rows)
    lines = [f"{'':{width}}  {'top1':>7}  {'top5':>7}"]
    lines += [f"{name:{width}}  {cell(r['top1'])}  {cell(r['top5'])}" for name, r in rows.items()]
    return "\n".join(lines)
