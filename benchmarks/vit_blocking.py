"""Test-time patch blocking on a small backdoored ViT: does the rollout find the trigger?

A ``vit_micro_p8`` + linear head is trained with labels (BadNets-style dirty-label poisoning,
as a cheap stand-in for a poisoned SSL model + probe) on a CIFAR-10 subset in which ``--rate``
of the non-target training images carry a trigger (a fixed random-colour square of
``--trigger`` px, also the blocked square's side, at a random place) and are relabelled to the
target. On the test subset it reports clean accuracy and attack success rate (non-target images
with the trigger predicted as the target / non-target images) before and after blocking, for
the gradient and the plain rollout, and for a control that blocks a square at a random place.

    python -m benchmarks.vit_blocking --data ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lib.backdoor.metrics import attack_success_rate, confusion_matrix
from ssl_lib.data import image_folder
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.interpret.blocking import (
    block_at_peaks,
    block_squares,
    scaled_block_size,
    scaled_filter_size,
    square_box,
)
from ssl_lib.models import build_backbone

SIZE = 32


def load(root: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` seeded images per class as uint8 (N, 3, 32, 32) and labels."""
    ds = image_folder(root)
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(ds.targets)
    picks = []
    for c in range(len(ds.classes)):
        idx = (targets == c).nonzero()[:, 0]
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    order = torch.cat(picks)
    images = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in order])
    return images, targets[order]


def paste(images: torch.Tensor, trigger: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = images.clone()
    side = trigger.shape[-1]
    for i in range(len(out)):
        y, x = torch.randint(0, SIZE - side + 1, (2,), generator=g).tolist()
        out[i, :, y : y + side, x : x + side] = trigger
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--trigger", type=int, default=scaled_block_size(SIZE), help="side, px")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    block, window = args.trigger, scaled_filter_size(SIZE)  # the defence knows the trigger size
    trigger = torch.randint(0, 256, (3, block, block), generator=g, dtype=torch.uint8)

    train_x, train_y = load(f"{args.data}/train", args.train_per_class, args.seed)
    test_x, test_y = load(f"{args.data}/test", args.test_per_class, args.seed)
    others = (train_y != args.target).nonzero()[:, 0]
    poisoned = others[torch.randperm(len(others), generator=g)[: int(args.rate * len(others))]]
    train_x[poisoned] = paste(train_x[poisoned], trigger, g)
    train_y[poisoned] = args.target
    patched_x = paste(test_x, trigger, g)

    vit = build_backbone("vit_micro_p8", image_size=SIZE)
    model = nn.Sequential(vit, nn.Linear(vit.feat_dim, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    x_all = normalise(train_x)
    start = time.time()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_all), generator=g).split(128):
            x = x_all[idx]
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.time() - start
    model.eval()

    rows = []
    for name, images in (("clean", normalise(test_x)), ("patched", normalise(patched_x))):
        before, after_grad, after_plain, after_random = [], [], [], []
        for idx in torch.arange(len(images)).split(250):
            x = images[idx]
            b, a, _ = block_at_peaks(model, vit, x, block, window, "gradient", 0.9)
            _, a_plain, _ = block_at_peaks(model, vit, x, block, window, "plain", 0.0)
            centres = torch.randint(0, SIZE, (len(x), 2), generator=g).tolist()
            boxes = [square_box(y, c, block, SIZE, SIZE) for y, c in centres]
            with torch.no_grad():
                a_random = model(block_squares(x, boxes))
            before.append(b.argmax(1))
            after_grad.append(a.argmax(1))
            after_plain.append(a_plain.argmax(1))
            after_random.append(a_random.argmax(1))
        for label, preds in (
            ("before blocking", before),
            ("gradient rollout", after_grad),
            ("plain rollout", after_plain),
            ("random square", after_random),
        ):
            pred = torch.cat(preds)
            acc = 100.0 * (pred == test_y).float().mean().item()
            conf = confusion_matrix(test_y.numpy(), pred.numpy(), 10)
            asr = attack_success_rate(conf, args.target)
            rows.append((name, label, acc, asr))

    print(
        f"vit_micro_p8, {len(train_x)} train images ({len(poisoned)} poisoned), "
        f"{args.epochs} epochs ({train_s:.0f} s), trigger {block} px, block {block} px, "
        f"filter {window} px, {len(test_x)} test images"
    )
    print("| val set | blocking | top-1 % | ASR % |")
    print("|---|---|---|---|")
    for name, label, acc, asr in rows:
        print(f"| {name} | {label} | {acc:.1f} | {asr:.1f} |")


if __name__ == "__main__":
    main()
