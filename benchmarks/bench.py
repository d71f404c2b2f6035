"""Benchmark: every preset's training loop against its baselines, in one process on one machine.

    python benchmarks/bench.py [--preset mlp selfcond cgan] [--epochs N] [--device auto|cpu|cuda]
                               [--precision fp32 bf16] [--threads N] [--train-images N]
                               [--out benchmarks/results/NAME.json] [--full-gpu-run]

For each preset (default: all; each is params.yaml with conf/model/<preset>.yaml over it), in
this order:
  1. the machine's rates at the shapes of one training step of the project's loop (machine.py):
     GFLOP/s of its matrix products (fp32, bf16 where run, and fp32 through oneDNN on CPU) and of
     its convolutions, forward and backward, replayed as recorded (flops.products);
  2. the FLOPs per epoch of each loop (flops.py), counted from the preset's nets, split into matrix
     products and convolutions;
  3. the loops, interleaved epoch by epoch (timing.py): the baselines built and run for a warm-up
     epoch each: the plain eager loop of the preset's nets (plain_loop.py), and for the MLP the
     tutorial's loop too (reference_loop.py: DataLoader, per-sample transforms); then for each
     precision of the project's loop (fp32, plus bf16 by default where the CPU has native bf16
     instructions or the GPU supports it): mnist_gan.training.train for 1 warm-up epoch plus
     `--epochs` timed epochs, each followed by one epoch of every baseline;
  4. with --full-gpu-run on CUDA: the project's full default run (params.yaml's preset and epochs).

The floor of a row: the project's FLOPs at the machine's rates in the row's precision, matrix
products at the matmul rate and convolutions at the conv rate; % floor is it over the row's
s/epoch. It prints a table per preset and writes the same as JSON.

Data: the real MNIST in data/MNIST/raw when it is there, else (or with --train-images) random
pixels of MNIST's shape written as IDX files to a temporary folder: speed does not depend on
pixel values.

Imports only torch, torchvision, numpy, yaml, the standard library and mnist_gan's training core:
it runs where mlflow and dvc are not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import flops
import numpy as np
import timing
import torch
import yaml
from machine import OtherLoad, conv_rate, describe, matmul_rate, native_bf16
from plain_loop import PlainLoop
from reference_loop import D_HIDDEN, D_NOISE

from mnist_gan.data import RAW_FILES, load_split, write_idx
from mnist_gan.models import MKL_FP32
from mnist_gan.params import MODELS, Params, load_params, parse_params, resolve_device

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 60_000, 10_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_EPOCHS = {"mlp": 3}  # timed epochs; the conv presets' take 30-60 s each on 2 cores: 1
MLP_TARGET = 4.0  # the MLP's fp32 ratio to the tutorial's loop, where oneDNN's fp32 rate is
ONEDNN_WITHIN = 1.2  # within 20 % of torch.mm's (issue 19)


def dataset(tmp: Path, n_train: int | None) -> tuple[Path, str]:
    """The folder holding MNIST/raw/: the real one if present and no n_train is asked for, else
    random IDX data of n_train (default 60000) training images."""
    real = ROOT / "data"
    if n_train is None and all((real / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
        return real, "real MNIST (data/MNIST/raw)"
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train or N_TRAIN), ("t10k", N_TEST)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp, "random pixels of MNIST's shape"


def preset_params(preset: str, device: torch.device) -> Params:
    """params.yaml with conf/model/<preset>.yaml's keys over it: what `dvc exp run -S
    model=<preset>` composes (conf/config.yaml, then the model group), read here as plain YAML so
    that the bench runs without DVC and Hydra (the GPU machine has neither). No checkpoints."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text()))
    return dataclasses.replace(parse_params(raw), checkpoint_every=0, device=device.type)


def machine_rates(device: torch.device, params: Params,
                  precisions: list[str]) -> tuple[dict[str, dict[str, float]], float]:
    """GFLOP/s at the matrix products and at the convolutions of one project training step, per
    precision (fp32 always; and fp32 matmuls through oneDNN on CPU), and the CPU share other
    processes took meanwhile."""
    nets = flops.nets(params.model, params.d_noise, params.width, params.codes)
    gemms, convs = flops.products(flops.project_step, *nets, params.batch_size)
    rates: dict[str, dict[str, float]] = {"matmul": {}, "conv": {}}
    with OtherLoad() as others:
        for p in sorted(set(precisions) | {"fp32"}):
            rates["matmul"][p] = matmul_rate(device, DTYPES[p], gemms)
            if convs:
                rates["conv"][p] = conv_rate(device, DTYPES[p], convs)
        if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            rates["matmul"]["fp32_onednn"] = matmul_rate(device, torch.float32, gemms, onednn=True)
    return rates, others.share


def floor_seconds(work: flops.Flops, rates: dict[str, dict[str, float]], precision: str,
                  matmul: str | None = None) -> float:
    """Seconds of `work` at the machine's rates: products at the matmul rate (`matmul`: which
    one, default the precision's), convolutions at the conv rate of the precision."""
    seconds = work.matmul / (rates["matmul"][matmul or precision] * 1e9)
    if work.conv:
        seconds += work.conv / (rates["conv"][precision] * 1e9)
    return seconds


def epoch_flops(params: Params, n_train: int, n_test: int) -> dict[str, flops.Flops]:
    """FLOPs per epoch of each loop: the project's and the plain loop's on params' preset, the
    tutorial's on its MLP."""
    nets = flops.nets(params.model, params.d_noise, params.width, params.codes)
    b = params.batch_size
    counts = {"project": flops.epoch_flops(flops.project_step, *nets, n_train, n_test, b),
              "plain": flops.epoch_flops(flops.plain_step, *nets, n_train, n_test, b)}
    if params.model == "mlp":
        tutorial = flops.nets("mlp", D_NOISE, D_HIDDEN)
        counts["tutorial"] = flops.epoch_flops(flops.reference_step, *tutorial, n_train, n_test, b)
    return counts


def run_loops(root: Path, params: Params, device: torch.device, epochs: int,
              precisions: list[str]) -> list[dict[str, Any]]:
    """One row per baseline, then one per precision of the project's loop, interleaved."""
    baselines: dict[str, timing.Baseline] = {}
    memory: dict[str, dict[str, Any]] = {}
    if params.model == "mlp":
        baselines["tutorial"], memory["tutorial"] = timing.warm_up(
            lambda: timing.ReferenceLoop(root, params, device), device)

    def plain() -> PlainLoop:
        train_images, test_images, labels = timing.load_mnist(root, device)
        return PlainLoop(params, train_images, test_images, labels, device)

    baselines["plain"], memory["plain"] = timing.warm_up(plain, device)
    projects = []
    for precision in precisions:
        projects.append(timing.time_project(root, params, device, epochs, precision, baselines))
        print(f"  {params.model} project {precision} done: {projects[-1]['mean_epoch_seconds']:.2f} s/epoch, "
              + ", ".join(f"{name} meanwhile {statistics.fmean(projects[-1][f'{name}_epoch_seconds']):.2f}"
                          for name in baselines), flush=True)
    rows = []
    for name, baseline in baselines.items():
        row = {**timing.summary(name, "fp32", baseline.setup_seconds, baseline.records), **memory[name]}
        for other in baselines:
            row[f"ratio_vs_{other}"] = (statistics.fmean(r["seconds"] for r in baselines[other].records[1:])
                                        / row["mean_epoch_seconds"])
        rows.append(row)
    return rows + projects


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def ratio(row: dict[str, Any], baseline: str) -> str:
    value = row.get(f"ratio_vs_{baseline}")
    return "" if value is None else f"{value:.2f}x"


def print_table(preset: dict[str, Any]) -> None:
    rows, rates = preset["loops"], preset["rates"]
    print()
    print(f"{'preset':<6} {'loop':<9} {'prec':<5} {'warm-up s':>9} {'s/epoch':>8} {'vs plain':>8} "
          f"{'vs tut.':>7} {'cpu s':>6} {'GFLOP/s':>8} {'floor s':>8} {'% floor':>8} {'peak mem':>9} "
          f"{'busy':>5}  p_real/p_fake")
    for r in rows:
        print(f"{preset['model']:<6} {r['loop']:<9} {r['precision']:<5} {r['warmup_epoch_seconds']:>9.2f} "
              f"{r['mean_epoch_seconds']:>8.2f} {ratio(r, 'plain'):>8} {ratio(r, 'tutorial'):>7} "
              f"{r['mean_epoch_cpu_seconds']:>6.2f} {r['achieved_gflops']:>8.0f} "
              f"{r['floor_seconds']:>8.2f} {r['pct_of_floor']:>7.0f}% {mib(r['peak_memory_bytes']):>9} "
              f"{r['cpu_used_elsewhere']:>5.0%}  {r['final_p_real']:.3f}/{r['final_p_fake']:.3f}")
    work = preset["flops_per_epoch"]["project"]
    print(f"{preset['model']}: the project's {work.total / 1e9:.0f} GFLOP/epoch = {work.matmul / 1e9:.0f} in "
          f"matrix products + {work.conv / 1e9:.0f} in convolutions; rates (GFLOP/s) matmul "
          + ", ".join(f"{p} {v:.0f}" for p, v in rates["matmul"].items())
          + ("; conv " + ", ".join(f"{p} {v:.0f}" for p, v in rates["conv"].items()) if rates["conv"] else "")
          + f" (CPU used elsewhere meanwhile: {preset['rates_cpu_used_elsewhere']:.0%})")
    if "fp32_onednn" in rates["matmul"]:
        onednn = floor_seconds(work, rates, "fp32", matmul="fp32_onednn")
        print(f"{preset['model']}: fp32 floor with oneDNN's matmul rate: {onednn:.2f} s/epoch")
    if preset["model"] == "mlp":
        print(mlp_verdict(preset))


def mlp_verdict(preset: dict[str, Any]) -> str:
    """One line: does the MLP's fp32 loop hold its lead over the tutorial's loop on this CPU, and
    if not, what bounds it (from this run's figures)."""
    rows = {(r["loop"], r["precision"]): r for r in preset["loops"]}
    fp32, tutorial = rows[("project", "fp32")], rows[("tutorial", "fp32")]
    got, mm = fp32["ratio_vs_tutorial"], preset["rates"]["matmul"]
    onednn = mm.get("fp32_onednn")
    if onednn is None or onednn > ONEDNN_WITHIN * mm["fp32"]:
        return (f"mlp fp32: {got:.2f}x the tutorial's loop; the >= {MLP_TARGET:.0f}x target applies where "
                f"oneDNN's fp32 rate is within 20 % of torch.mm's, not here ("
                + (f"{onednn:.0f} vs {mm['fp32']:.0f} GFLOP/s)" if onednn else "no oneDNN on this device)"))
    if got >= MLP_TARGET:
        return f"mlp fp32: {got:.2f}x the tutorial's loop, target >= {MLP_TARGET:.0f}x met"
    # the products' share of the epoch the target allows, at the rate of the library they run in
    library, key = ("MKL", "fp32") if MKL_FP32 else ("oneDNN", "fp32_onednn")
    products = floor_seconds(preset["flops_per_epoch"]["project"], preset["rates"], "fp32", matmul=key)
    budget = tutorial["mean_epoch_seconds"] / MLP_TARGET
    if products >= budget:
        why = (f"at {library}'s rate ({mm[key]:.0f} GFLOP/s) the matrix products alone take "
               f"{products:.2f} s, more than the {budget:.2f} s that {MLP_TARGET:.0f}x allows")
    else:
        steps, rest = preset["steps_per_epoch"], fp32["mean_epoch_seconds"] - products
        why = (f"the matrix products take {products:.2f} s at {library}'s rate ({mm[key]:.0f} GFLOP/s) "
               f"of the {budget:.2f} s that {MLP_TARGET:.0f}x allows; the rest (elementwise work, Adam, "
               f"autograd, Python, the epoch's evaluation) takes {1e3 * rest / steps:.1f} ms per step of the "
               f"{steps}, against the {1e3 * (budget - products) / steps:.1f} ms left")
    return f"mlp fp32: {got:.2f}x the tutorial's loop, below the {MLP_TARGET:.0f}x target: {why}"


def bench_preset(name: str, args: argparse.Namespace, device: torch.device, root: Path,
                 precisions: list[str], n_train: int, n_test: int) -> dict[str, Any]:
    params = preset_params(name, device)
    rates, rates_busy = machine_rates(device, params, precisions)
    work = epoch_flops(params, n_train, n_test)
    epochs = args.epochs or DEFAULT_EPOCHS.get(name, 1)
    print(f"{name}: batch {params.batch_size}, {epochs} timed epoch(s) per loop after 1 warm-up", flush=True)
    rows = run_loops(root, params, device, epochs, precisions)
    for r in rows:
        r["flops_per_epoch"] = work[r["loop"]].total
        r["achieved_gflops"] = work[r["loop"]].total / r["mean_epoch_seconds"] / 1e9
        r["floor_seconds"] = floor_seconds(work["project"], rates, r["precision"])
        r["pct_of_floor"] = 100 * r["floor_seconds"] / r["mean_epoch_seconds"]
    return {"model": name, "batch_size": params.batch_size,
            "steps_per_epoch": math.ceil(n_train / params.batch_size), "epochs": epochs, "rates": rates,
            "rates_cpu_used_elsewhere": rates_busy, "flops_per_epoch": work, "loops": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=MODELS, default=list(MODELS),
                        help="presets to measure (default: all)")
    parser.add_argument("--epochs", type=int,
                        help="timed epochs per loop, after 1 warm-up (default: 3 for mlp, 1 for the "
                             "conv presets)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"),
                        help="project loop precisions (default: fp32, plus bf16 where native)")
    parser.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/<device>.json)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's own, one per core); 1 where other work "
                             "shares the cores")
    parser.add_argument("--train-images", type=int,
                        help="random data with this many training images (a quick check; default: the "
                             "real MNIST when present, else 60000 random ones)")
    parser.add_argument("--full-gpu-run", action="store_true",
                        help="on CUDA, also time the project's full default run (params.yaml's epochs)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.train_images is not None and args.train_images < 1:
        parser.error("--train-images must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to PyTorch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precisions = args.precision or (["fp32", "bf16"] if native_bf16(device) else ["fp32"])
    info = describe(device)
    print(f"machine: {info['device']}, {info['cores']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads, {info['cpu_capability']}), "
          f"native bf16: {info['native_bf16']}")

    with tempfile.TemporaryDirectory(prefix="mnist-gan-bench-") as tmp:
        root, data_kind = dataset(Path(tmp), args.train_images)
        n_train = len(load_split(root / "MNIST" / "raw", train=True)[1])
        n_test = len(load_split(root / "MNIST" / "raw", train=False)[1])
        print(f"data: {data_kind}; {n_train} train / {n_test} test; presets {', '.join(args.preset)}; "
              f"precisions {', '.join(precisions)}", flush=True)
        presets = [bench_preset(name, args, device, root, precisions, n_train, n_test)
                   for name in args.preset]
        full = None
        if args.full_gpu_run:
            if device.type == "cuda":
                default = dataclasses.replace(load_params(ROOT / "params.yaml"), checkpoint_every=0,
                                              device=device.type, precision="fp32")
                full = timing.full_gpu_run(root, default, device)
            else:
                print("--full-gpu-run: skipped, the device is not CUDA")

    for preset in presets:
        print_table(preset)
    print("s/epoch: mean of the timed epochs (training + per-epoch evaluation; a baseline: all its epochs "
          "after its warm-up); vs plain, vs tut.: the s/epoch of the plain eager loop of the same nets, and "
          "of the tutorial's loop, run between the row's epochs, over the row's; cpu s: this process's CPU "
          "seconds per epoch; floor: the project's FLOPs at the machine's matmul and conv rates in the row's "
          f"precision; peak mem: {presets[0]['loops'][0]['peak_memory_kind']}; busy: CPU used by other "
          "processes meanwhile")
    busy = [p["rates_cpu_used_elsewhere"] for p in presets] + [r["cpu_used_elsewhere"]
                                                              for p in presets for r in p["loops"]]
    if max(busy) > 0.1:
        print("WARNING: other processes used the CPU during the measurements: the absolute times are "
              "not this machine's; rerun on a quiet machine (or compare --threads 1 runs)")
    if full is not None:
        print(f"full GPU run ({full['epochs']} epochs of params.yaml's preset): "
              f"{full['train_seconds']:.1f} s of training ({full['wall_seconds']:.1f} s wall, "
              f"first epoch {full['first_epoch_seconds']:.2f} s); "
              f"p_real {full['final_p_real']:.3f}, p_fake {full['final_p_fake']:.3f}, "
              f"peak {mib(full['peak_memory_bytes'])}")

    report = {
        "machine": info,
        "config": {"data": data_kind, "n_train": n_train, "n_test": n_test, "device": str(device),
                   "torch_threads": torch.get_num_threads(), "warmup_epochs": 1, "precisions": precisions},
        "presets": {p["model"]: {**p, "flops_per_epoch": {loop: dataclasses.asdict(f)
                                                          for loop, f in p["flops_per_epoch"].items()}}
                    for p in presets},
        "full_gpu_run": full,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return report


if __name__ == "__main__":
    main()
