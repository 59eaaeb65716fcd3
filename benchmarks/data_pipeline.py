"""Images per second per CPU core of the training view pipelines (two views per image).

Compared, in one process with one torch thread (what one loader worker gets), interleaved in
rounds so that machine noise hits all alike, on the same JPEG files:

* ``decode``: reading the JPEG as an RGB image, nothing else (the floor of every pipeline).
* ``authors-v1``: the authors' pipeline as the MSF / ISD / CMSF code runs it, written here with
  ``torchvision.transforms`` v1 on PIL images: strong view (MoCo v2 aug+: crop 0.2-1, colour
  jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, PIL Gaussian blur p=0.5, flip) and weak view
  (crop 0.2-1, flip), ``ToTensor`` + ``Normalize``; unseeded, as in the original code.
* ``workers``: ssl_lib with ``data.augment_on: workers`` (the default): the same two views,
  finished per image, seeded per sample for an exact resume.
* ``workers-unseeded``: the same without per-sample seeds (a fresh random stream per view).
* ``workers-old-seeding``: the unseeded pipeline under the former per-view seeding (torch,
  numpy and ``random`` re-seeded and restored around every view).
* ``split-worker``: ssl_lib with ``data.augment_on: device``, the loader-worker part: decode,
  crop, flip, uint8 tensors plus the drawn photometric parameters (seeded).
* ``split-photometric``: the device part of ``augment_on: device`` run here on the CPU:
  batched colour jitter, grayscale, blur, solarisation and normalisation of both views, batches
  of ``--batch`` images (images/s counts images, each with its two views).

``--make-jpegs DIR`` first writes 500 x 375 JPEGs (ImageNet's typical size; quality 90)
upsampled from a folder of images (default: the CIFAR-10 JPEG copy), class folders kept, for
repeatable ImageNet-sized runs; DIR must be outside the repository.

Examples (from the repository root)::

    python -m benchmarks.data_pipeline --make-jpegs /tmp/jpeg500 --count 1000
    python -m benchmarks.data_pipeline --root /tmp/jpeg500 --size 224
    python -m benchmarks.data_pipeline --root ../shared/data/cifar10/train --size 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from ssl_lib.data.augment import SPECS, photometric_batch, spec_for_size
from ssl_lib.data.datasets import IndexedDataset, image_folder, load_rgb
from ssl_lib.data.transforms import MultiView

VIEWS = ["strong", "weak"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(src: str, dst: str, count: int, seed: int = 0) -> None:
    """Write ``count`` 500 x 375 JPEGs under ``dst/<class>/`` upsampled (bicubic) from a random
    selection of the images under ``src/<class>/``."""
    repo = Path(__file__).resolve().parents[1]
    if Path(dst).resolve().is_relative_to(repo):
        raise SystemExit(f"--make-jpegs: write outside the repository, not into '{dst}'")
    ds = image_folder(src)
    picks = random.Random(seed).sample(range(len(ds.samples)), min(count, len(ds.samples)))
    for n, i in enumerate(sorted(picks)):
        path, label = ds.samples[i]
        out = Path(dst) / ds.classes[label] / f"{n:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize((500, 375), Image.BICUBIC).save(out, quality=90)
    print(f"wrote {len(picks)} JPEGs of 500 x 375 under {dst}")


class PILBlur:
    """The MoCo v2 / MSF code's blur: PIL ``GaussianBlur(radius=sigma)``, sigma ~ U[0.1, 2]."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def authors_views(size: int) -> Callable[[Image.Image], list[torch.Tensor]]:
    """The authors' strong + weak views, torchvision v1 on PIL (blur off at 64 px and below,
    as ssl_lib's small-image pipelines)."""
    finish = [T.ToTensor(), T.Normalize(MEAN, STD)]
    strong_ops = [
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if size > 64:
        strong_ops.append(T.RandomApply([PILBlur()], p=0.5))
    strong = T.Compose([*strong_ops, T.RandomHorizontalFlip(), *finish])
    weak = T.Compose(
        [T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), *finish]
    )
    return lambda img: [strong(img), weak(img)]


@contextmanager
def old_seeding(seed: int) -> Iterator[None]:
    """The former per-view seeding: torch, numpy and ``random`` re-seeded, restored after."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def pipelines(root: str, size: int, batch: int) -> dict[str, Callable[[list[int]], None]]:
    """name -> function processing the listed image indices."""
    ds = image_folder(root)
    paths = [p for p, _ in ds.samples]
    workers = IndexedDataset(ds, MultiView(VIEWS, size, "workers"), seed=1)
    split = IndexedDataset(ds, MultiView(VIEWS, size, "device"), seed=1)
    authors = authors_views(size)
    unseeded = MultiView(VIEWS, size, "workers")
    specs = [spec_for_size(SPECS[v], size) for v in VIEWS]

    def old(i: int) -> None:
        img = load_rgb(paths[i])
        for v, t in enumerate(unseeded.transforms):
            with old_seeding(i * 2 + v):
                t(img)

    # The device part's input: the worker part's output, prepared once (not timed).
    crops = [split[(0, i)][0] for i in range(min(len(ds), 4 * batch))]

    def photometric(idx: list[int]) -> None:
        for start in range(0, len(idx), batch):
            rows = [crops[i % len(crops)] for i in idx[start : start + batch]]
            for v, spec in enumerate(specs):
                view = torch.utils.data.default_collate([r[v] for r in rows])
                photometric_batch(view["image"], view["params"], spec)

    return {
        "decode": lambda idx: [load_rgb(paths[i]) for i in idx],
        "authors-v1": lambda idx: [authors(Image.open(paths[i]).convert("RGB")) for i in idx],
        "workers": lambda idx: [workers[(0, i)] for i in idx],
        "workers-unseeded": lambda idx: [workers[i] for i in idx],
        "workers-old-seeding": lambda idx: [old(i) for i in idx],
        "split-worker": lambda idx: [split[(0, i)] for i in idx],
        "split-photometric": photometric,
    }


def run(root: str, size: int, images: int, rounds: int, batch: int) -> dict[str, float]:
    """Images/s of each pipeline: ``rounds`` rounds of ``images`` images each, interleaved."""
    torch.set_num_threads(1)
    funcs = pipelines(root, size, batch)
    n_files = len(image_folder(root).samples)
    rng = random.Random(0)
    spent = dict.fromkeys(funcs, 0.0)
    for f in funcs.values():  # warm-up
        f(list(range(min(4, n_files))))
    for _ in range(rounds):
        idx = rng.sample(range(n_files), min(images, n_files))
        for name, f in funcs.items():
            t = time.perf_counter()
            f(idx)
            spent[name] += time.perf_counter() - t
    total = rounds * min(images, n_files)
    return {name: total / s for name, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", help="JPEG folder root/<class>/<image>")
    ap.add_argument("--size", type=int, default=224, help="view size in px")
    ap.add_argument("--images", type=int, default=64, help="images per pipeline per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="batch of the photometric part")
    ap.add_argument("--make-jpegs", metavar="DIR", help="write 500 x 375 JPEGs into DIR first")
    ap.add_argument("--source", default="../shared/data/cifar10/train", help="for --make-jpegs")
    ap.add_argument("--count", type=int, default=1000, help="JPEGs for --make-jpegs")
    ap.add_argument("--json", help="also save the figures here")
    args = ap.parse_args()
    if args.make_jpegs:
        make_jpegs(args.source, args.make_jpegs, args.count)
        if not args.root:
            return
    if not args.root:
        ap.error("--root is required (or --make-jpegs)")
    res = run(args.root, args.size, args.images, args.rounds, args.batch)
    with Image.open(image_folder(args.root).samples[0][0]) as im:
        shape = f"{im.size[0]} x {im.size[1]}"
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
        f"{torch.__version__}, 1 thread; {shape} JPEGs from {args.root}; views strong + weak "
        f"at {args.size} px; {args.rounds} rounds x {args.images} images\n"
    )
    base = res["authors-v1"]
    print("| pipeline | images/s per core | vs authors-v1 |\n|---|---:|---:|")
    for name, value in res.items():
        print(f"| {name} | {value:.0f} | {value / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "root": args.root, **res}))


if __name__ == "__main__":
    main()
