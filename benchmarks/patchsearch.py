"""PatchSearch benchmark: scoring throughput of batched pasting vs one forward per pasted image.

Stage ``scoring`` (the only one so far): for ``--candidates`` candidate patches, each pasted at
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

More stages (the full pipeline on a poisoned set: precision@k, the filter, retraining) are to
be added as further ``--stage`` choices.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.defend.gradcam import PseudoClassifier  # noqa: E402
from ssl_lib.defend.patchsearch import paste, poison_scores, predict, scaled  # noqa: E402
from ssl_lib.models import build_backbone  # noqa: E402

STAGES = ("scoring",)


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
