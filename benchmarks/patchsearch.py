"""PatchSearch benchmarks: batched scoring throughput, and the full pipeline on a poisoned set.

Stage ``scoring`` (the default): for ``--candidates`` candidate patches, each pasted at
seeded random places on ``--test-images`` test images, :func:`ssl_lib.defend.patchsearch.
poison_scores` runs

* ``batched``: ``--batch-size`` pasted images per forward pass (ssl_lib's search);
* ``per-paste``: ``batch_size=1``, one forward pass per pasted image, as the authors'
  ``patch_search_iterative_search.py`` scores (about 8 million forwards on ImageNet-100).

Both see the same model (seeded random init in eval mode), seeded random test images, patches,
places and centroids: one per test image (its normalised feature, as the paper's test set has
one image per cluster) and a "trigger" centroid, the mean normalised feature of the test images
with candidate 0's patch pasted, so that candidate 0 behaves like a trigger and scores high.
The script checks that the two variants' scores are equal. They alternate within each
repeat after one warm-up call each; cells are medians.

Example (the figures in ``benchmarks/README.md``)::

    python -m benchmarks.patchsearch --backbone resnet18 --image-size 224 --candidates 2 \\
        --test-images 64 --repeats 3

Stage ``pipeline``: the whole defence on the poisoned CIFAR-10 subset of
``benchmarks/backdoor_cpu.py`` (its data, poisoning, pretraining and evaluation functions, its
option names and defaults): pretrain on the poisoned list (or reuse ``--checkpoint``, trained
on the same ``--work`` folder), ``ssl-lib defend patchsearch`` with the manifest
(``defend/cifar10_patchsearch``, ``--num-clusters``), ``ssl-lib defend filter``
(``--filter-ensemble`` classifiers of at most ``--filter-iterations`` steps), retrain the same
recipe on the filtered list (``--icutmix ALPHA`` adds i-CutMix), and ``ssl-lib eval backdoor``
on both models. Prints the ranking's precision@k and AUROC, the filter's removed count,
precision and recall, and clean acc / FP_target / ASR of both models::

    python -m benchmarks.patchsearch --stage pipeline --work /tmp/ps --recipe cifar10/msf \\
        --backbone tiny_cnn --epochs 30 --train-per-class 150 --test-per-class 100 \\
        --classes airplane automobile cat ship truck --rate 1.0 --width 16 --knn-k 5 \\
        --train-overrides method.bank_size=512 --num-clusters 50
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.backdoor_cpu import (  # noqa: E402
    DATA,
    evaluate,
    file_list_data,
    poisoned_subset,
    pretrain,
    table,
)
from ssl_lib.backdoor.make import TRAIN_LIST  # noqa: E402
from ssl_lib.backdoor.manifest import MANIFEST_NAME  # noqa: E402
from ssl_lib.config import load_defend_config  # noqa: E402
from ssl_lib.defend.filter import run_filter  # noqa: E402
from ssl_lib.defend.gradcam import PseudoClassifier  # noqa: E402
from ssl_lib.defend.patchsearch import (  # noqa: E402
    PRECISION_KS,
    paste,
    poison_scores,
    predict,
    run_patchsearch,
    scaled,
)
from ssl_lib.models import build_backbone  # noqa: E402

STAGES = ("scoring", "pipeline")


def scoring(args: argparse.Namespace) -> dict:
    """Median seconds of both variants, their ratio, pasted images per second, equality."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone).eval()
    size, n, m = args.image_size, args.test_images, args.candidates
    window = scaled(args.window, size)
    tests = torch.randn(n, 3, size, size)
    patches = torch.randn(m, 3, window, window) * 3
    corners = torch.randint(0, size - window + 1, (m, n, 2))
    with torch.no_grad():
        # one cluster per test image, plus a "trigger" cluster where candidate 0's patch leads
        own = nn.functional.normalize(backbone(tests), dim=1)
        pasted = backbone(paste(tests, patches[0].expand(n, -1, -1, -1), corners[0]))
        trigger = nn.functional.normalize(pasted, dim=1).mean(0, keepdim=True)
    classifier = PseudoClassifier(backbone, torch.cat([own, trigger])).eval()
    clean = predict(classifier, tests, args.batch_size)
    clusters = torch.cat([torch.tensor([n]), clean[1:m]])

    def run(batch_size: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = poison_scores(classifier, tests, clean, patches, corners, clusters, batch_size)
        return time.perf_counter() - start, out

    variants = {"batched": args.batch_size, "per-paste": 1}
    times: dict[str, list[float]] = {name: [] for name in variants}
    scores = {name: run(bs)[1] for name, bs in variants.items()}  # warm-up
    for _ in range(args.repeats):
        for name, bs in variants.items():
            seconds, out = run(bs)
            times[name].append(seconds)
            if not torch.equal(out, scores[name]):
                raise AssertionError(f"{name}: scores changed between repeats")
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "backbone": args.backbone,
        "image_size": size,
        "window": window,
        "candidates": m,
        "test_images": n,
        "clusters": n + 1,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "seconds": median,
        "pasted_per_second": {k: m * n / v for k, v in median.items()},
        "speed-up": median["per-paste"] / median["batched"],
        "equal_scores": torch.equal(scores["batched"], scores["per-paste"]),
        "scores": scores["batched"].tolist(),
    }


def pipeline(args: argparse.Namespace, work: Path) -> dict:
    """Search, filter and retrain on the poisoned subset; the figures of every step."""
    timings: dict[str, float] = {}
    t = time.time()
    if (work / "poison" / MANIFEST_NAME).is_file():  # a rerun on the same folder
        roots = {split: work / "data" / split for split in ("train", "test")}
        poison = work / "poison"
        manifest = json.loads((poison / MANIFEST_NAME).read_text())
    else:
        roots, poison, manifest = poisoned_subset(args, work)
    checkpoints = {"poisoned": args.checkpoint}
    if args.checkpoint is None:
        checkpoints["poisoned"] = pretrain(
            "poisoned",
            file_list_data(poison / TRAIN_LIST, roots["train"]),
            args,
            work,
        )
    timings["poison + pretrain"] = time.time() - t
    t = time.time()
    defend = load_defend_config(
        "defend/cifar10_patchsearch",
        [
            f"manifest={poison}",
            f"output={work / 'search'}",
            "data.num_workers=0",
            f"patchsearch.num_clusters={args.num_clusters}",
            f"patchsearch.window={args.window}",
            f"patchsearch.seed={args.seed}",
            "patchsearch.device=cpu",
            "patchsearch.progress_bar=false",
            f"filter.ensemble={args.filter_ensemble}",
            f"filter.iterations={args.filter_iterations}",
            f"filter.seed={args.seed}",
        ],
    )
    search, search_dir = run_patchsearch(checkpoints["poisoned"], defend)
    timings["defend patchsearch"] = time.time() - t
    t = time.time()
    filtered, filter_dir = run_filter(search_dir, defend)
    timings["defend filter"] = time.time() - t
    t = time.time()
    mix = [f"method.icutmix.alpha={args.icutmix}"] if args.icutmix else []
    checkpoints["retrained on the filtered list"] = pretrain(
        "filtered",
        [*file_list_data(filter_dir / "filtered.txt", roots["train"]), *mix],
        args,
        work,
    )
    timings["retrain"] = time.time() - t
    t = time.time()
    rows = {
        name: evaluate(ckpt, roots, poison, work, name.split()[0], args.knn_k)
        for name, ckpt in checkpoints.items()
    }
    timings["evaluations"] = time.time() - t
    return {
        "rate": manifest["attack"]["rate"],
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "search": {k: search[k] for k in ("num_images", "num_clusters", "num_scored", "window")},
        "ranking": search["metrics"],
        "filter": {"num_removed": filtered["num_removed"], **filtered["metrics"]},
        "results": rows,
        "timings_s": timings,
    }


def pipeline_tables(result: dict) -> str:
    """The detection table (ranking and filter) and the backdoor table of both models."""
    r, f = result["ranking"], result["filter"]
    ks = [k for k in PRECISION_KS if f"precision@{k}" in r]
    head = [f"P@{k}" for k in ks] + ["AUROC", "removed", "filter precision", "filter recall"]
    cells = [f"{r[f'precision@{k}']:.2f}" for k in ks] + [f"{r['auroc']:.3f}"]
    precision = "-" if f["precision"] is None else f"{f['precision']:.3f}"
    cells += [str(f["num_removed"]), precision, f"{f['recall']:.3f}"]
    detection = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    detection.append("| " + " | ".join(cells) + " |")
    return "\n".join(detection) + "\n\n" + table(result["results"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, default="scoring")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--window", type=int, default=60, help="pixels at 224 px")
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    pipe = parser.add_argument_group("stage pipeline (names and defaults of backdoor_cpu.py)")
    pipe.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    pipe.add_argument("--checkpoint", type=Path, help="the poisoned model, trained in --work")
    pipe.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 in class folders")
    pipe.add_argument("--train-per-class", type=int, default=500)
    pipe.add_argument("--test-per-class", type=int, default=100)
    pipe.add_argument("--classes", nargs="*", help="class folders to keep (default: all)")
    pipe.add_argument("--recipe", default="cifar10/mocov2")
    pipe.add_argument("--epochs", type=int, default=10)
    pipe.add_argument("--train-overrides", nargs="*", default=[], help="key=value for training")
    pipe.add_argument("--target", default="cat")
    pipe.add_argument("--rate", type=float, default=1.0, help="fraction of the target class")
    pipe.add_argument("--width", type=int, default=12, help="trigger side, pixels")
    pipe.add_argument("--band", default="[0.0,1.0]", help="placement band, train and val")
    pipe.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN probe")
    pipe.add_argument("--num-clusters", type=int, default=50, help="k-means clusters")
    pipe.add_argument("--filter-ensemble", type=int, default=5, help="poison classifiers")
    pipe.add_argument("--filter-iterations", type=int, default=300, help="steps, at most")
    pipe.add_argument("--icutmix", type=float, help="retrain with i-CutMix of this alpha")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "pipeline":
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result = pipeline(args, work)
        rate = result["rate"]
        print(
            f"\nCIFAR-10 subset {args.train_per_class}/{args.test_per_class} per class, target "
            f"{args.target}, {rate['num_poisoned']} poisoned of {result['search']['num_images']}"
            f", trigger {args.width} px, {args.recipe} {args.backbone} {args.epochs} epochs; "
            f"search: {result['search']['num_scored']} scored, {args.num_clusters} clusters, "
            f"window {result['search']['window']} px; {time.time() - start:.0f} s\n"
        )
        print(pipeline_tables(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    result = {"machine": f"{platform.machine()} {platform.processor()}".strip(), **scoring(args)}
    s = result["seconds"]
    print("| backbone | px | pasted images | batched s | per-paste s | speed-up | equal |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.backbone} | {args.image_size} | {args.candidates} x {args.test_images} | "
        f"{s['batched']:.2f} | {s['per-paste']:.2f} | {result['speed-up']:.1f}x | "
        f"{result['equal_scores']} |"
    )
    print(f"scores: {result['scores']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not result["equal_scores"]:
        sys.exit("batched and per-paste scores differ")


if __name__ == "__main__":
    main()
