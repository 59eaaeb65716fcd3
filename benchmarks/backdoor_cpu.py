"""Does the patch-trigger backdoor take at CPU scale? A poisoned pretraining against a clean one.

On a class-balanced CIFAR-10 subset (links into ``--data``, nothing copied; ``--classes`` keeps
some classes only) this

1. poisons ``--rate`` of the target class with a ``--width`` px procedural trigger
   (``ssl-lib poison make`` through :func:`ssl_lib.backdoor.make.make_poison`);
2. pretrains the same recipe twice with the same seed: on the poisoned file list, and on the
   clean folder (the control);
3. distils the poisoned model into a fresh student with CompRess on a clean subset (the
   ``cifar10/compress_defence`` recipe; :func:`defence`);
4. runs ``ssl-lib eval backdoor`` (:func:`ssl_lib.backdoor.evaluate.run_backdoor`) on every
   checkpoint: the cached UMBC linear probe and a ``--knn-k``-NN probe, both trained on the clean
   subset, scored on the clean and the patched test images;

and prints one Markdown table (clean acc, patched acc, FP of the target on clean and patched
images, ASR, NFP). Figures and commands are recorded in benchmarks/README.md. Run::

    python benchmarks/backdoor_cpu.py --json backdoor_cpu.json

The setting at which the attack takes on a 2-core CPU (about 10 minutes)::

    python benchmarks/backdoor_cpu.py --recipe cifar10/msf --backbone tiny_cnn --epochs 30 \\
        --train-per-class 150 --test-per-class 100 \\
        --classes airplane automobile cat ship truck --batch-size 64 --rate 1.0 --width 16 \\
        --knn-k 5 --train-overrides method.bank_size=512 --defence-fraction 0.5 \\
        --defence-bank 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.backdoor.config import load_poison_config  # noqa: E402
from ssl_lib.backdoor.evaluate import run_backdoor  # noqa: E402
from ssl_lib.backdoor.make import TRAIN_LIST, make_poison  # noqa: E402
from ssl_lib.config import load_config, load_eval_config  # noqa: E402
from ssl_lib.data.subsets import write_labelled_subset  # noqa: E402
from ssl_lib.train import train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def link_subset(
    data: Path, out: Path, per_class: dict[str, int], classes: list[str] | None = None
) -> dict[str, Path]:
    """``out/<split>/<class>/<file>`` links to the first ``per_class[split]`` images (sorted) of
    ``classes`` (default: every class folder)."""
    roots = {}
    for split, count in per_class.items():
        found = sorted(p.name for p in (data / split).iterdir() if p.is_dir())
        for cls in classes or found:
            folder = out / split / cls
            folder.mkdir(parents=True)
            for image in sorted((data / split / cls).iterdir())[:count]:
                os.symlink(image, folder / image.name)
        roots[split] = out / split
    return roots


def poisoned_subset(args, work: Path) -> tuple[dict[str, Path], Path, dict]:
    """The class-balanced subset (:func:`link_subset` into ``work/data``) and its poisoning
    (``ssl-lib poison make`` into ``work/poison``) that ``args`` describe. Returns the split
    roots, the poison folder and its manifest."""
    roots = link_subset(
        args.data,
        work / "data",
        {"train": args.train_per_class, "test": args.test_per_class},
        args.classes,
    )
    poison_cfg = load_poison_config(
        "poison/cifar10_targeted",
        [
            f"data.train_root={roots['train']}",
            f"data.val_root={roots['test']}",
            f"poison.target={args.target}",
            f"poison.rate={args.rate}",
            f"poison.trigger.width={args.width}",
            f"poison.train_band={args.band}",
            f"poison.val_band={args.band}",
            f"poison.seed={args.seed}",
            f"output={work / 'poison'}",
        ],
    )
    poison, manifest = make_poison(poison_cfg, progress=False)
    return roots, poison, manifest


def defence(checkpoint: Path, train_root: Path, args, work: Path) -> Path:
    """The distillation defence (Saha et al., CVPR 2022): the ``cifar10/compress_defence``
    recipe distils ``checkpoint`` (the suspect teacher's backbone) into a fresh student with
    CompRess-2q on a seeded, class-balanced ``--defence-fraction`` of the clean training images
    (``ssl-lib data subset``), with a bank of ``--defence-bank`` anchors (smaller than the
    subset). Returns the student's last checkpoint."""
    clean_list = work / "clean_subset.txt"
    write_labelled_subset(train_root, clean_list, args.defence_fraction, seed=args.seed)
    overrides = [
        f"method.teachers.0.path={checkpoint}",
        f"method.bank_size={args.defence_bank}",
        f"data.file_list={clean_list}",
        f"data.root={train_root}",
        f"trainer.max_epochs={args.defence_epochs}",
        f"trainer.checkpoint_every_n_epochs={args.defence_epochs}",
    ]
    return pretrain("defended", overrides, args, work, recipe="cifar10/compress_defence")


def file_list_data(file_list: Path, root: Path) -> list[str]:
    """The overrides that train on ``file_list`` (paths relative to ``root``)."""
    return ["data.dataset=file_list", f"data.file_list={file_list}", f"data.root={root}"]


def pretrain(
    name: str, data_overrides: list[str], args, work: Path, recipe: str | None = None
) -> Path:
    overrides = [
        f"run.name={name}",
        f"run.output_dir={work / 'runs'}",
        f"run.seed={args.seed}",
        f"model.backbone={args.backbone}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        f"trainer.max_epochs={args.epochs}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.precision=32-true",
        "trainer.progress_bar=false",
        f"trainer.checkpoint_every_n_epochs={args.epochs}",
        "monitor.knn_every_n_epochs=0",
        "monitor.online_linear=false",
        *([] if recipe else args.train_overrides),
        *data_overrides,
    ]
    run = train(load_config(recipe or args.recipe, overrides))
    return Path(run) / "checkpoints" / "last.ckpt"


def evaluate(
    checkpoint: Path, roots: dict[str, Path], poison: Path, work: Path, name: str, knn_k: int
):
    common = [
        "data.dataset=image_folder",
        f"data.train_root={roots['train']}",
        f"data.val_root={roots['test']}",
        "data.num_workers=0",
        "data.batch_size=500",
        "features.progress_bar=false",
        f"backdoor.manifest={poison}",
        f"features.cache_dir={work / 'features'}",
    ]
    out = {}
    for probe, recipe, extra in (
        ("linear", "eval/cifar10_backdoor_linear_umbc", ["linear.protocol=cached"]),
        ("knn", "eval/backdoor_knn", ["data.image_size=32", f"knn.ks=[{knn_k}]"]),
    ):
        cfg = load_eval_config(recipe, [*common, *extra, f"output={work / 'eval' / name / probe}"])
        record, _ = run_backdoor(checkpoint, cfg)
        key = "linear" if probe == "linear" else f"knn_k{knn_k}"
        out[key] = record["results"][key]
    return out


def table(rows: dict[str, dict]) -> str:
    columns = ["model", "probe", "clean acc", "patched acc", "FP_target clean"]
    columns += ["FP_target patched", "ASR %", "NFP patched"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for model, result in rows.items():
        for probe, r in result.items():
            lines.append(
                f"| {model} | {probe} | {r['clean_acc']:.1f} | {r['patched_acc']:.1f} | "
                f"{r['fp_target_clean']} | {r['fp_target_patched']} | {r['asr']:.1f} | "
                f"{r['nfp_patched']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 in class folders")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--recipe", default="cifar10/mocov2")
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--target", default="cat")
    parser.add_argument("--rate", type=float, default=1.0, help="fraction of the target class")
    parser.add_argument("--width", type=int, default=12, help="trigger side, pixels")
    parser.add_argument("--band", default="[0.0,1.0]", help="placement band, train and val")
    parser.add_argument("--classes", nargs="*", help="class folders to keep (default: all)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-overrides", nargs="*", default=[], help="key=value for training")
    parser.add_argument(
        "--defence-fraction",
        type=float,
        default=0.5,
        help="share of each class in the clean distillation subset",
    )
    parser.add_argument("--defence-bank", type=int, default=256, help="CompRess anchors")
    parser.add_argument(
        "--defence-epochs", type=int, default=None, help="distillation epochs (default: --epochs)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.defence_epochs = args.defence_epochs or args.epochs

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots, poison, manifest = poisoned_subset(args, work)
        rate = manifest["attack"]["rate"]
        timings = {"poison make": time.time() - start}
        checkpoints: dict[str, Path] = {}
        t = time.time()
        checkpoints["poisoned"] = pretrain(
            "poisoned",
            file_list_data(poison / TRAIN_LIST, roots["train"]),
            args,
            work,
        )
        timings["pretrain poisoned"] = time.time() - t
        t = time.time()
        checkpoints["clean control"] = pretrain(
            "clean", ["data.dataset=image_folder", f"data.root={roots['train']}"], args, work
        )
        timings["pretrain clean"] = time.time() - t
        t = time.time()
        checkpoints["poisoned + distillation defence"] = defence(
            checkpoints["poisoned"], roots["train"], args, work
        )
        timings["distillation defence"] = time.time() - t
        t = time.time()
        rows = {
            name: evaluate(ckpt, roots, poison, work, name.replace(" ", "_"), args.knn_k)
            for name, ckpt in checkpoints.items()
        }
        timings["evaluations"] = time.time() - t
    print(
        f"\nCIFAR-10 subset {args.train_per_class}/{args.test_per_class} per class, target "
        f"{args.target}, {rate['num_poisoned']} poisoned = {rate['of_candidates']:.2f} of the "
        f"class = {rate['of_train']:.2%} of the training set, trigger {args.width} px, "
        f"{args.recipe} {args.backbone} {args.epochs} epochs; {time.time() - start:.0f} s\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rate": rate,
                    "timings_s": timings,
                    "results": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
