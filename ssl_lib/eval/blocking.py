"""``ssl-lib defend block``: clean accuracy and attack success rate before and after test-time
patch blocking of a ViT classifier (backbone of a checkpoint + linear probe).

Inputs, all explicit in the recipe: the train folder (the probe's training set and the class
list), the clean val folder (evaluation transform: resize + centre crop), the trigger-pasted
val folder (same classes, true labels, images already at ``data.image_size``, used as they are
so the trigger keeps its size) and the target class. The probe is read from ``block.probe`` or
trained on cached features (:func:`ssl_lib.eval.linear.fit_linear_cached`) and saved beside the
results. Attack success rate (ASR) = non-target images predicted as the target / non-target
images (:func:`ssl_lib.interpret.blocking.attack_success_rate`), on both val sets.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ssl_lib import console
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import ConfigError
from ssl_lib.data import VIEWS, IndexedDataset, image_folder
from ssl_lib.data.datasets import DataError
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.eval.linear import LinearProbe, fit_linear_cached
from ssl_lib.eval.runner import Evaluation
from ssl_lib.files import run_folder_of, unused_path
from ssl_lib.interpret.blocking import (
    attack_success_rate,
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


def _probe(ev: Evaluation, cfg: DictConfig) -> tuple[LinearProbe, str, dict | None]:
    """The probe from ``block.probe``, or a cached-feature probe trained and saved now."""
    classes = list(ev.train_set.classes)
    dim = ev.method.backbone.feat_dim
    path = cfg.block.probe
    if path is not None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"block.probe '{path}' cannot be read: {err}") from None
        if saved.get("classes") != classes:
            raise CheckpointError(
                f"block.probe '{path}' was trained on other classes than data.train_root's"
            )
        probe = LinearProbe(dim, len(classes), (torch.zeros(dim), torch.ones(dim)))
        try:
            probe.load_state_dict(saved["state_dict"])
        except (KeyError, RuntimeError) as err:
            first = str(err).splitlines()[0]
            raise CheckpointError(
                f"block.probe '{path}' does not fit the backbone: {first}"
            ) from None
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
    torch.save({"state_dict": probe.state_dict(), "classes": classes}, out)
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


def _scores(pred: dict[str, Tensor], target: int) -> dict:
    out = {}
    for when in ("before", "after"):
        out[when] = {
            "top1": 100.0 * (pred[when] == pred["labels"]).double().mean().item(),
            "asr": attack_success_rate(pred[when], pred["labels"], target),
        }
    return out


def run_block(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """Test-time blocking of ``checkpoint``'s ViT + probe; returns the JSON record and path.

    Raises ``ConfigError`` (missing ``block.patched_root`` / ``block.target_class``, a target
    outside the classes, a backbone that is not a ViT, an image size other than the ViT's, a
    block larger than the image), ``DataError`` (patched images of another size or classes)
    or ``CheckpointError`` (an unreadable probe or one of other classes), before any work.
    """
    b, size = cfg.block, cfg.data.image_size
    for key in ("patched_root", "target_class"):
        if b[key] is None:
            raise ConfigError(f"block.{key} is not set (see docs/defences.md)")
    block = b.block_size or scaled_block_size(size)
    if block > size:
        raise ConfigError(
            f"block.block_size={block} px does not fit in a {size}x{size} image "
            f"(data.image_size): use 1 to {size}"
        )
    ev = Evaluation(checkpoint, cfg)
    classes = list(ev.train_set.classes)
    if b.target_class not in classes:
        shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
        raise ConfigError(f"block.target_class '{b.target_class}' is not a class: {shown}")
    target = classes.index(b.target_class)
    _check_vit(ev)
    patched = _patched_set(b.patched_root, classes, size)
    probe, probe_path, probe_fit = _probe(ev, cfg)
    vit = ev.method.backbone
    classifier = nn.Sequential(vit, probe).to(ev.device).eval()
    normalize = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def loader(dataset, transform) -> DataLoader:
        return DataLoader(
            IndexedDataset(dataset, transform),
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
        )

    clean = _predict(
        classifier, vit, loader(ev.val_set, VIEWS.get("eval")(size)), cfg, ev.device, "clean"
    )
    trig = _predict(classifier, vit, loader(patched, normalize), cfg, ev.device, "patched")
    results = {
        "target_class": b.target_class,
        "target_label": target,
        "block_size": block,
        "filter_size": b.filter_size or scaled_filter_size(size),
        "rollout": b.rollout,
        "probe": probe_path,
        "probe_fit": probe_fit,
        "num_patched": len(patched),
        "clean": _scores(clean, target),
        "patched": _scores(trig, target),
    }
    return ev.report("block", results)


def block_table(results: dict) -> str:
    """Clean and patched accuracy and ASR (%) before and after blocking, as a text table."""

    def cell(value: float | None) -> str:
        return f"{'n/a':>11}" if value is None else f"{value:11.2f}"

    lines = [f"{'':16}  {'clean top1':>11}  {'clean ASR':>11}  {'patched top1':>12}  {'ASR':>11}"]
    for when in ("before", "after"):
        c, p = results["clean"][when], results["patched"][when]
        lines.append(
            f"{when + ' blocking':16}  {cell(c['top1'])}  {cell(c['asr'])}  "
            f"{cell(p['top1']):>12}  {cell(p['asr'])}"
        )
    return "\n".join(lines)
