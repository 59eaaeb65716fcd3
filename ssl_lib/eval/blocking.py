"""``ssl-lib defend block``: clean accuracy and attack success rate before and after test-time
patch blocking of a ViT classifier (backbone of a checkpoint + linear probe).

Inputs: the train folder (the probe's training set and the class list), the clean val folder
(evaluation transform: resize + centre crop) and the trigger-pasted val images (true labels,
already at ``data.image_size``, used as they are so the trigger keeps its size) with the
target class, taken from the manifest of ``ssl-lib poison make`` (``block.manifest``) or given
as a folder of class folders and a class name (``block.patched_root``, ``block.target_class``).
The probe is read from ``block.probe`` (the probe file of ``ssl-lib eval backdoor``,
:func:`ssl_lib.backdoor.evaluate.load_probe`) or trained on cached features
(:func:`ssl_lib.eval.linear.fit_linear_cached`) and saved beside the results in the same
format. Accuracy and attack success rate (ASR) come from the confusion matrices of both val
sets (:mod:`ssl_lib.backdoor.metrics`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ssl_lib import console
from ssl_lib.backdoor.evaluate import check_manifest, load_probe, patched_dataset, save_probe
from ssl_lib.backdoor.manifest import load_manifest
from ssl_lib.backdoor.metrics import accuracy, attack_success_rate, confusion_matrix
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import ConfigError
from ssl_lib.data import VIEWS, IndexedDataset, image_folder
from ssl_lib.data.datasets import DataError
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.eval.linear import LinearProbe, fit_linear_cached
from ssl_lib.eval.runner import Evaluation
from ssl_lib.files import run_folder_of, unused_path
from ssl_lib.interpret.blocking import (
    block_at_peaks,
    scaled_block_size,
    scaled_filter_size,
)
from ssl_lib.interpret.rollout import AttentionRecorder

__all__ = ["block_table", "run_block"]


def _check_vit(ev: Evaluation) -> None:
    try:
        AttentionRecorder(ev.method.backbone)
    except ValueError:
        raise ConfigError(
            f"checkpoint '{ev.checkpoint}': backbone '{ev.method.cfg.model.backbone}' is not a "
            "vision transformer; test-time blocking needs attention maps (e.g. vit_b_16, "
            "vit_s_16)"
        ) from None


def _patched_set(root: str, classes: list[str], size: int):
    """The trigger-pasted val images; every one must be ``size`` x ``size`` already."""
    patched = image_folder(root)
    if list(patched.classes) != list(classes):
        raise DataError(
            f"block.patched_root '{root}': its class folders differ from data.train_root's "
            f"({len(patched.classes)} vs {len(classes)} classes)"
        )
    for path, _ in patched.samples:
        with Image.open(path) as img:
            if img.size != (size, size):
                raise DataError(
                    f"patched image '{path}' is {img.size[0]}x{img.size[1]} px, expected "
                    f"{size}x{size} (data.image_size): patched images are used without resize "
                    "or crop, so that the trigger keeps its size"
                )
    return patched


def _target_label(name: str, classes: list[str]) -> int:
    if name not in classes:
        shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
        raise ConfigError(f"block.target_class '{name}' is not a class: {shown}")
    return classes.index(name)


def _patched_inputs(ev: Evaluation, cfg: DictConfig) -> tuple[Dataset, int, str | None]:
    """The patched val images (``(image, label, index)`` items, normalised, not resized), the
    target label and the manifest folder (``None`` with ``block.patched_root``)."""
    b, classes = cfg.block, list(ev.train_set.classes)
    named = None if b.target_class is None else _target_label(b.target_class, classes)
    if b.manifest is not None:
        manifest = load_manifest(b.manifest)
        check_manifest(cfg, manifest, classes)
        target = manifest.target if named is None else named
        if target is None:
            raise ConfigError(
                f"the poison manifest '{manifest.folder}' is untargeted: set block.target_class"
            )
        if manifest.target is not None and target != manifest.target:
            raise ConfigError(
                f"block.target_class '{b.target_class}' differs from the target "
                f"'{classes[manifest.target]}' of the poison manifest '{manifest.folder}': "
                "leave block.target_class unset"
            )
        return patched_dataset(manifest), target, str(manifest.folder)
    normalize = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    patched = _patched_set(b.patched_root, classes, cfg.data.image_size)
    return IndexedDataset(patched, normalize), named, None


def _probe(ev: Evaluation, cfg: DictConfig) -> tuple[LinearProbe, str, dict | None]:
    """The probe from ``block.probe``, or a cached-feature probe trained and saved now."""
    classes = list(ev.train_set.classes)
    dim = ev.method.backbone.feat_dim
    path = cfg.block.probe
    if path is not None:
        probe = load_probe(path, classes, "backbone", ev.checkpoint)
        if probe.fc.in_features != dim:
            raise CheckpointError(
                f"block.probe '{path}' reads {probe.fc.in_features}-d features, the backbone "
                f"of '{ev.checkpoint}' gives {dim}"
            )
        return probe, str(path), None
    result, probe = fit_linear_cached(
        ev.features(train=True),
        ev.features(train=False),
        len(classes),
        cfg.linear,
        ev.device,
        cfg.features.progress_bar,
    )
    out = unused_path(
        run_folder_of(ev.checkpoint) / "eval" / f"block_probe_{ev.checkpoint.stem}.pt"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_probe(out, probe, classes, cfg.features.source, ev.checkpoint)
    summary = {k: result[k] for k in ("top1", "lr")}
    return probe, str(out), summary


def _predict(
    classifier: nn.Module, vit: nn.Module, loader: DataLoader, cfg: DictConfig, device, label: str
) -> dict[str, Tensor]:
    b = cfg.block
    size = cfg.data.image_size
    block = b.block_size or scaled_block_size(size)
    window = b.filter_size or scaled_filter_size(size)
    before, after, labels = [], [], []
    for images, targets, _ in console.progress(
        loader, f"blocking {label}", cfg.features.progress_bar
    ):
        logits_before, logits_after, _ = block_at_peaks(
            classifier,
            vit,
            images.to(device),
            block,
            window,
            b.rollout,
            b.discard_ratio,
            b.column_quirk,
        )
        before.append(logits_before.argmax(1).cpu())
        after.append(logits_after.argmax(1).cpu())
        labels.append(targets)
    return {"before": torch.cat(before), "after": torch.cat(after), "labels": torch.cat(labels)}


def _scores(pred: dict[str, Tensor], target: int, num_classes: int) -> dict:
    out = {}
    for when in ("before", "after"):
        conf = confusion_matrix(pred["labels"].numpy(), pred[when].numpy(), num_classes)
        out[when] = {"top1": accuracy(conf), "asr": attack_success_rate(conf, target)}
    return out


def run_block(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """Test-time blocking of ``checkpoint``'s ViT + probe; returns the JSON record and path.

    Raises ``ConfigError`` (neither or both of ``block.manifest`` / ``block.patched_root``,
    ``block.patched_root`` without ``block.target_class``, a target outside the classes or
    other than the manifest's, ``features.source`` other than ``backbone``, a backbone that is
    not a ViT, an image size other than the ViT's, a block larger than the image),
    ``DataError`` (a manifest of other data, patched images of another size or classes) or
    ``CheckpointError`` (an unreadable probe or one of other classes or features), before any
    work.
    """
    b, size = cfg.block, cfg.data.image_size
    if (b.manifest is None) == (b.patched_root is None):
        raise ConfigError(
            "set one of block.manifest (the folder ssl-lib poison make wrote) and "
            "block.patched_root (see docs/defences.md)"
        )
    if b.patched_root is not None and b.target_class is None:
        raise ConfigError("block.patched_root needs block.target_class (see docs/defences.md)")
    if cfg.features.source != "backbone":
        raise ConfigError(
            f"features.source={cfg.features.source}: test-time blocking classifies the "
            "backbone's output; set features.source=backbone"
        )
    block = b.block_size or scaled_block_size(size)
    if block > size:
        raise ConfigError(
            f"block.block_size={block} px does not fit in a {size}x{size} image "
            f"(data.image_size): use 1 to {size}"
        )
    ev = Evaluation(checkpoint, cfg)
    classes = list(ev.train_set.classes)
    if b.target_class is not None:
        _target_label(b.target_class, classes)
    _check_vit(ev)
    patched, target, manifest = _patched_inputs(ev, cfg)
    probe, probe_path, probe_fit = _probe(ev, cfg)
    vit = ev.method.backbone
    classifier = nn.Sequential(vit, probe).to(ev.device).eval()

    def loader(dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)

    clean_set = IndexedDataset(ev.val_set, VIEWS.get("eval")(size))
    clean = _predict(classifier, vit, loader(clean_set), cfg, ev.device, "clean")
    trig = _predict(classifier, vit, loader(patched), cfg, ev.device, "patched")
    results = {
        "target_class": classes[target],
        "target_label": target,
        "manifest": manifest,
        "block_size": block,
        "filter_size": b.filter_size or scaled_filter_size(size),
        "rollout": b.rollout,
        "probe": probe_path,
        "probe_fit": probe_fit,
        "num_patched": len(patched),
        "clean": _scores(clean, target, len(classes)),
        "patched": _scores(trig, target, len(classes)),
    }
    return ev.report("block", results)


def block_table(results: dict) -> str:
    """Clean and patched accuracy and ASR (%) before and after blocking, as a text table."""

    def cell(value: float) -> str:  # NaN: no image to measure on (e.g. no non-target image)
        return f"{'n/a':>11}" if math.isnan(value) else f"{value:11.2f}"

    lines = [f"{'':16}  {'clean top1':>11}  {'clean ASR':>11}  {'patched top1':>12}  {'ASR':>11}"]
    for when in ("before", "after"):
        c, p = results["clean"][when], results["patched"][when]
        lines.append(
            f"{when + ' blocking':16}  {cell(c['top1'])}  {cell(c['asr'])}  "
            f"{cell(p['top1']):>12}  {cell(p['asr'])}"
        )
    return "\n".join(lines)
