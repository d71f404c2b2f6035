"""The project's loop and its baselines timed epoch by epoch, interleaved, in one process.

On a shared VM the speed of every loop drifts by 10-30 % from one minute to the next, which one
loop after the other turns into a wrong ratio. So each baseline (the tutorial's loop, for the MLP;
the plain eager loop of the preset's nets, benchmarks/plain_loop.py) is built and run for a warm-up
epoch, then each precision of the project's loop runs 1 warm-up epoch plus the timed ones, and
every timed epoch is followed by one epoch of each baseline: each ratio compares neighbours. An
epoch is training + the per-epoch evaluation, in every loop.

How the epochs are interleaved: `Interleave` is train()'s public `on_step(epoch, batch)` hook,
called before every batch, and keeps its own clock. It does not use the seconds train() records
per epoch: the hook runs inside train()'s epoch, so those would include the baselines' epochs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from machine import OtherLoad, PeakMemory, sync
from reference_loop import build_reference, evaluate, run_epoch

from mnist_gan.data import load_labelled
from mnist_gan.params import Params
from mnist_gan.training import train


class Baseline(Protocol):
    """A loop run one epoch (training + its evaluation) at a time: ReferenceLoop, plain_loop.PlainLoop."""

    setup_seconds: float
    records: list[dict[str, float]]

    def epoch(self) -> dict[str, float]: ...


class ReferenceLoop:
    """The tutorial's loop, run one epoch (training + its evaluation) at a time."""

    def __init__(self, root: Path, params: Params, device: torch.device):
        self.device = device
        started = time.perf_counter()
        self.ref = build_reference(root, device, params.seed, params.batch_size, params.lr)
        self.setup_seconds = time.perf_counter() - started
        self.records: list[dict[str, float]] = []

    def epoch(self) -> dict[str, float]:
        self.records.append(timed_epoch(lambda: run_epoch(self.ref), lambda: evaluate(self.ref), self.device))
        return self.records[-1]


def timed_epoch(train_epoch: Callable[[], None], evaluate_epoch: Callable[[], tuple[float, float]],
                device: torch.device) -> dict[str, float]:
    """A baseline's epoch record: `train_epoch`, then `evaluate_epoch` (its p_real, p_fake), timed
    apart, in wall and CPU seconds."""
    started, cpu_started = time.perf_counter(), time.process_time()
    train_epoch()
    sync(device)
    trained = time.perf_counter()
    p_real, p_fake = evaluate_epoch()
    done = time.perf_counter()
    return {"seconds": done - started, "train_seconds": trained - started, "eval_seconds": done - trained,
            "cpu_seconds": time.process_time() - cpu_started, "p_real": p_real, "p_fake": p_fake}


class Interleave:
    """train()'s `on_step` hook: times the project's epochs and runs an epoch of each baseline after
    each timed one (all but the first, the warm-up).

    An epoch of the project's loop runs from its first batch, `on_step(epoch, 0)`, to the next
    epoch's first batch, or to `finish()`, called once train() has returned: its batches and its
    evaluation (and the next epoch's shuffle, about a millisecond). At each such boundary the clock
    stops, the baselines' epochs run, then the clock starts again, so none of them counts in the
    project's times.
    CPU seconds (this process's, all threads) complement wall seconds where other processes share
    the cores; with more than one thread they include OpenMP's spin-waiting, so read them as a
    cost, not a time."""

    def __init__(self, baselines: dict[str, Baseline], device: torch.device) -> None:
        self.baselines, self.device = baselines, device
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        # baseline name -> the records of its epochs run between this loop's
        self.baseline_records: dict[str, list[dict[str, float]]] = {name: [] for name in baselines}
        self._started: tuple[float, float] | None = None

    def __call__(self, epoch: int, batch: int) -> None:
        if batch == 0:
            self._boundary()

    def finish(self) -> None:
        self._boundary()
        self._started = None

    def _boundary(self) -> None:
        sync(self.device)
        if self._started is not None:
            self.seconds.append(time.perf_counter() - self._started[0])
            self.cpu_seconds.append(time.process_time() - self._started[1])
            if len(self.seconds) > 1:
                for name, baseline in self.baselines.items():
                    self.baseline_records[name].append(baseline.epoch())
        self._started = time.perf_counter(), time.process_time()


def warm_up(build: Callable[[], Baseline], device: torch.device) -> tuple[Baseline, dict[str, Any]]:
    """A baseline, built and run for its warm-up epoch; its peak memory is measured here (later
    epochs allocate only batches)."""
    with PeakMemory(device) as memory, OtherLoad() as others:
        baseline = build()
        baseline.epoch()
    return baseline, measured(memory, others)


def load_mnist(root: Path,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """train()'s data: both splits' images decoded onto `device`, and their labels as train()'s
    keyword arguments (a conditional preset needs them, the others ignore them)."""
    raw = root / "MNIST" / "raw"
    train_images, train_labels = load_labelled(raw, train=True, device=device)
    test_images, test_labels = load_labelled(raw, train=False, device=device)
    return train_images, test_images, {"train_labels": train_labels, "test_labels": test_labels}


def time_project(root: Path, params: Params, device: torch.device, epochs: int, precision: str,
                 baselines: dict[str, Baseline]) -> dict[str, Any]:
    """The project's loop for 1 + `epochs` epochs, each timed one followed by an epoch of each
    baseline; `ratio_vs_<name>`: the baseline's epochs run in between over this loop's."""
    with PeakMemory(device) as memory, OtherLoad() as others:
        started = time.perf_counter()
        train_images, test_images, labels = load_mnist(root, device)
        sync(device)
        setup = time.perf_counter() - started
        run = dataclasses.replace(params, epochs=1 + epochs, precision=precision)
        interleave = Interleave(baselines, device)
        result = train(run, train_images, test_images, device, on_step=interleave, **labels)
        interleave.finish()
        records = [{"seconds": seconds, "cpu_seconds": cpu, "p_real": r["p_real"], "p_fake": r["p_fake"]}
                   for r, seconds, cpu in zip(result.history, interleave.seconds, interleave.cpu_seconds,
                                              strict=True)]
        del result, train_images, test_images, labels
    out = {**summary("project", precision, setup, records), **measured(memory, others)}
    for name, paired in interleave.baseline_records.items():
        out[f"{name}_epoch_seconds"] = [r["seconds"] for r in paired]
        out[f"ratio_vs_{name}"] = statistics.fmean(r["seconds"] for r in paired) / out["mean_epoch_seconds"]
        out[f"cpu_ratio_vs_{name}"] = (statistics.fmean(r["cpu_seconds"] for r in paired)
                                       / out["mean_epoch_cpu_seconds"])
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
    train_images, test_images, labels = load_mnist(root, device)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        result = train(params, train_images, test_images, device, **labels)
        wall = time.perf_counter() - started
    last = result.history[-1]
    return {"epochs": params.epochs, "precision": params.precision,
            "train_seconds": result.train_seconds, "wall_seconds": wall,
            "first_epoch_seconds": result.history[0]["seconds"],
            "final_p_real": last["p_real"], "final_p_fake": last["p_fake"],
            "peak_memory_bytes": memory.peak_bytes, "peak_memory_kind": memory.kind}
