"""`python -m mnist_gan COMMAND` (or `mnist-gan COMMAND`): the project's command line.

One function per subcommand, `<name>_command(args) -> exit status`, registered in
`build_parser()`; a new subcommand is one more function and one more `add_parser` block.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mnist_gan import tracking
from mnist_gan.compare import CompareError
from mnist_gan.metrics_diff import MetricsDiffError
from mnist_gan.params import ParamsError

# failures a user can fix: one line on stderr, exit status 2, no traceback
USER_ERRORS = (CompareError, MetricsDiffError, ParamsError, tracking.TrackingError)


def compare_command(args: argparse.Namespace) -> int:
    from mnist_gan.compare import compare

    print(compare(args.tracking_uri or tracking.tracking_uri(), args.metric, args.ascending, args.runs,
                  None if args.plot == "" else args.plot))
    return 0


def metrics_diff_command(args: argparse.Namespace) -> int:
    from mnist_gan.metrics_diff import report
    from mnist_gan.params import load_params

    ci = load_params().ci
    if args.metric:
        ci = dataclasses.replace(ci, metric=args.metric)
    markdown, verdict = report(args.rev, args.new, ci)
    print(markdown)
    if not verdict.ok:
        print(f"metrics-diff: {verdict.message.replace('**', '').replace('`', '')}", file=sys.stderr)
    return 0 if verdict.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-gan", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compare = commands.add_parser(
        "compare", help="table and plot of the experiment's MLflow runs, best first",
        description="Print the params that differ and the final metrics of the MLflow runs of the "
                    "experiment, sorted by one metric, and plot their per-epoch traces.")
    compare.add_argument("--metric", default="fid",
                         help="sort by this metric: eval/<metric> if logged, else <metric> (default: fid)")
    order = compare.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=True,
                       help="lowest first (default; right for fid)")
    order.add_argument("--descending", dest="ascending", action="store_false",
                       help="highest first (precision, recall, ...)")
    compare.add_argument("--runs", type=int, default=10, metavar="N", help="the N best runs (default: 10)")
    compare.add_argument("--plot", default="plots/compare.png", metavar="PNG",
                         help="where to draw the traces (default: plots/compare.png; '' for none)")
    compare.add_argument("--tracking-uri",
                         help="default: MLFLOW_TRACKING_URI, else mlflow.db at the repo root")
    compare.set_defaults(run=compare_command)

    diff = commands.add_parser(
        "metrics-diff", help="dvc metrics/params diff as Markdown; exit 1 if ci.metric regressed",
        description="Markdown of `dvc metrics diff` and `dvc params diff` from REV to the workspace "
                    "(or NEW); exit status 1 when the metric named by ci.metric in params.yaml got worse "
                    "by more than ci.max_regression.")
    diff.add_argument("--rev", default="main", help="baseline git revision or experiment (default: main)")
    diff.add_argument("--new", help="revision or experiment to judge (default: the workspace)")
    diff.add_argument("--metric", help="gate on this metric instead of ci.metric")
    diff.set_defaults(run=metrics_diff_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"mnist-gan {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
