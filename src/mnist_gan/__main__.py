"""`python -m mnist_gan COMMAND` (or `mnist-gan COMMAND`): the project's command line.

One function per subcommand, `<name>_command(args) -> exit status`, registered in
`build_parser()`; a new subcommand is one more function and one more `add_parser` block.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# failures a user can fix: one line on stderr, exit status 2, no traceback; each subcommand imports
# what it needs itself, so `generate` from a file does not load MLflow
from mnist_gan.errors import UserError, log_to_stderr

DEFAULT_STORAGE = "sqlite:///optuna.db"  # tune's study on one machine; a team's is on its PostgreSQL


def compare_command(args: argparse.Namespace) -> int:
    from mnist_gan import store
    from mnist_gan.compare import compare

    print(compare(args.tracking_uri or store.tracking_uri(), args.metric, args.ascending, args.runs,
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


def generate_command(args: argparse.Namespace) -> int:
    from mnist_gan.generate import check_output, generate, resolve_generator, sampling_device, write_samples

    check_output(args.out)
    images = generate(resolve_generator(args.model, sampling_device()), args.n, args.seed, args.digit,
                      args.code)
    write_samples(images, args.out)
    what = ("random digits" if args.digit is None and args.code is None
            else f"digit {args.digit}" if args.code is None else f"code {args.code}")
    print(f"wrote {args.out}: {args.n} samples ({what}, seed {args.seed}) of {args.model}")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    from mnist_gan import paths
    from mnist_gan.files import read_json
    from mnist_gan.registry import promote

    run_id = args.run_id or read_json(paths.TRAIN_METRICS)["mlflow_run_id"]
    print(promote(run_id).message)
    return 0


def compose_command(args: argparse.Namespace) -> int:
    from mnist_gan.composition import sync

    print(sync(Path.cwd()))
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def team_server_command(args: argparse.Namespace) -> int:
    from mnist_gan import team_server

    if args.action == "start":
        print(team_server.start(args.dir, args.host, args.port, args.pg_port, args.allowed_hosts,
                                args.artifacts_destination))
    else:
        print(team_server.stop(args.dir))
    return 0


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def tune_command(args: argparse.Namespace) -> int:
    from mnist_gan import tuning

    study = args.study or args.preset
    if args.apply_best:
        return tuning.apply_best(study, args.storage, args.heartbeat)
    log_to_stderr()
    summary, finished = tuning.tune(args.preset, study, args.storage, args.trials, args.workers,
                                    args.heartbeat)
    print(summary)
    if not finished:
        print(f"mnist-gan tune: study {study!r} holds fewer than {args.trials} COMPLETE or PRUNED trials "
              "(a worker failed: its log is above); run the same command again to go on", file=sys.stderr)
    return 0 if finished else 1


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

    gen = commands.add_parser(
        "generate", help="samples of a trained generator as a PNG grid or a .npy array",
        description="Write N samples of a generator given as a local file, an MLflow run or a "
                    "registered model alias. The same model and seed give the same images.")
    gen.add_argument("--model", default="models/generator.pt",
                     help="models/generator.pt (default), runs:/<run id> or models:/mnist-gan@champion")
    gen.add_argument("-n", "--n", type=int, default=64, help="number of samples (default: 64)")
    gen.add_argument("--digit", type=int, choices=range(10), metavar="0-9",
                     help="the digit to draw (conditional models: model=cgan)")
    gen.add_argument("--code", type=int, metavar="K",
                     help="the cluster to draw, 0 to codes-1 (model=selfcond; docs/presets.md shows "
                          "what each code of a run draws)")
    gen.add_argument("--seed", type=int, default=0, help="seed of z and labels (default: 0)")
    gen.add_argument("--out", type=Path, default=Path("samples.png"),
                     help="a .png grid or a .npy uint8 array [N, 28, 28] (default: samples.png)")
    gen.set_defaults(run=generate_command)

    prom = commands.add_parser(
        "promote", help="register a run's generator; make it the champion if its FID is lower",
        description="Register the run's generator as a version of mnist-gan in the MLflow Model "
                    "Registry and move the alias 'champion' to it only when its eval/fid beats the "
                    "current champion's.")
    prom.add_argument("--run", dest="run_id",
                      help="MLflow run id (default: the workspace's, from metrics/train.json)")
    prom.set_defaults(run=promote_command)

    comp = commands.add_parser(
        "compose", help="write params.yaml from conf/, as `dvc exp run` does (make repro runs it)",
        description="Compose conf/ into params.yaml with DVC's Hydra support, as every `dvc exp run` "
                    "does, so that `dvc repro` runs the same params. Refuses (exit 2) when params.yaml "
                    "holds uncommitted edits that composing would throw away.")
    comp.set_defaults(run=compose_command)

    team = commands.add_parser(
        "team-server", help="start or stop the team's MLflow server with logins on PostgreSQL",
        description="Start (or stop) a PostgreSQL cluster and `mlflow server --app-name basic-auth` on it, "
                    "everything kept in one folder; starting a running server only says so. docs/team.md")
    team.add_argument("action", choices=["start", "stop"])
    team.add_argument("--dir", type=Path, default=Path("team-server"),
                      help="the folder of the cluster, artifacts, logs and secrets (default: team-server)")
    team.add_argument("--host", default="127.0.0.1",
                      help="the interface mlflow server listens on (default: 127.0.0.1, loopback only)")
    team.add_argument("--port", type=_port, default=5000,
                      help="mlflow server's port (default: 5000)")
    team.add_argument("--pg-port", type=_port, default=5433,
                      help="PostgreSQL's port, on 127.0.0.1 (default: 5433)")
    team.add_argument("--allowed-hosts",
                      help="Host headers mlflow server accepts besides localhost and private IPs, "
                           "e.g. mlflow.internal:5000 (mlflow server --allowed-hosts)")
    team.add_argument("--artifacts-destination", metavar="URI",
                      help="where the server stores artifacts, e.g. s3://bucket/mlflow (needs boto3 and "
                           "the server's credentials; default: DIR/artifacts)")
    team.set_defaults(run=team_server_command)

    tune = commands.add_parser(
        "tune", help="Optuna search over a preset's params; every trial an MLflow run",
        description="Search the space of conf/search/PRESET.yaml with Optuna (TPE sampler, median pruner "
                    "on a cheap FID every few epochs) until the study holds TRIALS complete or pruned "
                    "trials. The study lives in --storage: the same command on another machine joins it, "
                    "and run again it resumes. --apply-best runs the best trial as a DVC experiment.")
    tune.add_argument("--preset", default="mlp",
                      help="the preset searched: conf/search/PRESET.yaml (default: mlp)")
    tune.add_argument("--study", help="the study's name (default: the preset's)")
    tune.add_argument("--storage", default=DEFAULT_STORAGE,
                      help="the study's storage: sqlite:///FILE, or the team server's "
                           "postgresql+psycopg2://mlflow@HOST:PORT/optuna (default: %(default)s)")
    tune.add_argument("--trials", type=_at_least_one, default=20,
                      help="complete or pruned trials the study should hold (default: 20)")
    tune.add_argument("--workers", type=_at_least_one, default=1,
                      help="worker processes on this machine (default: 1)")
    tune.add_argument("--heartbeat", type=_at_least_one, default=60,
                      help="seconds between a worker's heartbeats; a trial whose beat is two beats "
                           "late is FAIL (default: 60)")
    tune.add_argument("--apply-best", action="store_true",
                      help="run `dvc exp run -S ...` with the best trial's params instead of searching")
    tune.set_defaults(run=tune_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"mnist-gan {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
