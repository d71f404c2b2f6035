"""Benchmark: the tutorial's training loop against the project's, in one process on one machine.

    python benchmarks/bench.py [--epochs 3] [--device auto|cpu|cuda] [--precision fp32 bf16]
                               [--out benchmarks/results/NAME.json] [--threads N] [--full-gpu-run]

What it measures, in this order:
  1. the machine (machine.py): its CPU, and its matmul rate at the products of one training step
     of the project's loop (fp32, and bf16 where supported);
  2. the FLOPs per epoch of both loops (flops.py), counted from the nets of params.yaml's preset
     (the reference loop is the tutorial's MLP);
  3. the loops, interleaved epoch by epoch (timing.py): the reference loop
     (benchmarks/reference_loop.py: DataLoader, per-sample transforms) built, then 1 warm-up
     epoch; then for each precision of the project's loop (fp32, plus bf16 by default where the
     CPU has native bf16 instructions or the GPU supports it): mnist_gan.training.train for
     1 warm-up epoch plus `--epochs` timed epochs, each followed by one timed reference epoch;
  4. with --full-gpu-run on CUDA: the project's full default run (params.yaml's epochs).

It prints a table (seconds per epoch, ratio reference / project, achieved GFLOP/s, % of the
matmul floor, peak memory) and writes the same as JSON.

Data: the real MNIST in data/MNIST/raw when it is there, else random pixels of MNIST's shape
written as IDX files to a temporary folder: speed does not depend on pixel values.

Imports only torch, torchvision, numpy, the standard library and mnist_gan's training core:
it runs where mlflow and dvc are not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import flops
import numpy as np
import timing
import torch
from machine import OtherLoad, describe, matmul_rate, native_bf16
from reference_loop import D_HIDDEN, D_NOISE

from mnist_gan.data import RAW_FILES, load_split, write_idx
from mnist_gan.params import Params, load_params, resolve_device

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 60_000, 10_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dataset(tmp: Path) -> tuple[Path, str]:
    """The folder holding MNIST/raw/: the real one if present, else random IDX data."""
    real = ROOT / "data"
    if all((real / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
        return real, "real MNIST (data/MNIST/raw)"
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp, "random pixels of MNIST's shape (no data/MNIST/raw here)"


def matmul_rates(device: torch.device, params: Params,
                 precisions: list[str]) -> tuple[dict[str, float], float]:
    """GFLOP/s at the products of one project training step, per precision (fp32 always, and
    fp32 through oneDNN on CPU), and the CPU share other processes took meanwhile."""
    gemms = flops.gemms(flops.project_step, *flops.nets(params.model, params.d_noise, params.width),
                        params.batch_size)
    with OtherLoad() as others:
        rates = {p: matmul_rate(device, DTYPES[p], gemms) for p in sorted(set(precisions) | {"fp32"})}
        if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            rates["fp32_onednn"] = matmul_rate(device, torch.float32, gemms, onednn=True)
    return rates, others.share


def epoch_flops(params: Params, n_train: int, n_test: int) -> dict[str, int]:
    """FLOPs per epoch of each loop: the project's on params' preset, the reference's on the
    tutorial's MLP."""
    project = flops.nets(params.model, params.d_noise, params.width)
    tutorial = flops.nets("mlp", D_NOISE, D_HIDDEN)
    b = params.batch_size
    return {"reference": flops.epoch_flops(flops.reference_step, *tutorial, n_train, n_test, b),
            "project": flops.epoch_flops(flops.project_step, *project, n_train, n_test, b)}


def run_loops(root: Path, params: Params, device: torch.device, epochs: int,
              precisions: list[str]) -> list[dict[str, Any]]:
    """The reference row, then one row per precision of the project's loop, interleaved."""
    reference, reference_memory = timing.warm_up_reference(root, params, device)
    projects = []
    for precision in precisions:
        projects.append(timing.time_project(root, params, device, epochs, precision, reference))
        print(f"  project {precision} done: {projects[-1]['mean_epoch_seconds']:.2f} s/epoch, "
              f"reference meanwhile {statistics.fmean(projects[-1]['reference_epoch_seconds']):.2f}",
              flush=True)
    return [{**timing.summary("reference", "fp32", reference.setup_seconds, reference.records),
             **reference_memory, "ratio_vs_reference": 1.0, "cpu_ratio_vs_reference": 1.0}, *projects]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def print_table(results: list[dict[str, Any]], rates: dict[str, float], project_flops: int,
                n_reference_epochs: int) -> None:
    print()
    print(f"{'loop':<10} {'prec':<5} {'warm-up s':>9} {'s/epoch':>8} {'ratio':>6} {'cpu s':>6} "
          f"{'ratio':>6} {'GFLOP/s':>8} "
          f"{'floor s':>8} {'% floor':>8} {'peak mem':>9} {'busy':>5}  p_real/p_fake")
    for r in results:
        print(f"{r['loop']:<10} {r['precision']:<5} {r['warmup_epoch_seconds']:>9.2f} "
              f"{r['mean_epoch_seconds']:>8.2f} {r['ratio_vs_reference']:>5.2f}x "
              f"{r['mean_epoch_cpu_seconds']:>6.2f} {r['cpu_ratio_vs_reference']:>5.2f}x "
              f"{r['achieved_gflops']:>8.0f} "
              f"{r['floor_seconds']:>8.2f} {r['pct_of_floor']:>7.0f}% {mib(r['peak_memory_bytes']):>9} "
              f"{r['cpu_used_elsewhere']:>5.0%}  {r['final_p_real']:.3f}/{r['final_p_fake']:.3f}")
    ref = results[0]
    print(f"reference per epoch: {ref['mean_train_seconds']:.2f} s training + "
          f"{ref['mean_eval_seconds']:.2f} s evaluation; reference / fp32 floor = "
          f"{ref['mean_epoch_seconds'] / ref['floor_seconds']:.1f}x")
    print(f"s/epoch: mean of the timed epochs (training + per-epoch evaluation; the reference: all "
          f"{n_reference_epochs} of them); ratio: the s/epoch of the reference epochs run "
          "between the row's epochs over the row's; cpu s: this process's CPU seconds per epoch, "
          "and their ratio; "
          f"peak mem: {ref['peak_memory_kind']}; floor: the project's FLOPs at "
          "the matmul rate of the row's precision; busy: CPU used by other processes meanwhile")
    if "fp32_onednn" in rates:
        onednn_floor = project_flops / rates["fp32_onednn"] / 1e9
        print(f"fp32 floor at oneDNN's rate: {onednn_floor:.2f} s/epoch "
              f"(reference / that floor = {ref['mean_epoch_seconds'] / onednn_floor:.1f}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after 1 warm-up)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"),
                        help="project loop precisions (default: fp32, plus bf16 where native)")
    parser.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/<device>.json)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's own, one per core); 1 where other work "
                             "shares the cores")
    parser.add_argument("--full-gpu-run", action="store_true",
                        help="on CUDA, also time the project's full default run (params.yaml's epochs)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to PyTorch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    params = dataclasses.replace(load_params(ROOT / "params.yaml"), checkpoint_every=0, device=device.type)
    precisions = args.precision or (["fp32", "bf16"] if native_bf16(device) else ["fp32"])
    info = describe(device)
    print(f"machine: {info['device']}, {info['cores']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads, {info['cpu_capability']}), "
          f"native bf16: {info['native_bf16']}")

    # (1) the matmul rate at the GAN's shapes: the products of one project training step
    rates, rates_busy = matmul_rates(device, params, precisions)
    print("matmul rate at the GAN's GEMM shapes (torch.mm): "
          + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items() if p in DTYPES)
          + (f"; fp32 through oneDNN: {rates['fp32_onednn']:.0f} GFLOP/s" if "fp32_onednn" in rates else "")
          + f" (CPU used elsewhere meanwhile: {rates_busy:.0%})")

    with tempfile.TemporaryDirectory(prefix="mnist-gan-bench-") as tmp:
        root, data_kind = dataset(Path(tmp))
        n_train = len(load_split(root / "MNIST" / "raw", train=True)[1])
        n_test = len(load_split(root / "MNIST" / "raw", train=False)[1])
        print(f"data: {data_kind}; {n_train} train / {n_test} test, batch {params.batch_size}; "
              f"{args.epochs} timed epochs per loop after 1 warm-up epoch")
        # (2) FLOPs per epoch, from the nets
        flop_counts = epoch_flops(params, n_train, n_test)
        print(f"FLOPs per epoch (training + evaluation): reference {flop_counts['reference'] / 1e9:.0f} "
              f"GFLOP, project ({params.model}) {flop_counts['project'] / 1e9:.0f} GFLOP")
        # (3) the loops, interleaved epoch by epoch
        results = run_loops(root, params, device, args.epochs, precisions)
        # (4) the full run on the GPU
        full = None
        if args.full_gpu_run:
            if device.type == "cuda":
                full = timing.full_gpu_run(root, dataclasses.replace(params, precision="fp32"), device)
            else:
                print("--full-gpu-run: skipped, the device is not CUDA")

    for r in results:
        r["flops_per_epoch"] = flop_counts[r["loop"]]
        r["achieved_gflops"] = flop_counts[r["loop"]] / r["mean_epoch_seconds"] / 1e9
        # the floor: the project's FLOPs at the machine's matmul rate in this precision
        r["floor_seconds"] = flop_counts["project"] / (rates[r["precision"]] * 1e9)
        r["pct_of_floor"] = 100 * r["floor_seconds"] / r["mean_epoch_seconds"]

    print_table(results, rates, flop_counts["project"], len(precisions) * args.epochs)
    if max([rates_busy] + [r["cpu_used_elsewhere"] for r in results]) > 0.1:
        print("WARNING: other processes used the CPU during the measurements: the absolute times are "
              "not this machine's; rerun on a quiet machine (or compare --threads 1 runs)")
    if full is not None:
        print(f"full GPU run: {full['epochs']} epochs in {full['train_seconds']:.1f} s of training "
              f"({full['wall_seconds']:.1f} s wall, first epoch {full['first_epoch_seconds']:.2f} s), "
              f"{results[0]['mean_epoch_seconds'] * full['epochs'] / full['train_seconds']:.0f}x the "
              f"reference; p_real {full['final_p_real']:.3f}, p_fake {full['final_p_fake']:.3f}, "
              f"peak {mib(full['peak_memory_bytes'])}")

    report = {
        "machine": info,
        "config": {"epochs": args.epochs, "warmup_epochs": 1, "data": data_kind, "n_train": n_train,
                   "n_test": n_test, "batch_size": params.batch_size, "model": params.model,
                   "device": str(device), "torch_threads": torch.get_num_threads()},
        "matmul_gflops": rates,
        "matmul_cpu_used_elsewhere": rates_busy,
        "flops_per_epoch": flop_counts,
        "loops": results,
        "full_gpu_run": full,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return report


if __name__ == "__main__":
    main()
