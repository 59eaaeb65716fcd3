"""Speed benchmark for one device: training steps per method, memory-bank step, kNN evaluation.

Three parts, all on ``--device``:

1. training throughput (images/s) of each shipped CIFAR-10 recipe (``cifar10/...``): a Lightning
   fit of ``--warmup + --steps`` steps on random 32 px views (no data loading or augmentation
   cost), timed over the last ``--steps`` steps with ``torch.cuda.synchronize`` on CUDA, and
   the peak GPU memory (``torch.cuda.max_memory_allocated``);
2. ``benchmarks/memory_bank.py``'s MSF bank step (ours vs the bare matmul vs the official MSF
   step vs a lightly-style bank) at ``--bank-K`` x ``--bank-D``, B = ``--bank-batch``, k;
3. ``benchmarks/knn_eval.py`` (its own child processes) at ``--knn-bank`` x ``--knn-dim`` with
   ``--knn-queries`` queries, fp16 bank.

Tiny check on a CPU::

    python benchmarks/gpu_speed.py --device cpu --steps 3 --warmup 1 --batch-size 16 \
        --bank-K 4096 --bank-D 64 --knn-bank 2000 --knn-queries 200 --knn-dim 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory_bank import run_case  # noqa: E402
from ssl_lib.config import list_recipes, load_config  # noqa: E402
from ssl_lib.methods import build_method  # noqa: E402


class RandomViews(Dataset):
    """``length`` copies of one random batch ``(views, labels, index)``, already batched."""

    def __init__(self, views: int, batch: int, size: int, length: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batch = (
            [torch.randn(batch, 3, size, size, generator=g) for _ in range(views)],
            torch.randint(0, 10, (batch,), generator=g),
            torch.arange(batch),
        )
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[list[Tensor], Tensor, Tensor]:
        return self.batch


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.start = self.end = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            self.start = self._now()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.end = self._now()


def method_throughput(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s (counted once per image, not per view) and peak memory of one recipe."""
    cfg = load_config(
        f"cifar10/{name}",
        [
            f"data.batch_size={args.batch_size}",
            "monitor.knn_every_n_epochs=0",
            "monitor.online_linear=false",
        ],
    )
    steps = args.warmup + args.steps
    data = RandomViews(len(cfg.data.views), args.batch_size, args.image_size, steps)
    method = build_method(cfg)
    timer = StepTimer(args.warmup, device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(method, DataLoader(data, batch_size=None, pin_memory=device.type == "cuda"))
    seconds = timer.end - timer.start
    record = {
        "method": name,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "steps": args.steps,
        "seconds": seconds,
        "images_per_second": args.steps * args.batch_size / seconds,
    }
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def knn_eval(args: argparse.Namespace) -> list[dict]:
    """``benchmarks/knn_eval.py`` in its own processes; its JSON rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "knn.json"
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "knn_eval.py"),
            f"--device={args.device}",
            f"--bank={args.knn_bank}",
            f"--queries={args.knn_queries}",
            f"--dim={args.knn_dim}",
            f"--classes={args.knn_classes}",
            f"--variants={args.knn_variants}",
            "--fp16",
            f"--json={out}",
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", nargs="+", help="cifar10/ recipe names (default all)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    p.add_argument("--bank-K", type=int, default=1024000)
    p.add_argument("--bank-D", type=int, default=512)
    p.add_argument("--bank-batch", type=int, default=256)
    p.add_argument("--bank-k", type=int, default=5)
    p.add_argument("--bank-repeats", type=int, default=5)
    p.add_argument("--knn-bank", type=int, default=1281167)
    p.add_argument("--knn-queries", type=int, default=50000)
    p.add_argument("--knn-dim", type=int, default=2048)
    p.add_argument("--knn-classes", type=int, default=1000)
    p.add_argument("--knn-variants", default="ours,lightly", help="knn_eval.py --variants")
    p.add_argument("--skip", nargs="+", default=[], choices=["train", "bank", "knn"])
    p.add_argument("--json", type=Path, help="write all results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, device {device} ({name})", flush=True)
    results: dict = {"device": name, "args": vars(args)}
    if "train" not in args.skip:
        methods = args.methods or [
            n.split("/", 1)[1] for n in list_recipes("train") if n.startswith("cifar10/")
        ]
        rows = [method_throughput(m, args, device) for m in methods]
        results["train"] = rows
        print("\n| method | batch | precision | img/s | peak GiB |\n|---|---:|---|---:|---:|")
        for r in rows:
            peak = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-"
            print(
                f"| {r['method']} | {r['batch_size']} | {r['precision']} "
                f"| {r['images_per_second']:.0f} | {peak} |"
            )
    if "bank" not in args.skip:
        ms = run_case(
            args.bank_K,
            args.bank_D,
            args.bank_batch,
            args.bank_k,
            device,
            args.bank_repeats,
            chunk_size=65536,
        )
        results["memory_bank"] = {
            "K": args.bank_K,
            "D": args.bank_D,
            "B": args.bank_batch,
            "k": args.bank_k,
            "ms": ms,
        }
        print(f"\nmemory bank K={args.bank_K} D={args.bank_D} B={args.bank_batch} k={args.bank_k}")
        for key, value in ms.items():
            print(f"  {key:12} {value:9.2f} ms ({value / ms['floor']:.2f}x floor)")
    if "knn" not in args.skip:
        results["knn_eval"] = knn_eval(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
