"""The machine under the benchmark: what it is, how fast it multiplies matrices, and what else uses it.

- `describe`: the CPU (model name, family and model number), cores, the torch build, native bf16;
- `matmul_rate`, `conv_rate`: GFLOP/s of the matrix products and of the convolutions of a training
  step (flops.products), run back to back;
- `PeakMemory`, `OtherLoad`: context managers around a timed loop: its peak memory, and the share
  of the CPU that other processes took meanwhile.

Linux: /proc/cpuinfo describes the CPU, /proc/stat counts the machine's busy time, and
/proc/self/clear_refs and /proc/self/status reset and read the peak resident set; everything else
(this process's CPU time, the cores it may use) comes from torch and the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from flops import Conv, Gemm


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ('model name', 'cpu family', 'model',
    'flags', ...); empty where there is no such file."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    fields = (line.partition(":") for line in first.splitlines())
    return {key.strip(): value.strip() for key, colon, value in fields if colon}


def native_bf16(device: torch.device) -> bool:
    """bf16 runs in hardware: a GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo().get("flags", "").split()))


def describe(device: torch.device) -> dict[str, Any]:
    cpu = cpuinfo()
    name = cpu.get("model name") or platform.processor()
    family, number = cpu.get("cpu family"), cpu.get("model")
    # "AMD EPYC, family 25, model 17": the name alone does not tell a Zen 4 from a Zen 5
    full = name + (f", family {family}, model {number}" if family and number else "")
    return {
        "cpu": name,
        "cpu_family": family,
        "cpu_model_number": number,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({full})",
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, gemms: Sequence[Gemm], seconds: float = 1.0,
                onednn: bool = False) -> float:
    """GFLOP/s of running `gemms` back to back, each operand in its recorded layout (`_rate`).

    `onednn`: the same products through oneDNN (CPU), as the MLPs' fused layers run them. PyTorch
    sends fp32 matmuls to MKL, which on AMD CPUs runs its AVX2 code path; oneDNN uses AVX-512
    there, so it shows what the machine can do.
    """
    mm = torch.mm
    if onednn:
        def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a @ b as oneDNN's a @ (b^T)^T
            return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        if transposed:
            return torch.randn(cols, rows, device=device, dtype=dtype).t()
        return torch.randn(rows, cols, device=device, dtype=dtype)

    operands = [(operand(g.m, g.k, g.a_transposed), operand(g.k, g.n, g.b_transposed)) for g in gemms]

    def run_once() -> None:
        for a, b in operands:
            mm(a, b)

    return _rate(run_once, sum(g.flops for g in gemms), device, seconds)


def conv_rate(device: torch.device, dtype: torch.dtype, convs: Sequence[Conv], seconds: float = 1.0) -> float:
    """GFLOP/s of replaying `convs` (the convolutions, forward and backward, of one training step)
    back to back, on random tensors of their recorded shapes and memory formats, through PyTorch's
    own convolution (oneDNN on CPU, cuDNN on CUDA) (`_rate`); their FLOPs as torch's FlopCounterMode
    counts them."""
    calls = [conv.call(device, dtype) for conv in convs]

    def run_once() -> None:
        for call in calls:
            call()

    with FlopCounterMode(display=False) as counter:
        run_once()
    return _rate(run_once, counter.get_total_flops(), device, seconds)


def _rate(run_once: Callable[[], None], flops: int, device: torch.device, seconds: float) -> float:
    """GFLOP/s of `run_once` doing `flops`: the best of 3 timed rounds of about `seconds` / 3 each,
    after a warm-up that also calibrates the rounds' repetitions."""
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
    return flops / best / 1e9


class PeakMemory:
    """Peak memory while the block runs. On CUDA: torch.cuda.max_memory_allocated after a reset.
    On CPU: the kernel's peak resident set (VmHWM), reset at entry by writing 5 to
    /proc/self/clear_refs, minus the resident set at entry. getrusage's ru_maxrss is not reset
    by that: it keeps the resident set of the process this one was exec'd from (a forked pytest:
    more than the reference loop's peak). A thread sampling the RSS would take a core from the
    timed loop's OpenMP threads (measured: ~10 % slower epochs on 2 cores)."""

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


def release_free_heap() -> None:
    """Give memory freed by the previous loop back to the OS (glibc), so it does not hide the
    next loop's growth in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class OtherLoad:
    """The share of the machine's CPU time that *other* processes used while the block ran (0 = the
    machine was ours, 1 = every core busy elsewhere): the machine's busy time from /proc/stat minus
    this process's CPU time. Timings taken while other work shares the cores are not the machine's:
    with torch's default of one thread per core, an OpenMP thread that loses its core stalls the
    others."""

    share = 0.0

    @staticmethod
    def _busy_seconds() -> float:
        """CPU seconds the whole machine spent busy since boot: all but idle and iowait."""
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherLoad:
        self._start = self._busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = (now - then for now, then in zip(
            (self._busy_seconds(), time.process_time(), time.perf_counter()), self._start, strict=True))
        self.share = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
