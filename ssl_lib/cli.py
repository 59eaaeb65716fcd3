"""The ``ssl-lib`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ssl_lib import console
from ssl_lib.checkpoints import CheckpointError
from ssl_lib.config import ConfigError, list_recipes, load_config, load_eval_config
from ssl_lib.data.datasets import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)
DEFAULT_EVAL_RECIPES = {"knn": "eval/knn_umbc", "linear": "eval/linear_cached"}


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
    ev = sub.add_parser("eval", help="evaluate a checkpoint: ssl-lib eval knn|linear CKPT ...")
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
    df = sub.add_parser("defend", help="backdoor defences: ssl-lib defend block CKPT RECIPE ...")
    df_sub = df.add_subparsers(dest="defence", required=True)
    bl = df_sub.add_parser(
        "block",
        help="ViT test-time patch blocking: CHECKPOINT RECIPE [key=value ...]",
        parents=[common],
    )
    bl.add_argument("checkpoint", help="a checkpoint written by ssl-lib train (ViT backbone)")
    bl.add_argument("recipe", help="eval recipe with a block: section (docs/defences.md)")
    bl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. block.block_size=4")
    ex = sub.add_parser("export", help="write a checkpoint's backbone for torchvision / timm")
    ex.add_argument("checkpoint", help="a checkpoint written by ssl-lib train")
    ex.add_argument("out", help="the weights file to write")
    ex.add_argument("--format", help="torchvision, timm or state_dict (default: the twin)")
    ex.add_argument("--part", default="backbone", help="backbone (default) or target (EMA)")
    ex.add_argument("--force", action="store_true", help="replace an existing OUT")
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
    elif args.command == "defend":
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
    elif args.command == "export":
        from ssl_lib.export import export_weights

        exported = export_weights(args.checkpoint, args.out, args.format, args.part, args.force)
        print(exported.summary())
    elif args.command == "plot":
        from ssl_lib.report import load_run, plot_runs

        print(f"plot:         {plot_runs([load_run(r) for r in args.runs], args.out)}")
    elif args.command == "runs":
        from ssl_lib.report import find_runs, runs_table

        print(runs_table(find_runs(args.dir), args.dir))
    return 0


def evaluate(protocol: str, checkpoint: str, args: list[str]) -> None:
    """``ssl-lib eval knn|linear CHECKPOINT [RECIPE] [key=value ...]``: table and JSON."""
    from ssl_lib.eval.runner import results_table, run_knn, run_linear

    recipe = DEFAULT_EVAL_RECIPES[protocol]
    if args and "=" not in args[0]:
        recipe, args = args[0], args[1:]
    cfg = load_eval_config(recipe, args)
    record, path = (run_knn if protocol == "knn" else run_linear)(checkpoint, cfg)
    print(
        f"{protocol} evaluation of {checkpoint} ({record['num_train']} train / "
        f"{record['num_val']} val images, {len(record['classes'])} classes)"
    )
    print(results_table(protocol, record["results"]))
    print(f"results:      {path}")


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
