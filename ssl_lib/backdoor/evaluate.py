"""``ssl-lib eval backdoor``: a probe trained on clean labelled data, scored on clean and on
patched validation images (Saha et al., CVPR 2022, arXiv 2105.10123; metrics in
:mod:`ssl_lib.backdoor.metrics`).

The patched images of a manifest were saved after the evaluation geometry (Resize + CenterCrop
to ``data.image_size``), so they are only converted to tensors and normalised here: resizing or
cropping them again would shrink or cut the trigger.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from ssl_lib.backdoor.manifest import Manifest, check_data, load_manifest
from ssl_lib.backdoor.metrics import (
    backdoor_metrics,
    confusion_matrix,
    false_positives,
    true_positives,
)
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import ConfigError
from ssl_lib.data import VIEWS, IndexedDataset
from ssl_lib.data.datasets import DataError, ImageList
from ssl_lib.data.transforms import to_normalized_tensor
from ssl_lib.eval import features as feature_io
from ssl_lib.eval.knn import knn_classify, l2_normalize_rows
from ssl_lib.eval.linear import LinearProbe, fit_linear_augmented, fit_linear_cached
from ssl_lib.eval.runner import DTYPES, Evaluation, _loader
from ssl_lib.files import atomic_write, atomic_write_text, run_folder_of, unused_path
from ssl_lib.memory.search import knn_topk
from ssl_lib.report import _figure

PROBE_FILE = "linear_probe.pt"


def check_manifest(cfg: DictConfig, manifest: Manifest, classes: list[str]) -> None:
    """Check that ``manifest`` belongs to an evaluation recipe's data: the same classes as the
    train set, patched validation images that exist at ``data.image_size``, and (image
    folders) ``data.val_root`` the folder they were made from.

    Raises :class:`DataError` / :class:`ConfigError` (one line), before anything is written.
    """
    if classes != manifest.classes:
        raise DataError(
            f"the poison manifest '{manifest.folder}' does not match the evaluation data: its "
            f"classes ({len(manifest.classes)}) differ from those of data.train_root "
            f"({len(classes)})"
        )
    if not manifest.val:
        raise DataError(f"the poison manifest '{manifest.folder}' has no patched validation images")
    if cfg.data.dataset == "image_folder" and cfg.data.val_root:
        check_data(manifest, cfg.data.val_root, "val")
    if manifest.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}, but the patched images of "
            f"'{manifest.folder}' are {manifest.image_size} px (they are not resized again); "
            f"set data.image_size={manifest.image_size}"
        )
    missing = next((r.path for r in manifest.val if not Path(r.path).is_file()), None)
    if missing is not None:
        raise DataError(f"patched image '{missing}' of the poison manifest is missing")


def patched_dataset(manifest: Manifest) -> IndexedDataset:
    """The patched validation images of ``manifest`` as ``(tensor, label, index)`` items:
    converted to [0, 1] and ImageNet-normalised, never resized or cropped (the trigger keeps
    its recorded box)."""
    images = ImageList([(r.path, r.label) for r in manifest.val], manifest.classes)
    return IndexedDataset(images, to_normalized_tensor())


def _patched_features(ev: Evaluation, manifest: Manifest) -> tuple[Tensor, Tensor]:
    """Features of the patched validation images: tensor + normalisation, no resize or crop."""
    f = ev.cfg.features
    content = json.dumps(manifest.data, sort_keys=True).encode()  # a remade manifest differs
    dataset_id = json.dumps(
        {"poison_manifest": str(manifest.folder), "sha256": hashlib.sha256(content).hexdigest()},
        sort_keys=True,
    )
    key = ev.cache.key(
        ev.checkpoint, dataset_id, "patched:no-geometry", {"source": f.source, "dtype": f.dtype}
    )
    cached = ev.cache.load(key)
    if cached is not None:
        return cached[0], cached[1]
    ev.model.to(ev.device)
    feats, labels, indices = feature_io.extract_features(
        ev.model,
        DataLoader(
            patched_dataset(manifest),
            batch_size=ev.cfg.data.batch_size,
            num_workers=ev.cfg.data.num_workers,
        ),
        device=ev.device,
        dtype=DTYPES[f.dtype],
        normalize=False,
        progress=f.progress_bar,
    )
    ev.cache.save(key, feats, labels, indices)
    return feats, labels


@torch.no_grad()
def _argmax(probe: LinearProbe, feats: Tensor) -> np.ndarray:
    probe.eval()
    device = next(probe.parameters()).device
    return probe(feats.to(device)).argmax(dim=1).cpu().numpy()


def _linear_predictions(ev: Evaluation, train, val, patched, folder: Path) -> tuple[dict, dict]:
    lin, progress = ev.cfg.linear, ev.cfg.features.progress_bar
    if lin.protocol == "cached":
        results, probe = fit_linear_cached(train, val, ev.num_classes, lin, ev.device, progress)
    else:
        ev.model.to(ev.device)
        loader = _loader(ev.train_set, VIEWS.get("probe")(ev.cfg.data.image_size), ev.cfg, True)
        results, probe = fit_linear_augmented(
            ev.model, loader, train[0], val, ev.num_classes, lin, ev.device, progress
        )
    save_probe(
        folder / PROBE_FILE, probe, ev.train_set.classes, ev.cfg.features.source, ev.checkpoint
    )
    preds = {"linear": (_argmax(probe, val[0]), _argmax(probe, patched[0]))}
    return preds, {"protocol": lin.protocol, "lr": results.get("lr", lin.lr)}


def save_probe(
    path: Path,
    probe: LinearProbe,
    classes: Sequence[str],
    feature_source: str,
    checkpoint: Path,
) -> None:
    """Write ``probe`` in the probe file format :func:`load_probe` reads (``ssl-lib eval
    backdoor`` and ``ssl-lib defend block`` both use it): the weights and standardisation
    buffers, ``dim``, ``num_classes``, ``standardize``, the class names, the features it reads
    (``feature_source``) and the checkpoint whose features it was trained on."""
    state = {
        "state_dict": {k: v.cpu() for k, v in probe.state_dict().items()},
        "dim": probe.fc.in_features,
        "num_classes": probe.fc.out_features,
        "standardize": probe.standardize,
        "classes": list(classes),
        "feature_source": feature_source,
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_probe(
    path: str | Path,
    classes: Sequence[str] | None = None,
    feature_source: str | None = None,
    checkpoint: str | Path | None = None,
) -> LinearProbe:
    """The linear probe of a probe file (:func:`save_probe`), in eval mode.

    ``path``: the file, or a folder holding ``linear_probe.pt`` (an ``ssl-lib eval backdoor``
    output folder). Its input is ``feature_source`` features of its checkpoint, ``(N, dim)``.
    Raises :class:`CheckpointError` (one line) for a missing or unreadable file, one that is
    not a probe file, or, when ``classes`` / ``feature_source`` / ``checkpoint`` are given, a
    probe trained on other classes, other features or the features of another checkpoint.
    """
    file = Path(path)
    if file.is_dir():
        file = file / PROBE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        dim, num_classes = state["dim"], state["num_classes"]
        stats = (torch.zeros(dim), torch.ones(dim)) if state["standardize"] else None
        probe = LinearProbe(dim, num_classes, stats)
        probe.load_state_dict(state["state_dict"])
    except FileNotFoundError:
        raise CheckpointError(f"probe file '{file}' does not exist") from None
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"'{file}' is not a probe file written by ssl-lib eval backdoor or defend block "
            f"({first})"
        ) from None
    if classes is not None and state.get("classes") != list(classes):
        raise CheckpointError(
            f"probe file '{file}' was trained on other classes than the evaluation data's "
            f"({len(state.get('classes') or [])} vs {len(classes)})"
        )
    if feature_source is not None and state.get("feature_source") != feature_source:
        raise CheckpointError(
            f"probe file '{file}' reads features.source={state.get('feature_source')}, this "
            f"needs {feature_source}"
        )
    if checkpoint is not None and state.get("checkpoint") != str(Path(checkpoint).resolve()):
        raise CheckpointError(
            f"probe file '{file}' was trained on the features of '{state.get('checkpoint')}', "
            f"not of '{checkpoint}': give that checkpoint, or train a new probe"
        )
    return probe.eval()


def _knn_predictions(ev: Evaluation, train, val, patched) -> dict:
    ks = sorted(set(int(k) for k in ev.cfg.knn.ks))
    if max(ks) > len(train[0]):
        raise ConfigError(
            f"knn.ks: k={max(ks)} is larger than the bank ({len(train[0])} train images)"
        )
    bank = l2_normalize_rows(train[0].float())
    preds: dict[str, list] = {}
    for feats in (val[0], patched[0]):
        sims, idx = knn_topk(
            bank, l2_normalize_rows(feats.float()), max(ks), backend=ev.cfg.knn.backend
        )
        ranked = knn_classify(
            sims, idx, train[1], ev.num_classes, ks, vote="majority", seed=ev.cfg.knn.seed, topn=1
        )
        for k in ks:
            preds.setdefault(f"knn_k{k}", []).append(ranked[k][:, 0].cpu().numpy())
    return {name: tuple(pair) for name, pair in preds.items()}


def _plot_confusion(conf: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    n = len(classes)
    side = min(2 + 0.35 * n, 24)
    fig = _figure(side, side)
    ax = fig.subplots()
    ax.imshow(conf, cmap="viridis")
    ax.set(title=title, xlabel="predicted", ylabel="true")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _example_grid(manifest: Manifest, pred: np.ndarray, count: int, path: Path) -> None:
    """Evenly spaced patched validation images with their true and predicted classes."""
    from matplotlib.patches import Rectangle  # see ssl_lib.report._figure: a slow import

    records = manifest.val
    picks = np.linspace(0, len(records) - 1, min(count, len(records))).round().astype(int)
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    fig = _figure(2 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks, strict=False):
        r = records[i]
        with Image.open(r.path) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        x, y, w, h = r.box
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="red", lw=1))
        ax.set_title(f"{manifest.classes[r.label]}\n-> {manifest.classes[pred[i]]}", fontsize=7)
    _save_figure(fig, path)


def _write_probe_outputs(name, conf_clean, conf_patched, classes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, conf in (("clean", conf_clean), ("patched", conf_patched)):
        atomic_write(folder / f"conf_matrix_{split}.npy", lambda f, c=conf: np.save(f, c))
        _plot_confusion(
            conf, classes, f"{name}: {split} validation", folder / f"conf_matrix_{split}.png"
        )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "id", "tp_clean", "fp_clean", "tp_patched", "fp_patched"])
    tp_c, fp_c = true_positives(conf_clean), false_positives(conf_clean)
    tp_p, fp_p = true_positives(conf_patched), false_positives(conf_patched)
    for c, cls in enumerate(classes):
        writer.writerow([cls, c, tp_c[c], fp_c[c], tp_p[c], fp_p[c]])
    atomic_write_text(folder / "per_class.csv", buf.getvalue())


def run_backdoor(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """Evaluate ``checkpoint``'s backdoor; returns the JSON record and the output folder.

    The folder (``output``, default ``<run>/eval/backdoor_<checkpoint stem>``; a free name
    beside it if it exists) holds ``backdoor.json``, ``patched_examples.png``, the trained
    linear probe ``linear_probe.pt`` (linear probe only; :func:`load_probe`) and, per probe
    (``linear`` or ``knn_k<k>``), a sub-folder with ``per_class.csv`` and both confusion
    matrices (``conf_matrix_{clean,patched}.{npy,png}``). Raises :class:`ConfigError` /
    :class:`DataError` before anything is written when the manifest does not fit the data.
    """
    if cfg.backdoor.manifest is None:
        raise ConfigError("backdoor.manifest must name the output folder of ssl-lib poison make")
    manifest = load_manifest(cfg.backdoor.manifest)
    ev = Evaluation(checkpoint, cfg)
    check_manifest(cfg, manifest, list(ev.train_set.classes))
    if cfg.backdoor.probe == "knn" and max(cfg.knn.ks) > len(ev.train_set):
        raise ConfigError(
            f"knn.ks: k={max(cfg.knn.ks)} is larger than the bank ({len(ev.train_set)} train "
            "images)"
        )
    default = run_folder_of(ev.checkpoint) / "eval" / f"backdoor_{ev.checkpoint.stem}"
    folder = unused_path(Path(cfg.output) if cfg.output else default, keep_suffix=False)

    train, val = ev.features(train=True), ev.features(train=False)
    patched = _patched_features(ev, manifest)
    folder.mkdir(parents=True)
    if cfg.backdoor.probe == "linear":
        preds, probe_info = _linear_predictions(ev, train, val, patched, folder)
    else:
        preds, probe_info = _knn_predictions(ev, train, val, patched), {"vote": "majority"}

    results: dict = {"probe": cfg.backdoor.probe, **probe_info, "target": manifest.target}
    for name, (pred_clean, pred_patched) in preds.items():
        conf_clean = confusion_matrix(val[1].numpy(), pred_clean, ev.num_classes)
        conf_patched = confusion_matrix(patched[1].numpy(), pred_patched, ev.num_classes)
        target = manifest.target
        if target is None:  # untargeted: the class the trigger pulls most images to
            target = int(false_positives(conf_patched).argmax())
        results[name] = {"target": target, **backdoor_metrics(conf_clean, conf_patched, target)}
        _write_probe_outputs(name, conf_clean, conf_patched, manifest.classes, folder / name)
    first = next(iter(preds.values()))[1]
    _example_grid(manifest, first, cfg.backdoor.grid_examples, folder / "patched_examples.png")
    results["num_patched"] = len(patched[1])
    results["manifest"] = str(manifest.folder)
    record, _ = ev.report("backdoor", results, folder / "backdoor.json")
    return record, folder


def backdoor_table(results: dict) -> str:
    """The headline figures of each probe as an aligned text table."""
    cols = [
        ("clean acc", "clean_acc", "{:9.2f}"),
        ("patched acc", "patched_acc", "{:11.2f}"),
        ("FP clean", "fp_target_clean", "{:8d}"),
        ("FP patched", "fp_target_patched", "{:10d}"),
        ("ASR %", "asr", "{:7.2f}"),
        ("NFP patched", "nfp_patched", "{:11.3f}"),
    ]
    names = [k for k, v in results.items() if isinstance(v, dict) and "asr" in v]
    width = max(len(n) for n in names + ["probe"])
    lines = [f"{'probe':{width}}  " + "  ".join(h for h, _, _ in cols)]
    for name in names:
        r = results[name]
        lines.append(f"{name:{width}}  " + "  ".join(fmt.format(r[key]) for _, key, fmt in cols))
    return "\n".join(lines)
