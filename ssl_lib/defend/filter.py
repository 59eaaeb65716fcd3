"""PatchSearch's poison classifier (Tejankar et al., CVPR 2023, arXiv 2304.01482, Sec. 3.3):
an ensemble of small CNNs trained to tell images with a found patch pasted from clean ones,
which then removes the training images it calls poisoned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchmetrics.functional.classification import binary_f1_score
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.transforms import v2

from ssl_lib import console
from ssl_lib.config import ConfigError
from ssl_lib.data.datasets import DataError
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.defend.patchsearch import (
    RECORD,
    SearchData,
    image_loader,
    load_images,
    open_data,
    poison_truth,
    ranking,
    scaled,
)
from ssl_lib.eval.runner import resolve_device
from ssl_lib.files import atomic_write_text, unused_path


def poison_classifier() -> nn.Module:
    """torchvision ResNet with one BasicBlock per stage ("ResNet-10"), 2 classes, from scratch."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2)


class PatchedImages(Dataset):
    """Training samples of the poison classifier (PatchSearch Sec. 3.3, code).

    Each sample is a random resized crop (``crop_scale``) of a training image; with
    probability 1/2 one of ``patches`` (uint8 ``(K, w, w, 3)``), resized to a random square
    side in ``[side_lo, side_hi)``, is pasted at a random place at least ``border`` pixels from
    the edges (label 1), else the crop stays clean (label 0); then colour jitter, grayscale,
    flip and normalisation. Yields ``(float (3, S, S), int64 label)``.
    """

    def __init__(
        self,
        data: SearchData,
        indices: list[int],
        patches: np.ndarray,
        side: tuple[int, int],
        border: int,
        crop_scale: tuple[float, float],
    ) -> None:
        self.data, self.indices = data, indices
        self.patches = [Image.fromarray(p) for p in patches]
        self.side, self.border = side, border
        size = data.image_size
        self.crop = v2.RandomResizedCrop(size, scale=tuple(crop_scale))
        self.finish = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, _ = self.data.dataset[self.indices[i]]
        img = self.crop(img)
        label = int(torch.rand(()) < 0.5)
        if label:
            patch = self.patches[int(torch.randint(len(self.patches), ()))]
            side = int(torch.randint(self.side[0], self.side[1], ()))
            hi = max(self.border, img.width - self.border - side)
            x, y = (int(torch.randint(self.border, hi + 1, ())) for _ in range(2))
            img = img.copy()
            img.paste(patch.resize((side, side), Image.BILINEAR), (x, y))
        return self.finish(img), label


@torch.inference_mode()
def logits_of(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Eval-mode logits ``(N, 2)`` of ``images``, ``batch_size`` at a time."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(images[a : a + batch_size].to(device)).cpu()
            for a in range(0, len(images), batch_size)
        ]
    )


def train_classifier(
    dataset: PatchedImages,
    val_images: Tensor,
    val_labels: Tensor,
    f: DictConfig,
    seed: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> tuple[nn.Module, dict]:
    """One poison classifier: SGD with cosine decay, early stopping on validation F1.

    F1 of the validation images every ``eval_every`` iterations; training stops once
    ``round(100 F1)`` has been the same for the last ``patience`` evaluations or after
    ``iterations``. Returns the model and ``{"iterations", "f1"}`` (the last F1).
    """
    torch.manual_seed(seed)
    model = poison_classifier().to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, f.iterations)
    sampler = RandomSampler(dataset, replacement=True, num_samples=f.iterations * f.batch_size)
    loader = DataLoader(dataset, f.batch_size, sampler=sampler, num_workers=num_workers)
    history: list[int] = []
    f1, step = 0.0, 0
    for step, (x, y) in enumerate(console.progress(loader, "poison classifier", progress), 1):
        model.train()
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % f.eval_every:
            continue
        pred = logits_of(model, val_images, f.batch_size).argmax(1)
        f1 = binary_f1_score(pred, val_labels).item()
        history.append(round(100 * f1))
        if len(history) >= f.patience and len(set(history[-f.patience :])) == 1:
            break
    return model, {"iterations": step, "f1": f1}


def file_list_lines(data: SearchData, indices: list[int]) -> str:
    """``path label`` lines (ssl_lib's file-list format): paths under the data root relative
    to it, others absolute. Symbolic links are kept, not resolved: a folder of links to the
    images stays the root of its lines."""
    root = Path(data.root).absolute()
    lines = []
    for i in indices:
        path, label = data.dataset.samples[i]
        p = Path(path).absolute()
        lines.append(f"{p.relative_to(root) if p.is_relative_to(root) else p} {label}")
    return "".join(f"{line}\n" for line in lines)


def run_filter(search_dir: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """``ssl-lib defend filter``: train the ensemble, write the filtered and removed lists.

    Reads the images, scores, top patches and manifest of a ``defend patchsearch`` folder
    (``manifest`` in the recipe replaces the search's). Writes into ``SEARCH_DIR/filter``
    (numbered if it exists): ``filtered.txt`` and ``removed.txt`` (``path label`` lines, the
    ``data.file_list`` format, relative to the data root) and ``filter.json`` (counts, each
    classifier's iterations and F1, and with a manifest the precision and recall of the
    removal). Raises ``DataError`` / ``ConfigError`` before writing anything.
    """
    search_dir = Path(search_dir)
    if not (search_dir / RECORD).is_file():
        raise DataError(f"'{search_dir}' is not a folder written by ssl-lib defend patchsearch")
    record = json.loads((search_dir / RECORD).read_text())
    d = record["data"]
    data = open_data(d["dataset"], d["root"], d["file_list"], d["image_size"], cfg.data)
    scores = torch.from_numpy(np.load(search_dir / "scores.npy"))
    if len(scores) != len(data.dataset):
        raise DataError(
            f"{search_dir}/scores.npy has {len(scores)} scores but the data now holds "
            f"{len(data.dataset)} images; run ssl-lib defend patchsearch again"
        )
    f = cfg.filter
    patches = np.load(search_dir / "top_patches.npy")[: f.topk_patches]
    order = ranking(scores).tolist()
    scored = [i for i in order if not math.isnan(scores[i])]
    if len(scored) < 2 * f.val_size or len(patches) == 0:
        raise ConfigError(
            f"filter.val_size={f.val_size} needs {2 * f.val_size} scored images, the search "
            f"scored {len(scored)}; lower filter.val_size"
        )
    manifest = cfg.manifest or record.get("manifest")
    poisoned = poison_truth(data, manifest) if manifest else None
    positives, negatives = scored[: f.val_size], scored[-f.val_size :]
    # The validation images stay out of training even when top_p excludes fewer than them.
    excluded = set(order[: int(f.top_p * len(order))]) | set(positives) | set(negatives)
    pool = [i for i in range(len(order)) if i not in excluded]
    if not pool:
        raise ConfigError(
            f"filter.top_p={f.top_p} and filter.val_size={f.val_size} leave no training image "
            "for the poison classifiers; lower them"
        )
    size = data.image_size
    lo = scaled(f.patch_side[0], size)
    side = (lo, max(scaled(f.patch_side[1], size), lo + 1))
    train_set = PatchedImages(data, pool, patches, side, scaled(f.border, size), f.crop_scale)
    val_images = load_images(data, positives + negatives, cfg)
    val_labels = torch.tensor([1] * len(positives) + [0] * len(negatives))
    device = resolve_device(cfg.patchsearch.device)
    progress = cfg.patchsearch.progress_bar
    models, runs = [], []
    for m in range(f.ensemble):
        model, run = train_classifier(
            train_set, val_images, val_labels, f, f.seed + m, cfg.data.num_workers, device, progress
        )
        models.append(model)
        runs.append(run)
    total = torch.zeros(len(data.dataset), 2)
    for images, _, idx in image_loader(data, None, cfg):
        total[idx] = sum(logits_of(model, images, f.batch_size) for model in models) / len(models)
    removed_mask = total.argmax(1) == 1
    removed = removed_mask.nonzero().flatten().tolist()
    kept = (~removed_mask).nonzero().flatten().tolist()
    metrics = None
    if poisoned is not None:
        found = int((removed_mask & poisoned).sum())
        metrics = {
            "num_poisoned": int(poisoned.sum()),
            "precision": found / len(removed) if removed else None,
            "recall": found / int(poisoned.sum()) if int(poisoned.sum()) else None,
        }
    folder = unused_path(search_dir / "filter", keep_suffix=False)
    folder.mkdir(parents=True)
    atomic_write_text(folder / "filtered.txt", file_list_lines(data, kept))
    atomic_write_text(folder / "removed.txt", file_list_lines(data, removed))
    out = {
        "command": "defend filter",
        "search": str(search_dir.resolve()),
        "data": data.describe(),
        "manifest": manifest,
        "num_images": len(data.dataset),
        "num_removed": len(removed),
        "classifiers": runs,
        "metrics": metrics,
        "settings": OmegaConf.to_container(f, resolve=True),
    }
    atomic_write_text(folder / "filter.json", json.dumps(out, indent=2))
    return out, folder
