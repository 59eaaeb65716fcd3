"""The ``ssl-lib`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ssl_lib import console
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import (
    ConfigError,
    list_recipes,
    load_config,
    load_defend_config,
    load_eval_config,
)
from ssl_lib.data.datasets import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)
DEFAULT_EVAL_RECIPES = {
    "knn": "eval/knn_umbc",
    "linear": "eval/linear_cached",
    "cluster": "eval/cluster_alignment",
    "backdoor": "eval/backdoor_linear_umbc",
}
DEFAULT_DEFEND_RECIPE = "defend/patchsearch"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-lib", description="Nearest-neighbour self-supervised learning."
    )
    quiet_help = "no progress bars (training, feature extraction, k-means, linear probes)"
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    # Each subcommand accepts it too (ssl-lib train RECIPE --quiet); SUPPRESS keeps the
    # value given before the subcommand when it is not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train", help="train a recipe: ssl-lib train RECIPE [key=value ...]", parents=[common]
    )
    tr.add_argument("recipe", nargs="?", help="recipe file or shipped name (ssl-lib recipes)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")
    tr.add_argument("--resume", metavar="RUN_DIR|CKPT", help="continue a run")
    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint: ssl-lib eval knn|linear|cluster|backdoor CKPT ..."
    )
    ev_sub = ev.add_subparsers(dest="protocol", required=True)
    for protocol, recipe in DEFAULT_EVAL_RECIPES.items():
        p = ev_sub.add_parser(
            protocol,
            help=f"{protocol} evaluation: CHECKPOINT [RECIPE] [key=value ...]",
            parents=[common],
        )
        p.add_argument("checkpoint", help="a checkpoint written by ssl-lib train")
        p.add_argument(
            "args", nargs="*", help=f"optional eval recipe (default {recipe}), then overrides"
        )
    df = sub.add_parser("defend", help="backdoor defences: ssl-lib defend patchsearch|filter|block")
    df_sub = df.add_subparsers(dest="defence", required=True)
    ps = df_sub.add_parser(
        "patchsearch",
        help="poison score of each training image: CHECKPOINT [RECIPE] [key=value ...]",
        parents=[common],
    )
    ps.add_argument("target", metavar="checkpoint", help="a checkpoint written by ssl-lib train")
    fl = df_sub.add_parser(
        "filter",
        help="poison classifiers remove images: SEARCH_DIR [RECIPE] [key=value ...]",
        parents=[common],
    )
    fl.add_argument(
        "target", metavar="search_dir", help="a folder written by ssl-lib defend patchsearch"
    )
    bl = df_sub.add_parser(
        "block",
        help="ViT test-time patch blocking: CHECKPOINT RECIPE [key=value ...]",
        parents=[common],
    )
    bl.add_argument("checkpoint", help="a checkpoint written by ssl-lib train (ViT backbone)")
    bl.add_argument("recipe", help="eval recipe with a block: section (docs/defences.md)")
    bl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. block.block_size=4")
    for p in (ps, fl):
        p.add_argument(
            "args",
            nargs="*",
            help=f"optional defence recipe (default {DEFAULT_DEFEND_RECIPE}), then overrides",
        )
    po = sub.add_parser("poison", help="poisoned data sets: ssl-lib poison make RECIPE ...")
    po_sub = po.add_subparsers(dest="action", required=True)
    pm = po_sub.add_parser(
        "make",
        help="poisoned copies, file lists and a manifest: RECIPE [key=value ...]",
        parents=[common],
    )
    pm.add_argument("recipe", help="poison recipe, e.g. poison/cifar10_targeted")
    pm.add_argument("overrides", nargs="*", help="key=value overrides, e.g. poison.rate=0.5")
    ex = sub.add_parser("export", help="write a checkpoint's backbone for torchvision / timm")
    ex.add_argument("checkpoint", help="a checkpoint written by ssl-lib train")
    ex.add_argument("out", help="the weights file to write")
    ex.add_argument("--format", help="torchvision, timm or state_dict (default: the twin)")
    ex.add_argument("--part", default="backbone", help="backbone (default) or target (EMA)")
    ex.add_argument("--force", action="store_true", help="replace an existing OUT")
    da = sub.add_parser("data", help="data tools: ssl-lib data subset ROOT ...")
    da_sub = da.add_subparsers(dest="tool", required=True)
    ds = da_sub.add_parser(
        "subset", help="seeded, class-balanced labelled file list (e.g. 1 or 10 percent)"
    )
    ds.add_argument("root", help="image folder ROOT/<class>/<image>")
    ds.add_argument("--fraction", type=float, required=True, help="share of each class, (0, 1]")
    ds.add_argument("--seed", type=int, default=0, help="seed of the choice (default 0)")
    ds.add_argument(
        "--classes", help="imagenet100 or a file of class names (default: every class folder)"
    )
    ds.add_argument("--out", required=True, help="the file list to write")
    ds.add_argument("--force", action="store_true", help="replace an existing OUT")
    cf = sub.add_parser(
        "cache-features",
        help="teacher features of a recipe's training set: TEACHER DATA_RECIPE OUT",
        parents=[common],
    )
    cf.add_argument("teacher", help="a teacher spec (.yaml) or an ssl-lib train checkpoint")
    cf.add_argument("recipe", help="training recipe whose data section is cached")
    cf.add_argument("out", help="the (new or empty) cache folder to write")
    cf.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("backbones", help="list the built-in backbones")
    sub.add_parser("views", help="list the view pipelines")
    # Reports on runs (ssl_lib.report).
    pt = sub.add_parser(
        "plot", help="curves of runs in one figure: ssl-lib plot RUN [RUN ...] --out F.png"
    )
    pt.add_argument("runs", nargs="+", metavar="RUN", help="run folders, e.g. runs/demo_msf")
    pt.add_argument("--out", required=True, help="image to write (.png, .pdf, .svg, ...)")
    rn = sub.add_parser("runs", help="one table of the runs in a folder: ssl-lib runs [DIR]")
    rn.add_argument("dir", nargs="?", default="runs", help="folder searched (default: runs)")
    return parser


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv``; returns the exit code."""
    args = _parser().parse_args(argv)
    console.set_quiet(args.quiet)
    if args.command == "methods":
        from ssl_lib.methods import METHODS

        print("\n".join(METHODS.names()))
    elif args.command == "recipes":
        print("\n".join(list_recipes()))
    elif args.command == "backbones":
        from ssl_lib.models import backbone_names

        print("\n".join(backbone_names() + ["timm:<model name> (needs timm)"]))
    elif args.command == "views":
        from ssl_lib.data import VIEWS

        print("\n".join(VIEWS.names()))
    elif args.command == "train":
        from ssl_lib.methods.base import NonFiniteLossError
        from ssl_lib.train import CollectiveTimeoutError, resume, train

        try:
            if args.resume:
                overrides = ([args.recipe] if args.recipe else []) + args.overrides
                resume(args.resume, overrides)
            elif not args.recipe:
                raise ConfigError("ssl-lib train needs a RECIPE (or --resume RUN_DIR)")
            else:
                train(load_config(args.recipe, args.overrides))
        except (NonFiniteLossError, CollectiveTimeoutError) as err:  # a failed run: status 1
            print(f"ssl-lib: error: {err}", file=sys.stderr)
            return 1
    elif args.command == "eval":
        evaluate(args.protocol, args.checkpoint, args.args)
    elif args.command == "data":
        from ssl_lib.data.subsets import write_labelled_subset

        print(
            write_labelled_subset(
                args.root, args.out, args.fraction, args.seed, args.classes, args.force
            )
        )
    elif args.command == "defend" and args.defence == "block":
        from ssl_lib.eval.blocking import block_table, run_block

        record, path = run_block(args.checkpoint, load_eval_config(args.recipe, args.overrides))
        r = record["results"]
        print(
            f"test-time blocking of {args.checkpoint} (target '{r['target_class']}', "
            f"{r['block_size']} px square, {record['num_val']} clean / {r['num_patched']} "
            "patched val images)"
        )
        print(block_table(r))
        print(f"results:      {path}")
    elif args.command == "defend":
        defend(args.defence, args.target, args.args)
    elif args.command == "poison":
        poison_make(args.recipe, args.overrides)
    elif args.command == "export":
        from ssl_lib.export import export_weights

        exported = export_weights(args.checkpoint, args.out, args.format, args.part, args.force)
        print(exported.summary())
    elif args.command == "cache-features":
        from ssl_lib.distill.command import cache_features

        path = cache_features(
            args.teacher, args.recipe, args.out, args.overrides, not console.is_quiet()
        )
        print(f"teacher cache: {path}")
    elif args.command == "plot":
        from ssl_lib.report import load_run, plot_runs

        print(f"plot:         {plot_runs([load_run(r) for r in args.runs], args.out)}")
    elif args.command == "runs":
        from ssl_lib.report import find_runs, runs_table

        print(runs_table(find_runs(args.dir), args.dir))
    return 0


def poison_make(recipe: str, overrides: list[str]) -> None:
    """``ssl-lib poison make RECIPE [key=value ...]``: prints what was written."""
    from ssl_lib.backdoor.config import load_poison_config
    from ssl_lib.backdoor.make import make_poison

    out, manifest = make_poison(load_poison_config(recipe, overrides), not console.is_quiet())
    attack, rate = manifest["attack"], manifest["attack"]["rate"]
    target = attack["target"]
    named = "none (untargeted)" if target is None else f"{target['name']} (label {target['label']})"
    print(f"target:       {named}")
    print(
        f"poisoned:     {rate['num_poisoned']} of {rate['num_candidates']} candidates "
        f"({rate['of_candidates']:.4f}); {rate['of_train']:.4%} of {rate['num_train']} "
        "training images"
    )
    print(f"patched val:  {len(manifest['val'])} images")
    print(f"output:       {out}")


def _recipe_and_overrides(args: list[str], default: str) -> tuple[str, list[str]]:
    """``[RECIPE] [key=value ...]``: the recipe (``default`` when the first word is an
    override) and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return default, args


def evaluate(protocol: str, checkpoint: str, args: list[str]) -> None:
    """``ssl-lib eval knn|linear|cluster|backdoor CHECKPOINT [RECIPE] [key=value ...]``: table
    and JSON."""
    from ssl_lib.eval.runner import results_table, run_cluster, run_knn, run_linear

    cfg = load_eval_config(*_recipe_and_overrides(args, DEFAULT_EVAL_RECIPES[protocol]))
    if protocol == "backdoor":
        from ssl_lib.backdoor.evaluate import backdoor_table, run_backdoor

        record, folder = run_backdoor(checkpoint, cfg)
        print(
            f"backdoor evaluation of {checkpoint} ({record['num_train']} train / "
            f"{record['num_val']} clean val / {record['results']['num_patched']} patched val "
            f"images, {len(record['classes'])} classes, probe {cfg.backdoor.probe})"
        )
        print(backdoor_table(record["results"]))
        print(f"results:      {folder}")
        return
    runners = {"knn": run_knn, "linear": run_linear, "cluster": run_cluster}
    record, path = runners[protocol](checkpoint, cfg)
    print(
        f"{protocol} evaluation of {checkpoint} ({record['num_train']} train / "
        f"{record['num_val']} val images, {len(record['classes'])} classes)"
    )
    print(results_table(protocol, record["results"]))
    print(f"results:      {path}")
    if protocol == "cluster":
        print(f"confusion:    {path.with_suffix('.png')}")


def defend(defence: str, target: str, args: list[str]) -> None:
    """``ssl-lib defend patchsearch CHECKPOINT|filter SEARCH_DIR [RECIPE] [key=value ...]``."""
    cfg = load_defend_config(*_recipe_and_overrides(args, DEFAULT_DEFEND_RECIPE))
    if defence == "patchsearch":
        from ssl_lib.defend.patchsearch import run_patchsearch

        record, folder = run_patchsearch(target, cfg)
        print(
            f"patchsearch of {target}: {record['num_scored']} of {record['num_images']} images "
            f"scored in {len(record['rounds'])} rounds, {record['num_clusters']} clusters"
        )
    else:
        from ssl_lib.defend.filter import run_filter

        record, folder = run_filter(target, cfg)
        print(
            f"filter of {target}: {record['num_removed']} of {record['num_images']} images removed"
        )
    for key, value in (record.get("metrics") or {}).items():
        print(f"  {key:<14} {value if value is None or isinstance(value, int) else f'{value:.4f}'}")
    print(f"results:      {folder}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: user errors print one line and exit with status 2.

    A NaN / Inf training loss or a collective across processes that timed out prints one line
    and exits with status 1; SIGTERM during training writes a checkpoint and exits with status
    143.
    """
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        print(f"ssl-lib: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
