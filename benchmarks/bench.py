"""Benchmark: the tutorial's training loop against the project's, in one process on one machine.

    python benchmarks/bench.py [--epochs 3] [--device auto|cpu|cuda] [--precision fp32 bf16]
                               [--out benchmarks/results/NAME.json] [--full-gpu-run]

What it measures, in this order:
  1. the machine's matmul rate at the GAN's own GEMM shapes (fp32, and bf16 where supported);
  2. the reference loop (benchmarks/reference_loop.py: DataLoader, per-sample transforms):
     built, then 1 warm-up epoch;
  3. for each precision of the project's loop (fp32, plus bf16 by default where the CPU has
     native bf16 instructions or the GPU supports it): mnist_gan.training.train for 1 warm-up
     epoch plus `--epochs` timed epochs, each timed epoch followed by one timed epoch of the
     reference loop. Every epoch = training + the per-epoch evaluation. Interleaved, the two
     loops see the same machine: on a shared VM the speed of both drifts by 10-30 % from one
     minute to the next, which one loop after the other turns into a wrong ratio;
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
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from reference_loop import build_reference, evaluate, run_epoch

from mnist_gan.data import load_split, to_model_input, write_idx
from mnist_gan.params import Params, load_params, resolve_device
from mnist_gan.training import train

ROOT = Path(__file__).resolve().parents[1]
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
N_TRAIN, N_TEST = 60_000, 10_000


# ---------------------------------------------------------------------------------------------
# FLOP count, analytically from the layer shapes
# ---------------------------------------------------------------------------------------------
# A Linear layer y = x W^T + b with x [M, K], W [N, K] costs one GEMM of 2*M*K*N FLOPs forward
# ("fwd"), the same again for the gradient of its input dX = dY W ("dgrad") and for the gradient
# of its weight dW = dY^T X ("wgrad"). Elementwise work (activations, dropout, Adam) is O(M*N),
# a few % at these sizes, and left out. Per training batch of B images:
#
#   project loop (mnist_gan.training):
#     D step: G fwd on B (no grad) · D fwd on 2B (real and fake concatenated) ·
#             D backward on 2B: wgrad of every D layer, dgrad of all but the first
#             (neither the images nor the detached fake need a gradient)
#     G step: G fwd on B · D fwd on B · D backward on B: dgrad only (D's weights are frozen) ·
#             G backward on B: wgrad of every G layer, dgrad of all but the first (z needs none)
#   reference loop (the tutorial):
#     D step: D fwd on B real · G fwd on B · D fwd on B fake · backward: D wgrad twice (real and
#             fake), D dgrad on the fake incl. the first layer and on the real but for the first,
#             and a full G backward (the fake is not detached, so G's gradients are computed and
#             thrown away by the next zero_grad)
#     G step: G fwd · D fwd · D backward with wgrad too (D's weights still require grad) ·
#             G backward as in the project
#   evaluation, both: D fwd on the n_test images, G fwd and D fwd on n_test fresh samples.
#
# For MNIST (60k/10k, B = 200, 100-256-256-784 and 784-256-256-1) this gives ~361 GFLOP per
# epoch for the project's loop and ~484 GFLOP for the reference's. SPEC's "~430 GFLOP" is the
# usual rule of thumb (backward = 2x forward, G forward only in the D step): 2*60k*(4 G + 9 D)
# MACs = 428 GFLOP; the counts here follow the passes each loop actually runs.

def layer_shapes(d_noise: int, d_hidden: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) of each Linear layer of the generator and of the discriminator."""
    generator = [(d_noise, d_hidden), (d_hidden, d_hidden), (d_hidden, 28 * 28)]
    discriminator = [(28 * 28, d_hidden), (d_hidden, d_hidden), (d_hidden, 1)]
    return generator, discriminator


def gemms(layers: list[tuple[int, int]], m: int, kinds: str, first_dgrad: bool = True,
          ) -> list[tuple[str, int, int, int]]:
    """The GEMMs (kind, M, K, N) of passing M rows through `layers`; kinds from 'fwd dgrad wgrad'."""
    out = []
    for i, (k, n) in enumerate(layers):
        for kind in kinds.split():
            if kind != "dgrad" or first_dgrad or i > 0:
                out.append((kind, m, k, n))
    return out


def step_gemms(loop: str, b: int, d_noise: int, d_hidden: int) -> list[tuple[str, int, int, int]]:
    """The GEMMs of one training step (D step + G step) of `loop` on a batch of `b` images."""
    g, d = layer_shapes(d_noise, d_hidden)
    if loop == "project":
        return (gemms(g, b, "fwd") + gemms(d, 2 * b, "fwd wgrad", ) + gemms(d, 2 * b, "dgrad", False)
                + gemms(g, b, "fwd") + gemms(d, b, "fwd dgrad")
                + gemms(g, b, "wgrad") + gemms(g, b, "dgrad", False))
    # reference: D step (real, then fake through G with grad), then G step
    return (gemms(d, b, "fwd wgrad") + gemms(d, b, "dgrad", False)
            + gemms(g, b, "fwd wgrad") + gemms(g, b, "dgrad", False) + gemms(d, b, "fwd wgrad dgrad")
            + gemms(g, b, "fwd wgrad") + gemms(g, b, "dgrad", False) + gemms(d, b, "fwd wgrad dgrad"))


def gemm_flops(shapes: list[tuple[str, int, int, int]]) -> int:
    return sum(2 * m * k * n for _, m, k, n in shapes)


def epoch_flops(loop: str, n_train: int, n_test: int, b: int, d_noise: int, d_hidden: int) -> int:
    """FLOPs of one epoch of `loop`: its training steps plus the per-epoch evaluation."""
    g, d = layer_shapes(d_noise, d_hidden)
    steps = -(-n_train // b)
    evaluation = gemm_flops(gemms(d, n_test, "fwd") + gemms(g, n_test, "fwd") + gemms(d, n_test, "fwd"))
    return steps * gemm_flops(step_gemms(loop, b, d_noise, d_hidden)) + evaluation


# ---------------------------------------------------------------------------------------------
# The machine: matmul rate, bf16 support, description
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, shapes: list[tuple[str, int, int, int]],
                seconds: float = 1.0, onednn: bool = False) -> float:
    """GFLOP/s of running `shapes` (one project training step's GEMMs, in the layouts nn.Linear
    uses) back to back; the best of 3 timed rounds after a warm-up.

    `onednn`: the same GEMMs through oneDNN (CPU). PyTorch sends fp32 matmuls to MKL, which on
    AMD CPUs runs its AVX2 code path; oneDNN uses AVX-512 there, so it shows what the machine can do.
    """
    mm = torch.mm
    if onednn:
        def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a @ b as oneDNN's a @ (b^T)^T
            return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    operands = []
    for kind, m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        operands.append((kind, x, w, dy))

    def run_once() -> None:
        for kind, x, w, dy in operands:
            if kind == "fwd":
                mm(x, w.t())
            elif kind == "dgrad":
                mm(dy, w)
            else:
                mm(dy.t(), x)

    run_once()
    sync(device)
    started = time.perf_counter()
    reps = 0
    while time.perf_counter() - started < 0.2:  # warm-up and calibration
        run_once()
        reps += 1
    sync(device)
    reps = max(1, int(reps * seconds / 0.2 / 3))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(reps):
            run_once()
        sync(device)
        best = min(best, (time.perf_counter() - started) / reps)
    return gemm_flops(shapes) / best / 1e9


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> bool:
    """bf16 runs in hardware: a GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def machine(device: torch.device) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({model})",
    }


# ---------------------------------------------------------------------------------------------
# Peak memory of one loop
# ---------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while the block runs. On CUDA: torch.cuda.max_memory_allocated after a reset.
    On CPU: the kernel's peak resident set (VmHWM), reset at entry by writing 5 to
    /proc/self/clear_refs, minus the resident set at entry. getrusage's ru_maxrss cannot be reset,
    and a thread sampling the RSS would take a core from the timed loop's OpenMP threads (measured:
    ~10 % slower epochs on 2 cores)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS increase"
        self.peak_bytes = 0

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/self/status")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._status_kib("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # the peak then covers the process so far, earlier loops included
                self.kind = "cpu peak RSS increase (not reset: /proc/self/clear_refs not writable)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = (self._status_kib("VmHWM") - self._base) * 1024


class OtherLoad:
    """The share of the machine's CPU time that *other* processes used while the block ran (0 = the
    machine was ours, 1 = every core busy elsewhere), from /proc/stat minus this process's own
    /proc/self/stat. Timings taken while other work shares the cores are not the machine's: with
    torch's default of one thread per core, an OpenMP thread that loses its core stalls the other."""

    share = 0.0

    @staticmethod
    def _ticks() -> tuple[int, int]:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]  # all but idle and iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime + stime of all our threads

    def __enter__(self) -> OtherLoad:
        self._start, self._t0 = self._ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        (busy0, own0), (busy1, own1) = self._start, self._ticks()
        available = (time.perf_counter() - self._t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        self.share = max(0.0, (busy1 - busy0) - (own1 - own0)) / available


def release_free_heap() -> None:
    """Give memory freed by the previous loop back to the OS (glibc), so it does not hide the
    next loop's growth in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# The two loops
# ---------------------------------------------------------------------------------------------

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


class ReferenceLoop:
    """The tutorial's loop, run one epoch (training + its evaluation) at a time."""

    def __init__(self, root: Path, params: Params, device: torch.device):
        self.device = device
        started = time.perf_counter()
        self.ref = build_reference(root, device, params.seed, params.batch_size, params.lr)
        self.setup_seconds = time.perf_counter() - started
        self.records: list[dict[str, float]] = []

    def epoch(self) -> dict[str, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        run_epoch(self.ref)
        sync(self.device)
        trained = time.perf_counter()
        p_real, p_fake = evaluate(self.ref)
        done = time.perf_counter()
        self.records.append({"seconds": done - started, "train_seconds": trained - started,
                             "eval_seconds": done - trained,
                             "cpu_seconds": time.process_time() - cpu_started,
                             "p_real": p_real, "p_fake": p_fake})
        return self.records[-1]


class Interleave:
    """A training Tracker for the project's loop: notes this process's CPU time of every epoch,
    and after each timed epoch (all but the first) runs one epoch of the reference loop.

    train() times an epoch before it calls log_epoch and starts the next one's clock after
    it returns, so the reference epoch counts in neither. CPU seconds complement wall seconds
    where other processes share the cores; with more than one thread they include OpenMP's
    spin-waiting, so read them as a cost, not a time."""

    run_id = None

    def __init__(self, reference: ReferenceLoop) -> None:
        self.reference = reference
        self.cpu_seconds: list[float] = []
        self.reference_records: list[dict[str, float]] = []
        self._last = time.process_time()

    def log_epoch(self, record: dict[str, float]) -> None:
        self.cpu_seconds.append(time.process_time() - self._last)
        if len(self.cpu_seconds) > 1:
            self.reference_records.append(self.reference.epoch())
        self._last = time.process_time()

    def log_samples(self, epoch: int, images: torch.Tensor) -> None:
        self._last = time.process_time()  # drawing the sample grid is not part of the epoch


def warm_up_reference(root: Path, params: Params,
                      device: torch.device) -> tuple[ReferenceLoop, dict[str, Any]]:
    """The reference loop, built and run for its warm-up epoch; its peak memory is measured here
    (later epochs allocate only batches)."""
    with PeakMemory(device) as memory, OtherLoad() as others:
        reference = ReferenceLoop(root, params, device)
        reference.epoch()
    return reference, measured(memory, others)


def time_project(root: Path, params: Params, device: torch.device, epochs: int, precision: str,
                 reference: ReferenceLoop) -> dict[str, Any]:
    """The project's loop for 1 + `epochs` epochs, each timed one followed by a reference epoch."""
    raw = root / "MNIST" / "raw"
    with PeakMemory(device) as memory, OtherLoad() as others:
        started = time.perf_counter()
        train_images = to_model_input(load_split(raw, train=True)[0]).to(device)
        test_images = to_model_input(load_split(raw, train=False)[0]).to(device)
        sync(device)
        setup = time.perf_counter() - started
        run = dataclasses.replace(params, epochs=1 + epochs, precision=precision)
        interleave = Interleave(reference)
        result = train(run, train_images, test_images, device, tracker=interleave)
        records = [{"seconds": r["seconds"], "cpu_seconds": cpu, "p_real": r["p_real"], "p_fake": r["p_fake"]}
                   for r, cpu in zip(result.history, interleave.cpu_seconds, strict=True)]
        del result, train_images, test_images
    out = summary("project", precision, setup, records)
    paired = interleave.reference_records
    out.update({
        **measured(memory, others),
        "reference_epoch_seconds": [r["seconds"] for r in paired],
        "ratio_vs_reference": statistics.fmean(r["seconds"] for r in paired) / out["mean_epoch_seconds"],
        "cpu_ratio_vs_reference": (statistics.fmean(r["cpu_seconds"] for r in paired)
                                   / out["mean_epoch_cpu_seconds"]),
    })
    return out


def measured(memory: PeakMemory, others: OtherLoad) -> dict[str, Any]:
    """A loop's peak memory and the CPU share other processes took meanwhile."""
    return {"peak_memory_bytes": memory.peak_bytes, "peak_memory_kind": memory.kind,
            "cpu_used_elsewhere": others.share}


def summary(loop: str, precision: str, setup: float, records: list[dict[str, float]]) -> dict[str, Any]:
    """Means over `records[1:]`; records[0] is the warm-up epoch."""
    timed = records[1:]
    out = {
        "loop": loop,
        "precision": precision,
        "setup_seconds": setup,
        "warmup_epoch_seconds": records[0]["seconds"],
        "epoch_seconds": [r["seconds"] for r in timed],
        "mean_epoch_seconds": statistics.fmean(r["seconds"] for r in timed),
        "mean_epoch_cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in timed),
        "final_p_real": timed[-1]["p_real"],
        "final_p_fake": timed[-1]["p_fake"],
    }
    if "train_seconds" in timed[0]:
        out["mean_train_seconds"] = statistics.fmean(r["train_seconds"] for r in timed)
        out["mean_eval_seconds"] = statistics.fmean(r["eval_seconds"] for r in timed)
    return out


def full_gpu_run(root: Path, params: Params, device: torch.device) -> dict[str, Any]:
    """The project's default run (params.yaml's epochs, per-epoch evaluation) on the GPU."""
    raw = root / "MNIST" / "raw"
    train_images = to_model_input(load_split(raw, train=True)[0]).to(device)
    test_images = to_model_input(load_split(raw, train=False)[0]).to(device)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        result = train(params, train_images, test_images, device)
        wall = time.perf_counter() - started
    last = result.history[-1]
    return {"epochs": params.epochs, "precision": params.precision,
            "train_seconds": result.train_seconds, "wall_seconds": wall,
            "first_epoch_seconds": result.history[0]["seconds"],
            "final_p_real": last["p_real"], "final_p_fake": last["p_fake"],
            "peak_memory_bytes": memory.peak_bytes, "peak_memory_kind": memory.kind}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

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


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    params = dataclasses.replace(load_params(ROOT / "params.yaml"), checkpoint_every=0, device=device.type)
    precisions = args.precision or (["fp32", "bf16"] if native_bf16(device) else ["fp32"])
    info = machine(device)
    print(f"machine: {info['device']}, {info['cores']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads, {info['cpu_capability']}), "
          f"native bf16: {info['native_bf16']}")

    # (1) matmul rate at the GAN's shapes: the GEMMs of one project training step
    shapes = step_gemms("project", params.batch_size, params.d_noise, params.width)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    with OtherLoad() as others:
        rates = {p: matmul_rate(device, dtypes[p], shapes) for p in sorted(set(precisions) | {"fp32"})}
        if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            rates["fp32_onednn"] = matmul_rate(device, torch.float32, shapes, onednn=True)
    print("matmul rate at the GAN's GEMM shapes (torch.mm): "
          + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items() if p in dtypes)
          + (f"; fp32 through oneDNN: {rates['fp32_onednn']:.0f} GFLOP/s" if "fp32_onednn" in rates else "")
          + f" (CPU used elsewhere meanwhile: {others.share:.0%})")

    with tempfile.TemporaryDirectory(prefix="mnist-gan-bench-") as tmp:
        root, data_kind = dataset(Path(tmp))
        n_train = len(load_split(root / "MNIST" / "raw", train=True)[1])
        n_test = len(load_split(root / "MNIST" / "raw", train=False)[1])
        print(f"data: {data_kind}; {n_train} train / {n_test} test, batch {params.batch_size}; "
              f"{args.epochs} timed epochs per loop after 1 warm-up epoch")
        flops = {loop: epoch_flops(loop, n_train, n_test, params.batch_size, params.d_noise,
                                   params.width) for loop in ("reference", "project")}
        print(f"FLOPs per epoch (training + evaluation): reference {flops['reference'] / 1e9:.0f} GFLOP, "
              f"project {flops['project'] / 1e9:.0f} GFLOP")

        # (2) + (3) the loops, interleaved epoch by epoch
        reference, reference_memory = warm_up_reference(root, params, device)
        projects = []
        for precision in precisions:
            projects.append(time_project(root, params, device, args.epochs, precision, reference))
            print(f"  project {precision} done: {projects[-1]['mean_epoch_seconds']:.2f} s/epoch, "
                  f"reference meanwhile {statistics.fmean(projects[-1]['reference_epoch_seconds']):.2f}",
                  flush=True)
        results = [{**summary("reference", "fp32", reference.setup_seconds, reference.records),
                    **reference_memory, "ratio_vs_reference": 1.0, "cpu_ratio_vs_reference": 1.0},
                   *projects]
        del reference

        full = None
        if args.full_gpu_run:
            if device.type == "cuda":
                full = full_gpu_run(root, dataclasses.replace(params, precision="fp32"), device)
            else:
                print("--full-gpu-run: skipped, the device is not CUDA")

    reference_seconds = results[0]["mean_epoch_seconds"]
    for r in results:
        r["flops_per_epoch"] = flops[r["loop"]]
        r["achieved_gflops"] = flops[r["loop"]] / r["mean_epoch_seconds"] / 1e9
        # the floor: the project's FLOPs at the machine's matmul rate in this precision
        floor = flops["project"] / (rates[r["precision"]] * 1e9)
        r["floor_seconds"] = floor
        r["pct_of_floor"] = 100 * floor / r["mean_epoch_seconds"]

    # (4) the table
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
          f"{reference_seconds / ref['floor_seconds']:.1f}x")
    print(f"s/epoch: mean of the timed epochs (training + per-epoch evaluation; the reference: all "
          f"{len(precisions) * args.epochs} of them); ratio: the s/epoch of the reference epochs run "
          "between the row's epochs over the row's; cpu s: this process's CPU seconds per epoch, "
          "and their ratio; "
          f"peak mem: {ref['peak_memory_kind']}; floor: the project's FLOPs at "
          "the matmul rate of the row's precision; busy: CPU used by other processes meanwhile")
    if "fp32_onednn" in rates:
        onednn_floor = flops["project"] / rates["fp32_onednn"] / 1e9
        print(f"fp32 floor at oneDNN's rate: {onednn_floor:.2f} s/epoch "
              f"(reference / that floor = {reference_seconds / onednn_floor:.1f}x)")
    if max([others.share] + [r["cpu_used_elsewhere"] for r in results]) > 0.1:
        print("WARNING: other processes used the CPU during the measurements: the absolute times are "
              "not this machine's; rerun on a quiet machine (or compare --threads 1 runs)")
    if full is not None:
        print(f"full GPU run: {full['epochs']} epochs in {full['train_seconds']:.1f} s of training "
              f"({full['wall_seconds']:.1f} s wall, first epoch {full['first_epoch_seconds']:.2f} s), "
              f"{reference_seconds * full['epochs'] / full['train_seconds']:.0f}x the reference; "
              f"p_real {full['final_p_real']:.3f}, p_fake {full['final_p_fake']:.3f}, "
              f"peak {mib(full['peak_memory_bytes'])}")

    report = {
        "machine": info,
        "config": {"epochs": args.epochs, "warmup_epochs": 1, "data": data_kind, "n_train": n_train,
                   "n_test": n_test, "batch_size": params.batch_size, "device": str(device),
                   "torch_threads": torch.get_num_threads()},
        "matmul_gflops": rates,
        "matmul_cpu_used_elsewhere": others.share,
        "flops_per_epoch": flops,
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
