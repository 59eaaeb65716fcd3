"""PatchSearch (Tejankar et al., "Defending Against Patch-based Backdoor Attacks on
Self-Supervised Learning", CVPR 2023, arXiv 2304.01482, Sec. 3.2): poison scores of the
training images from the poisoned model itself.

Steps: L2-normalised centre-crop features; k-means (:func:`ssl_lib.memory.kmeans.kmeans`);
a cosine centroid pseudo-classifier (:class:`~ssl_lib.defend.gradcam.PseudoClassifier`);
for a candidate image, Grad-CAM of its top pseudo-class, the most salient window, and the
poison score: how many of the test images (those nearest to their centroids) move into the
candidate's cluster once the window is pasted on them, minus how many were there already;
an iterative search that scores a few random members of every remaining cluster per round and
drops the least poisonous clusters.

Differences from the authors' code, each on purpose: pasted images are scored many per forward
pass (:func:`poison_scores`), not one; their features are L2-normalised like those that were
clustered; every assignment (clusters searched, test images, Grad-CAM target, scoring) is the
pseudo-classifier's, i.e. the nearest normalised centroid; a round drops at least one cluster
(the code's ``list[:-rem]`` empties the list when ``rem`` rounds to 0); never-scored images
rank below every scored one (their score is NaN), instead of tying at 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.functional.classification import binary_auroc
from torchvision.utils import make_grid

from ssl_lib import console
from ssl_lib.backdoor.make import TRAIN_LIST
from ssl_lib.backdoor.manifest import MANIFEST_NAME, check_data, load_manifest
from ssl_lib.config import ConfigError
from ssl_lib.data import VIEWS, IndexedDataset, file_list, image_folder
from ssl_lib.data.datasets import DataError, ImageList
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.defend.gradcam import (
    PseudoClassifier,
    cam_layer,
    cluster_centroids,
    grad_cam,
    salient_window,
)
from ssl_lib.eval.features import extract_features
from ssl_lib.eval.runner import load_checkpoint_model, resolve_device
from ssl_lib.files import atomic_write, atomic_write_text, run_folder_of, unused_path
from ssl_lib.memory.kmeans import kmeans
from ssl_lib.memory.search import search

PRECISION_KS = (5, 10, 20, 50, 100)
RECORD = "patchsearch.json"
PNG_PATCH_PX = 60
REFERENCE_SIZE = 224  # window and patch sizes are given at 224 px (the paper's resolution)


# ----------------------------------------------------------------- building blocks
def scaled(pixels: int, image_size: int) -> int:
    """``pixels`` at 224 px scaled to ``image_size`` (rounded, at least 1)."""
    return max(1, round(pixels * image_size / REFERENCE_SIZE))


def prune_count(remaining: int, fraction: float) -> int:
    """Clusters dropped in a round: ``floor(remaining * fraction)``, but at least one."""
    return max(1, int(remaining * fraction))


def test_set(feats: Tensor, assign: Tensor, centroids: Tensor, n: int) -> Tensor:
    """The ``n`` images nearest to their own centroids, spread over the clusters.

    Images are ranked by (rank within their cluster, descending cosine similarity to their
    centroid), so the first ``K`` are the nearest image of each cluster (PatchSearch's test
    set for ``n = K``). ``feats``: normalised ``(N, D)``; returns int64 ``(n,)``.
    """
    sim = (feats.float() * centroids[assign]).sum(dim=1)
    order = torch.argsort(-sim, stable=True)
    seen: dict[int, int] = {}
    rank = torch.empty(len(order), dtype=torch.long)
    for i in order.tolist():
        c = int(assign[i])
        rank[i] = seen.get(c, 0)
        seen[c] = rank[i].item() + 1
    key = rank.double() * 4 - sim.double()  # cosine similarity lies in [-1, 1]
    return torch.argsort(key, stable=True)[:n]


def paste(images: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """A copy of ``images`` (B, C, S, S) with ``patches[b]`` (C, w, w) at ``corners[b]`` (y, x)."""
    out = images.clone()
    w = patches.shape[-1]
    for b, (y, x) in enumerate(corners.tolist()):
        out[b, :, y : y + w, x : x + w] = patches[b]
    return out


def cut(images: Tensor, corners: Tensor, window: int) -> Tensor:
    """The ``window x window`` squares of ``images`` (B, C, S, S) at ``corners`` (y, x)."""
    w = window
    squares = [
        img[:, y : y + w, x : x + w] for img, (y, x) in zip(images, corners.tolist(), strict=True)
    ]
    return torch.stack(squares) if squares else images.new_zeros(0, images.shape[1], w, w)


@torch.inference_mode()
def predict(classifier: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Arg-max pseudo-class (int64, ``(N,)``) of ``images``, ``batch_size`` per forward."""
    starts = range(0, len(images), batch_size)
    return torch.cat([classifier(images[a : a + batch_size]).argmax(1) for a in starts])


@torch.inference_mode()
def poison_scores(
    classifier: nn.Module,
    test_images: Tensor,
    clean_pred: Tensor,
    patches: Tensor,
    corners: Tensor,
    clusters: Tensor,
    batch_size: int,
) -> Tensor:
    """Poison score of each candidate patch (PatchSearch Sec. 3.2).

    Candidate ``i``'s ``patches[i]`` (C, w, w) is pasted on every test image ``j`` at
    ``corners[i, j]`` (y, x); the score is the number of pasted images whose pseudo-class is
    ``clusters[i]`` minus the number of clean test images (``clean_pred``, int64 ``(N,)``) already
    there. The ``M x N`` pasted images go through the classifier ``batch_size`` at a time
    (``batch_size=1`` is the authors' one forward per pasted image). ``test_images``:
    ``(N, C, S, S)`` on the classifier's device; ``corners``: int64 ``(M, N, 2)``;
    ``clusters``: int64 ``(M,)``. Returns int64 ``(M,)``.
    """
    m, n = corners.shape[:2]
    device = test_images.device
    patches, corners, clusters = patches.to(device), corners.to(device), clusters.to(device)
    hits = torch.zeros(m, dtype=torch.long, device=device)
    pairs = torch.arange(m * n, device=device)
    for start in range(0, m * n, batch_size):
        idx = pairs[start : start + batch_size]
        i, j = idx // n, idx % n
        batch = paste(test_images[j], patches[i], corners[i, j])
        moved = classifier(batch).argmax(1) == clusters[i]
        hits.index_add_(0, i, moved.long())
    before = (clean_pred.to(device)[None, :] == clusters[:, None]).sum(1)
    return (hits - before).cpu()


@dataclass
class SearchRound:
    """One round of :func:`iterative_search`: clusters searched and images scored in it."""

    clusters: int
    scored: int


def iterative_search(
    assign: Tensor,
    score: Callable[[Tensor], Tensor],
    samples_per_iteration: int,
    remove_fraction: float,
    generator: torch.Generator,
) -> tuple[Tensor, list[SearchRound]]:
    """PatchSearch's iterative search over the clusters of ``assign`` (int64 ``(N,)``).

    Each round, every remaining cluster gives ``samples_per_iteration`` random members not
    scored yet (fewer when it has fewer left), all are scored together by ``score`` (int64
    indices -> float scores), a cluster's score is the maximum over its scored members, and the
    :func:`prune_count` lowest-scoring clusters are dropped (ties: the higher cluster id goes
    first), until none remains. Returns ``(scores float64 (N,), NaN where never scored;
    the rounds)``.
    """
    scores = torch.full((len(assign),), float("nan"), dtype=torch.float64)
    queues = {}
    for c in torch.unique(assign).tolist():
        members = (assign == c).nonzero().flatten()
        queues[c] = members[torch.randperm(len(members), generator=generator)].tolist()
    best = {c: float("-inf") for c in queues}
    remaining = sorted(queues)
    rounds = []
    while remaining:
        picks = []
        for c in remaining:
            picks += queues[c][:samples_per_iteration]
            queues[c] = queues[c][samples_per_iteration:]
        if picks:
            idx = torch.tensor(picks, dtype=torch.long)
            scores[idx] = score(idx).double()
            for i, s in zip(picks, scores[idx].tolist(), strict=True):
                best[int(assign[i])] = max(best[int(assign[i])], s)
        rounds.append(SearchRound(len(remaining), len(picks)))
        ranked = sorted(remaining, key=lambda c: (-best[c], c))
        remaining = ranked[: len(ranked) - prune_count(len(ranked), remove_fraction)]
    return scores, rounds


def ranking(scores: Tensor) -> Tensor:
    """Image indices, highest score first; never-scored (NaN) images last; ties by index."""
    filled = torch.where(scores.isnan(), torch.full_like(scores, float("-inf")), scores)
    return torch.argsort(-filled, stable=True)


def detection_metrics(scores: Tensor, poisoned: Tensor, ks: Sequence[int] = PRECISION_KS) -> dict:
    """Precision@k and recall@k of the ranking, and the AUROC of the scores.

    ``scores``: float ``(N,)``, NaN = never scored (ranked below every scored image);
    ``poisoned``: bool ``(N,)``. ``k`` is capped at ``N``. Recall@k = poisons in the top k /
    all poisons. AUROC (``torchmetrics``) is ``None`` when one class is absent.
    """
    hits = poisoned[ranking(scores)].long().cumsum(0)
    total = int(poisoned.sum())
    out: dict = {"num_poisoned": total}
    for k in sorted({min(k, len(scores)) for k in ks}):
        out[f"precision@{k}"] = hits[k - 1].item() / k
        out[f"recall@{k}"] = hits[k - 1].item() / total if total else None
    finite = scores[~scores.isnan()]
    floor = (finite.min().item() - 1) if len(finite) else 0.0
    filled = torch.nan_to_num(scores, nan=floor)
    both = 0 < total < len(scores)
    out["auroc"] = binary_auroc(filled.float(), poisoned.long()).item() if both else None
    return out


def denormalize(images: Tensor) -> Tensor:
    """Normalised images ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)``."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (images.cpu().float() * std + mean).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


# ----------------------------------------------------------------- data
@dataclass
class SearchData:
    """The training images of a defence: dataset, where its files are, and the crop size."""

    dataset: ImageList
    kind: str
    root: str
    file_list: str | None
    image_size: int

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.dataset.samples]

    def describe(self) -> dict:
        return {
            "dataset": self.kind,
            "root": self.root,
            "file_list": self.file_list,
            "image_size": self.image_size,
        }


def open_data(kind: str, root: str, list_file: str | None, image_size: int, cfg) -> SearchData:
    """The image folder or file list (``DataError`` for a missing folder or list)."""
    if kind == "image_folder":
        ds = image_folder(root, max_image_pixels=cfg.max_image_pixels)
    else:
        if list_file is None:
            raise ConfigError("data.dataset=file_list needs data.file_list")
        ds = file_list(root, list_file, max_image_pixels=cfg.max_image_pixels)
    return SearchData(ds, kind, root, list_file, image_size)


def poison_truth(data: SearchData, manifest: str) -> Tensor:
    """Bool ``(N,)``: which images of ``data`` the poison manifest marks as poisoned.

    ``manifest``: the folder ``ssl-lib poison make`` wrote or its ``manifest.json``
    (:func:`ssl_lib.backdoor.manifest.load_manifest`). Images are matched to the manifest's
    training records by resolved path (poisoned ones at their copies). Raises ``DataError``
    (one line) when the manifest cannot be read, when ``data.root`` is not the data folder it
    was made from (:func:`~ssl_lib.backdoor.manifest.check_data`), or for the first image it
    has no record of.
    """
    m = load_manifest(manifest)
    if data.root is not None:
        check_data(m, data.root, "train")
    truth = {str(Path(r.path).resolve()): r.poisoned for r in m.train}
    originals = {
        str((Path(m.data["roots"]["train"]) / r.source).resolve()) for r in m.train if r.poisoned
    }
    labels = []
    for path in data.paths:
        key = str(Path(path).resolve())
        if key not in truth:
            file = m.folder / MANIFEST_NAME
            hint = (
                f"it is the clean original of a poisoned image; search the poisoned training "
                f"list instead (data.dataset=file_list data.file_list={m.folder / TRAIN_LIST})"
                if key in originals
                else "the manifest was made from other images"
            )
            raise DataError(
                f"the poison manifest '{file}' does not match the training data: it has no "
                f"record for image '{path}' ({hint})"
            )
        labels.append(truth[key])
    return torch.tensor(labels, dtype=torch.bool)


def resolve_data(cfg: DictConfig, trained: DictConfig, checkpoint: Path) -> SearchData:
    """The defence's images: the recipe's ``data``, or else the checkpoint's training data.

    Raises ``ConfigError`` when the recipe's image size differs from the checkpoint's, or when
    no image files can be found (neither the recipe nor the checkpoint names a folder or list).
    """
    d = cfg.data
    size = trained.image_size
    if d.image_size is not None and d.image_size != size:
        raise ConfigError(
            f"data.image_size={d.image_size}, but checkpoint '{checkpoint}' was trained at "
            f"{size} px; set data.image_size={size} (or null) or use a checkpoint for "
            f"{d.image_size} px images"
        )
    if d.dataset is None:
        if trained.get("poison") is not None:
            raise ConfigError(
                f"checkpoint '{checkpoint}' was trained on images poisoned on the fly "
                "(data.poison), which have no files to search: write them with ssl-lib poison "
                "make and set data.dataset=file_list, data.root and data.file_list (its "
                f"{TRAIN_LIST})"
            )
        if trained.dataset not in ("image_folder", "file_list") or trained.root is None:
            raise ConfigError(
                f"checkpoint '{checkpoint}' was trained on data.dataset={trained.dataset}, which "
                "has no image files to search, and the recipe names none: set data.dataset="
                "image_folder (or file_list) and data.root"
            )
        kind, root, lst = trained.dataset, trained.root, trained.file_list
    else:
        kind, root, lst = d.dataset, d.root, d.file_list
        if root is None:
            raise ConfigError(f"data.dataset={kind} needs data.root (the image folder)")
    return open_data(kind, root, lst, size, d)


def load_images(data: SearchData, indices: Sequence[int], cfg: DictConfig) -> Tensor:
    """Centre crops (``eval`` view) of ``indices``, float ``(n, 3, S, S)``."""
    loader = image_loader(data, indices, cfg)
    return torch.cat([images for images, _, _ in loader])


def image_loader(data: SearchData, indices: Sequence[int] | None, cfg: DictConfig) -> DataLoader:
    """Batches ``(images, labels, indices)`` of centre crops, in order."""
    ds: Dataset = IndexedDataset(data.dataset, VIEWS.get("eval")(data.image_size))
    if indices is not None:
        ds = Subset(ds, list(indices))
    return DataLoader(ds, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)


# ----------------------------------------------------------------- the command
@dataclass
class Search:
    """A prepared search: checked inputs, nothing computed or written yet."""

    checkpoint: Path
    cfg: DictConfig
    backbone: nn.Module
    data: SearchData
    window: int
    poisoned: Tensor | None
    device: torch.device


def prepare(checkpoint: str | Path, cfg: DictConfig) -> Search:
    """Load the checkpoint and the data and check every setting; writes nothing.

    Raises ``CheckpointError``, ``ConfigError`` or ``DataError`` (one line).
    """
    checkpoint = Path(checkpoint)
    method = load_checkpoint_model(checkpoint)
    data = resolve_data(cfg, method.cfg.data, checkpoint)
    p = cfg.patchsearch
    window = scaled(p.window, data.image_size)
    if window > data.image_size:
        raise ConfigError(
            f"patchsearch.window={p.window} (pixels at 224 px) gives a {window}-px window, "
            f"larger than the {data.image_size}-px images; choose at most {REFERENCE_SIZE}"
        )
    n = len(data.dataset)
    if p.num_clusters > n:
        raise ConfigError(f"patchsearch.num_clusters={p.num_clusters} exceeds the {n} images")
    tests = p.test_images or p.num_clusters
    if tests > n:
        raise ConfigError(f"patchsearch.test_images={tests} exceeds the {n} images")
    with cam_layer(method.backbone, data.image_size):
        pass  # refuses an unknown backbone or a ViT whose patch does not divide the image
    poisoned = poison_truth(data, cfg.manifest) if cfg.manifest else None
    device = resolve_device(p.device)
    return Search(checkpoint, cfg, method.backbone, data, window, poisoned, device)


def run_patchsearch(checkpoint: str | Path, cfg: DictConfig) -> tuple[dict, Path]:
    """``ssl-lib defend patchsearch``: scores, ranking, top patches and metrics in a folder.

    Returns the JSON record and the folder. Files: ``scores.npy`` (float64 ``(N,)`` in the
    dataset's order, NaN = never scored), ``ranking.txt`` (``path score`` lines, best first),
    ``windows.npy`` (int64 ``(N, 2)`` window corner (y, x) in the centre crop, -1 = never
    scored), ``top_patches.npy`` (uint8 ``(k, w, w, 3)``) and ``top_patches.png``, and
    ``patchsearch.json`` (settings, rounds and, with a manifest, the metrics).
    """
    s = prepare(checkpoint, cfg)
    p, data, device = cfg.patchsearch, s.data, s.device
    progress = p.progress_bar
    backbone = s.backbone.to(device)
    feats, _, _ = extract_features(
        backbone, image_loader(data, None, cfg), device=device, progress=progress
    )
    assign = kmeans(feats, p.num_clusters, p.kmeans_iters, p.seed, p.kmeans_backend)
    centroids, assign = cluster_centroids(feats, assign)
    # One assignment everywhere: the pseudo-classifier's (nearest normalised centroid).
    assign = search(centroids, feats, 1, metric="ip").indices[:, 0]
    classifier = PseudoClassifier(backbone, centroids).to(device).eval()
    tests = test_set(feats, assign, centroids, p.test_images or p.num_clusters)
    test_images = load_images(data, tests.tolist(), cfg).to(device)
    clean_pred = predict(classifier, test_images, p.batch_size)
    generator = torch.Generator().manual_seed(p.seed)
    windows = torch.full((len(assign), 2), -1, dtype=torch.long)
    size, w = data.image_size, s.window

    def score(indices: Tensor) -> Tensor:
        out = []
        for images, _, idx in console.progress(
            image_loader(data, indices.tolist(), cfg), "patch search", progress
        ):
            images = images.to(device)
            cams, top = grad_cam(classifier, images, size)
            corners = salient_window(cams, w)
            windows[idx] = corners
            where = torch.randint(0, size - w + 1, (len(idx), len(tests), 2), generator=generator)
            patches = cut(images, corners, w)
            out.append(
                poison_scores(
                    classifier, test_images, clean_pred, patches, where, top, p.batch_size
                )
            )
        return torch.cat(out)

    scores, rounds = iterative_search(
        assign, score, p.samples_per_iteration, p.remove_fraction, generator
    )
    metrics = detection_metrics(scores, s.poisoned) if s.poisoned is not None else None
    return write_results(s, scores, windows, rounds, metrics, assign)


def write_results(
    s: Search,
    scores: Tensor,
    windows: Tensor,
    rounds: list[SearchRound],
    metrics: dict | None,
    assign: Tensor,
) -> tuple[dict, Path]:
    """The output folder of :func:`run_patchsearch`."""
    cfg, data, w = s.cfg, s.data, s.window
    default = run_folder_of(s.checkpoint) / "defend" / f"patchsearch_{s.checkpoint.stem}"
    folder = unused_path(Path(cfg.output) if cfg.output else default, keep_suffix=False)
    order = ranking(scores)
    paths = data.paths
    lines = [f"{paths[i]} {scores[i].item():g}" for i in order.tolist()]
    top = [i for i in order.tolist() if not scores[i].isnan()][: cfg.patchsearch.top_patches]
    crops = load_images(data, top, cfg) if top else torch.zeros(0, 3, w, w)
    pixels = denormalize(cut(crops, windows[top], w))
    folder.mkdir(parents=True)
    atomic_write(folder / "scores.npy", lambda f: np.save(f, scores.numpy()))
    atomic_write(folder / "windows.npy", lambda f: np.save(f, windows.numpy()))
    atomic_write(folder / "top_patches.npy", lambda f: np.save(f, pixels.numpy()))
    atomic_write_text(folder / "ranking.txt", "\n".join(lines) + "\n")
    # Small windows (9 px at 32 px) are enlarged, nearest neighbour, to be seen in the grid.
    zoom = max(1, PNG_PATCH_PX // w)
    big = pixels.permute(0, 3, 1, 2).repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    grid = make_grid(big, nrow=10, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(folder / "top_patches.png")
    record = {
        "command": "defend patchsearch",
        "checkpoint": str(s.checkpoint.resolve()),
        "data": data.describe(),
        # absolute, so that ssl-lib defend filter finds it from any working directory
        "manifest": cfg.manifest and str(Path(cfg.manifest).resolve()),
        "num_images": len(paths),
        "num_clusters": int(assign.max()) + 1,
        "num_scored": int((~scores.isnan()).sum()),
        "window": w,
        "rounds": [vars(r) for r in rounds],
        "metrics": metrics,
        "settings": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2))
    return record, folder
