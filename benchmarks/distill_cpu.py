"""Does distillation learn? A teacher, SimReg and CompRess students and a random student on CPU.

1. Train a teacher: the ``demo/byol`` recipe (tiny CNN, synthetic textures) at a constant
   learning rate (the setting of ``tests/test_quality.py``, which learns within 400 steps).
2. Distil a fresh tiny-CNN student from its backbone with ``demo/simreg`` and with
   ``demo/compress`` (same data, same number of steps; CompRess with 1,024 anchors, fewer than
   the images).
3. 20-NN accuracy (majority vote, L2-normalised backbone features, centre crop) of the
   teacher, both students and a randomly initialised student, on the synthetic evaluation
   split against the training images.

Run from the repository root (the figures in ``benchmarks/README.md``)::

    python benchmarks/distill_cpu.py --out /tmp/distill_bench --samples 1280 \
        --teacher-epochs 20 --epochs 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.config import load_config  # noqa: E402
from ssl_lib.data import IndexedDataset, build_base_dataset  # noqa: E402
from ssl_lib.data.transforms import eval_transform  # noqa: E402
from ssl_lib.eval.features import extract_features  # noqa: E402
from ssl_lib.eval.knn import knn_evaluate  # noqa: E402
from ssl_lib.methods import load_method  # noqa: E402
from ssl_lib.models import build_backbone  # noqa: E402
from ssl_lib.train import train  # noqa: E402

K = 20


def knn_top1(backbone: torch.nn.Module, data_cfg) -> float:
    """20-NN top-1 (%) of ``backbone`` features: eval split vs the training images."""
    backbone.eval()
    feats = []
    for split in (True, False):
        ds = IndexedDataset(build_base_dataset(data_cfg, train=split), eval_transform(32))
        loader = DataLoader(ds, batch_size=256, num_workers=0)
        feats.append(extract_features(backbone, loader, device="cpu", progress=False))
    (bank, bank_y, _), (queries, query_y, _) = feats
    result = knn_evaluate(bank, bank_y, queries, query_y, ks=(K,), votes=("majority",))
    return float(result[f"majority/k={K}/top1"])


def run(recipe: str, overrides: list[str]) -> tuple[Path, float]:
    start = time.monotonic()
    run_dir = train(load_config(recipe, overrides))
    return run_dir / "checkpoints" / "last.ckpt", time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/distill_bench", help="run folders go here")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=16, help="epochs of each student")
    parser.add_argument("--samples", type=int, default=1280, help="synthetic training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = [
        f"data.synthetic.num_samples={args.samples}",
        f"run.output_dir={args.out}",
        f"run.seed={args.seed}",
        "trainer.progress_bar=false",
        "monitor.knn_every_n_epochs=0",
        "monitor.online_linear=false",
        "data.num_workers=0",
    ]
    teacher_ckpt, teacher_s = run(
        "demo/byol",
        [*common, f"trainer.max_epochs={args.teacher_epochs}", "optim.schedule=constant"],
    )
    teacher_spec = [f"method.teachers.0.path={teacher_ckpt}", "method.teachers.0.part=backbone"]
    students = {}
    for name, extra in (("simreg", []), ("compress", ["method.bank_size=1024"])):
        ckpt, seconds = run(
            f"demo/{name}", [*common, *teacher_spec, *extra, f"trainer.max_epochs={args.epochs}"]
        )
        students[name] = (ckpt, seconds)
    data_cfg = load_config("demo/byol", common).data
    teacher = load_method(str(teacher_ckpt)).backbone
    torch.manual_seed(args.seed)
    rows = [("teacher (BYOL backbone)", knn_top1(teacher, data_cfg), teacher_s)]
    for name, (ckpt, seconds) in students.items():
        rows.append(
            (f"student, {name}", knn_top1(load_method(str(ckpt)).backbone, data_cfg), seconds)
        )
    rows.append(("student, random init", knn_top1(build_backbone("tiny_cnn"), data_cfg), 0.0))
    print(f"\n| model | {K}-NN top-1 (%) | training time (s) |\n|---|---:|---:|")
    for name, acc, seconds in rows:
        print(f"| {name} | {acc:.1f} | {seconds:.0f} |")
    out = Path(args.out) / "distill_cpu.json"
    out.write_text(json.dumps([{"model": n, "knn20": a, "seconds": s} for n, a, s in rows]))


if __name__ == "__main__":
    main()
