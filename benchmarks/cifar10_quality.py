"""CIFAR-10 quality benchmark: pretrain every CIFAR-10 recipe, then kNN and linear probe.

For each shipped ``cifar10/`` recipe (or those named by ``--methods``) this pretrains the
ResNet-18 CIFAR-stem model for ``--epochs`` epochs and evaluates ``checkpoints/last.ckpt`` with
the library's own evaluation code, the same protocol for every method:

* weighted kNN, k = 200, T = 0.1 (``eval/cifar10_knn_weighted`` restricted to that setting);
* 20-NN majority vote (``eval/cifar10_knn_umbc`` restricted to k = 20);
* the cached linear probe (``eval/cifar10_linear_cached``).

It records epochs, wall time, end-to-end training throughput, the accuracies and the per-epoch
online kNN of the monitor (``metrics.json``), writes them to one JSON file and prints a Markdown
table beside lightly's published CIFAR-10 kNN figures. Tiny check on a CPU::

    python benchmarks/cifar10_quality.py --methods byol --epochs 1 --max-train-samples 256 \
        --device cpu --batch-size 64

``--pack OUT.tar.gz`` packs the data folder into one file to carry to another machine;
``--data`` then accepts that file and unpacks it into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.config import load_config, load_eval_config, resolve_recipe  # noqa: E402
from ssl_lib.eval.runner import run_knn, run_linear  # noqa: E402
from ssl_lib.train import train  # noqa: E402

RECIPE_DIR = resolve_recipe("cifar10/byol").parent
# lightly's CIFAR-10 benchmark: ResNet-18, kNN k = 200, batch 512, 200 epochs (top-1, %).
LIGHTLY_KNN_200EP = {"byol": 86.8, "moco": 84.7, "barlow_twins": 81.9}
KNN_WEIGHTED = "weighted/k=200/T=0.1/top1"
KNN_MAJORITY = "majority/k=20/top1"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def discover_methods() -> list[str]:
    """The names of the shipped ``cifar10/`` recipes, sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.name.startswith("_"))


def pack(source: Path, out: Path) -> None:
    """Pack ``source`` (with ``train/`` and ``test/``) into ``out``; gzip if it ends in .gz."""
    mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode) as tar:
        tar.add(source, arcname=source.name)
    print(f"packed {source} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def data_root(data: Path, tmp: Path) -> Path:
    """The folder holding ``train/`` and ``test/``; an archive is unpacked into ``tmp`` first."""
    if data.is_file() and data.name.endswith(ARCHIVE_SUFFIXES):
        start = time.perf_counter()
        with tarfile.open(data, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        print(f"unpacked {data} in {time.perf_counter() - start:.1f} s")
        data = next(p.parent for p in sorted(tmp.rglob("train")) if (p.parent / "test").is_dir())
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"--data {data}: expected train/ and test/ class folders")
    return data


def set_options(options: dict[str, object]) -> list[str]:
    """``key=value`` for every option that was given (not ``None``)."""
    return [f"{key}={value}" for key, value in options.items() if value is not None]


def train_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    """Key=value overrides of a method recipe for this benchmark."""
    tiny = args.max_train_samples  # the monitor draws from the whole train folder: cap it too
    return set_options(
        {
            "data.dataset": "image_folder",
            "data.root": root / "train",
            "trainer.max_epochs": args.epochs,
            "trainer.accelerator": "gpu" if args.device.startswith("cuda") else "cpu",
            "run.output_dir": args.out_dir,
            "trainer.progress_bar": "false",
            "data.batch_size": args.batch_size,
            "data.num_workers": args.workers,
            "trainer.precision": args.precision,
            "monitor.knn_every_n_epochs": args.knn_every,
            "data.max_samples": tiny,
            "monitor.knn_train_samples": tiny,
            "monitor.knn_val_samples": tiny and (args.max_val_samples or tiny),
        }
    )


def eval_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    """Key=value overrides shared by the three evaluations."""
    return set_options(
        {
            "data.dataset": "image_folder",
            "data.train_root": root / "train",
            "data.val_root": root / "test",
            "features.device": args.device,
            "features.progress_bar": "false",
            "data.batch_size": args.eval_batch_size,
            "data.num_workers": args.workers,
            "data.max_train_samples": args.max_train_samples,
            "data.max_val_samples": args.max_val_samples,
            "linear.epochs": args.linear_epochs,
        }
    )


def online_knn(run_dir: Path) -> list[dict]:
    """``[{epoch, knn_top1}]`` of the kNN monitor, from ``metrics.json`` (empty if not logged)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text())["history"]
    return [
        {"epoch": r["epoch"] + 1, "knn_top1": r["monitor/knn_top1"]}
        for r in history
        if "monitor/knn_top1" in r
    ]


def run_method(name: str, args: argparse.Namespace, root: Path) -> dict:
    """Pretrain one recipe and evaluate its last checkpoint; the method's result record."""
    cfg = load_config(f"cifar10/{name}", train_overrides(args, root))
    start = time.perf_counter()
    run_dir = train(cfg)
    train_seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]
    images = metrics["step"] * cfg.data.batch_size
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    common = eval_overrides(args, root)
    weighted, _ = run_knn(
        ckpt,
        load_eval_config(
            "eval/cifar10_knn_weighted",
            [*common, "knn.ks=[200]", "knn.temperatures=[0.1]", "knn.votes=[weighted]"],
        ),
    )
    majority, _ = run_knn(ckpt, load_eval_config("eval/cifar10_knn_umbc", [*common, "knn.ks=[20]"]))
    linear, _ = run_linear(ckpt, load_eval_config("eval/cifar10_linear_cached", common))
    return {
        "method": name,
        "method_name": cfg.method.name,
        "epochs": cfg.trainer.max_epochs,
        "batch_size": cfg.data.batch_size,
        "precision": cfg.trainer.precision,
        "train_images": images,
        "train_seconds": train_seconds,
        "images_per_second": images / train_seconds,
        "knn_weighted_k200_top1": weighted["results"][KNN_WEIGHTED],
        "knn_majority_k20_top1": majority["results"][KNN_MAJORITY],
        "linear_top1": linear["results"]["top1"],
        "linear_best_top1": linear["results"]["best_top1"],
        "online_knn": online_knn(run_dir),
        "run_dir": str(run_dir),
    }


def markdown_table(records: list[dict]) -> str:
    """The results as a Markdown table, with lightly's 200-epoch kNN where it has one."""
    lines = [
        "| method | epochs | wall (s) | img/s | kNN k=200 T=0.1 | 20-NN | linear (cached) "
        "| lightly kNN, 200 ep |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ref = LIGHTLY_KNN_200EP.get(r["method_name"])
        lines.append(
            f"| {r['method']} | {r['epochs']} | {r['train_seconds']:.0f} "
            f"| {r['images_per_second']:.0f} | {r['knn_weighted_k200_top1']:.2f} "
            f"| {r['knn_majority_k20_top1']:.2f} | {r['linear_top1']:.2f} "
            f"| {'-' if ref is None else f'{ref:.1f}'} |"
        )
    lines.append(
        "\nReference (lightly, ResNet-18, k = 200, batch 512, 200 epochs): "
        + ", ".join(f"{k} {v:.1f}" for k, v in LIGHTLY_KNN_200EP.items())
    )
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> None:
    """Online kNN accuracy over epochs, one line per method (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {out}")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        if r["online_knn"]:
            ax.plot(
                [p["epoch"] for p in r["online_knn"]],
                [p["knn_top1"] for p in r["online_knn"]],
                marker="o",
                label=r["method"],
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("online 20-NN top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"plot: {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", help=f"recipes (default all: {discover_methods()})")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/cifar10"),
        help="folder with train/ and test/, or a .tar / .tar.gz of it",
    )
    p.add_argument("--pack", type=Path, metavar="OUT", help="pack --data into OUT and exit")
    p.add_argument("--max-train-samples", type=int, help="seeded subset (pretraining and eval)")
    p.add_argument("--max-val-samples", type=int, help="seeded subset of the test images")
    p.add_argument("--batch-size", type=int, help="pretraining batch (default: the recipe's)")
    p.add_argument("--eval-batch-size", type=int, help="feature-extraction batch")
    p.add_argument("--precision", help="e.g. bf16-mixed, 32-true (default: the recipe's)")
    p.add_argument("--workers", type=int, help="data-loader workers")
    p.add_argument("--knn-every", type=int, help="online kNN every N epochs (0 = off)")
    p.add_argument("--linear-epochs", type=int, help="linear-probe epochs (default 40)")
    p.add_argument("--out-dir", default="runs/cifar10_quality", help="run folders go here")
    p.add_argument("--json", type=Path, help="results file (default OUT_DIR/results.json)")
    p.add_argument("--plot", type=Path, help="PNG of the online kNN over epochs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.pack:
        pack(args.data, args.pack)
        return
    methods = args.methods or discover_methods()
    unknown = sorted(set(methods) - set(discover_methods()))
    if unknown:
        raise SystemExit(f"no shipped cifar10/ recipe named {unknown}")
    records = []
    with tempfile.TemporaryDirectory(prefix="cifar10_") as tmp:
        root = data_root(args.data, Path(tmp))
        for name in methods:
            records.append(run_method(name, args, root))
            print(markdown_table(records[-1:]), flush=True)
    out = args.json or Path(args.out_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": records}, indent=2, default=str))
    print(f"\n{markdown_table(records)}\nresults: {out}")
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
