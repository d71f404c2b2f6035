"""benchmarks/: the FLOP model against hand counts, the interleaving hook on the real train(), and
`make bench` end to end (benchmarks/bench.py as a process, one timed epoch of each loop)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch

from mnist_gan.data import load_images
from mnist_gan.training import train
from tests.helpers import CPU, REPO, write_synthetic_mnist

if str(REPO / "benchmarks") not in sys.path:  # its modules import each other as bench.py's folder
    sys.path.insert(0, str(REPO / "benchmarks"))

import flops  # noqa: E402
import timing  # noqa: E402

PRESETS = ("mlp", "selfcond", "cgan")


def layer_flops(model: str, d_noise: int, width: int) -> tuple[list[int], list[int]]:
    """Forward FLOPs per image of each weighted layer of G and of D, by hand (2 x multiply-adds)."""
    w = width
    if model == "mlp":
        g = [(d_noise, w), (w, w), (w, 28 * 28)]
        d = [(28 * 28, w), (w, w), (w, 1)]
        return [2 * k * n for k, n in g], [2 * k * n for k, n in d]
    labels = 10 if model == "cgan" else 0  # cgan: a 10-d label embedding appended to z
    # G: Linear to 2w x 7 x 7; ConvTranspose 2w -> w, a 4x4 kernel per 7x7 input; w -> 1 per 14x14
    g = [2 * (d_noise + labels) * 2 * w * 49, 2 * 49 * 2 * w * w * 16, 2 * 196 * w * 16]
    # D: Conv 1 -> w, 4x4 per 14x14 output; w -> 2w per 7x7 output; Linear 2w x 7 x 7 -> 1
    d = [2 * 196 * w * 16, 2 * 49 * w * 2 * w * 16, 2 * 2 * w * 49]
    return g, d


def project_step_by_hand(g: list[int], d: list[int], b: int, conditional: bool) -> int:
    """What mnist_gan.training runs per step, with backward = input gradient + weight gradient,
    each as costly as the forward."""
    d_step = (sum(g) * b                   # G forward, no grad
              + 2 * sum(d) * 2 * b         # D forward and weight gradients on real + fake
              + (sum(d) - d[0]) * 2 * b)   # D input gradients, but not into the images
    g_step = (sum(g) * b + sum(d) * b      # G and D forward
              + sum(d) * b                 # D input gradients only: its weights are frozen
              + sum(g) * b                 # G weight gradients
              + (sum(g) - (0 if conditional else g[0])) * b)  # G input gradients: not into z
    return d_step + g_step


@pytest.mark.parametrize("model", PRESETS)
@pytest.mark.parametrize(("d_noise", "width", "b"), [(100, 256, 200), (3, 5, 7)])
def test_flops_of_each_preset_are_the_hand_count_of_its_layers(model, d_noise, width, b):
    g, d = layer_flops(model, d_noise, width)
    nets = flops.nets(model, d_noise, width)
    step = flops.count(flops.project_step, *nets, b)
    assert step.total == project_step_by_hand(g, d, b, model == "cgan")
    assert flops.count(flops.evaluation, *nets, b).total == b * (2 * sum(d) + sum(g))
    # the convolutions' share: the same count over the conv layers alone (the hand count is linear
    # in the layers' FLOPs); none in the MLP
    conv_g, conv_d = ([0, 0, 0], [0, 0, 0]) if model == "mlp" else ([0, g[1], g[2]], [d[0], d[1], 0])
    assert step.conv == project_step_by_hand(conv_g, conv_d, b, model == "cgan")


@pytest.mark.parametrize("model", PRESETS)
def test_plain_step_flops_are_the_hand_count_of_the_plain_loop(model):
    g, d = layer_flops(model, 100, 32)
    b = 16
    # D step: G forward with grad, D forward and weight gradients on real and fake, input gradients
    # into neither; G step: D forward on the same fake, D's weight and input gradients, G's weight
    # gradients and input gradients (but not into z, where G's first layer takes z alone)
    d_step = b * (sum(g) + 2 * 2 * sum(d) + 2 * (sum(d) - d[0]))
    g_step = b * (sum(d) + 2 * sum(d) + sum(g) + sum(g) - (0 if model == "cgan" else g[0]))
    assert flops.count(flops.plain_step, *flops.nets(model, 100, 32), b).total == d_step + g_step


@pytest.mark.parametrize(("d_noise", "width", "b"), [(100, 256, 200), (3, 5, 7)])
def test_reference_step_flops_are_the_hand_count_of_the_tutorials_loop(d_noise, width, b):
    g, d = layer_flops("mlp", d_noise, width)
    # D step: D on real and on G(z), one backward through both and through G: D's weight gradients
    # twice, its input gradients into the fake and (but for the first layer) the real, all of G's but z's
    d_step = b * (sum(d) + sum(g) + sum(d) + 2 * sum(d) + (sum(d) - d[0]) + sum(d) + sum(g) + sum(g) - g[0])
    # G step: forward, then D's weight and input gradients (its weights still require grad), G's
    g_step = b * (sum(g) + sum(d) + 2 * sum(d) + sum(g) + sum(g) - g[0])
    assert flops.count(flops.reference_step, *flops.nets("mlp", d_noise, width), b).total == d_step + g_step


def test_mlp_epoch_flops_at_the_defaults():
    """60k / 10k MNIST, batch 200: 300 steps and the evaluation on 10k + 10k."""
    nets = flops.nets("mlp", 100, 256)
    project = flops.epoch_flops(flops.project_step, *nets, 60_000, 10_000, 200)
    assert project == flops.Flops(matmul=361_175_040_000, conv=0)
    assert flops.epoch_flops(flops.reference_step, *nets, 60_000, 10_000, 200).total == 484_208_640_000
    # a ragged last batch counts as a full one
    assert (flops.epoch_flops(flops.project_step, *nets, 1001, 10, 200)
            == flops.count(flops.project_step, *nets, 200) * 6 + flops.count(flops.evaluation, *nets, 10))


def test_gemms_of_the_mlp_step_hold_all_its_flops_in_nn_linears_layouts():
    nets = flops.nets("mlp", 100, 256)
    gemms, convs = flops.products(flops.project_step, *nets, 200)
    assert sum(g.flops for g in gemms) == flops.count(flops.project_step, *nets, 200).total
    assert convs == []
    # D's step: 3 + 3 forward, D's 3 weight + 2 input gradients; G's step: 3 + 3 forward, D's 3
    # input gradients, G's 3 weight + 2 input gradients
    assert len(gemms) == 11 + 14
    # G's first layer: z [200, 100] @ W^T, W stored [256, 100]; its weight gradient: dY^T [256, 200] @ z
    assert gemms[0] == flops.Gemm(200, 100, 256, a_transposed=False, b_transposed=True)
    assert flops.Gemm(256, 200, 100, a_transposed=True, b_transposed=False) in gemms


def test_the_convs_recorded_replay_the_steps_conv_flops_in_its_layouts():
    """machine.conv_rate replays the recorded convolutions: on real tensors they must do the step's
    conv FLOPs, in the channels_last layout the project's nets run."""
    from torch.utils.flop_counter import FlopCounterMode

    nets = flops.nets("cgan", 100, 8)
    gemms, convs = flops.products(flops.project_step, *nets, 4)
    with FlopCounterMode(display=False) as counter:
        for conv in convs:
            conv.call(CPU, torch.float32)()
    assert counter.get_total_flops() == flops.count(flops.project_step, *nets, 4).conv > 0
    # G's first transposed conv's weight [2w, w, 4, 4] as the nets hold it: channels_last
    weight = convs[0].args[1]
    assert weight.shape == (16, 8, 4, 4) and weight.stride == (128, 1, 32, 8)
    # 2 convs forward in each of G's and D's passes (4 passes), the backward of those that train
    ops = [str(c.op) for c in convs]
    assert ops.count("aten.convolution.default") == 8 and ops.count("aten.convolution_backward.default") == 6


class SleepingReference:
    """A stand-in for timing.ReferenceLoop: each epoch sleeps SLEEP seconds and notes how many
    project epochs the hook had timed when it ran."""

    SLEEP = 0.5

    def __init__(self) -> None:
        self.timed_before: list[int] = []
        self.interleave: timing.Interleave | None = None

    def epoch(self) -> dict[str, float]:
        self.timed_before.append(len(self.interleave.seconds))
        time.sleep(self.SLEEP)
        return {"seconds": self.SLEEP}


def test_interleave_runs_a_reference_epoch_after_each_timed_epoch_outside_their_times(tiny_params, tmp_path):
    raw = write_synthetic_mnist(tmp_path / "raw", n_train=400, n_test=100)
    reference = SleepingReference()
    interleave = reference.interleave = timing.Interleave({"sleep": reference}, CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: two OpenMP threads on busy cores only wait for each other
    try:
        started = time.perf_counter()
        result = train(dataclasses.replace(tiny_params, epochs=3, checkpoint_every=0),
                       load_images(raw, True, CPU), load_images(raw, False, CPU), CPU, on_step=interleave)
        interleave.finish()
        wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert len(interleave.seconds) == len(interleave.cpu_seconds) == len(result.history) == 3
    assert reference.timed_before == [2, 3]  # none after the warm-up epoch 1
    assert len(interleave.baseline_records["sleep"]) == 2
    # the reference's sleeps lie between the project's epochs, in none of them
    assert sum(interleave.seconds) + 2 * SleepingReference.SLEEP <= wall
    assert all(s > 0 for s in interleave.seconds)


@pytest.mark.slow
def test_bench_interleaves_each_presets_loops_and_reports_the_ratios(tmp_path):
    out = tmp_path / "cpu.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--preset", "mlp", "cgan", "--epochs", "1",
         "--train-images", "1600", "--device", "cpu", "--precision", "fp32", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["presets"]) == ["mlp", "cgan"]
    mlp, cgan = report["presets"]["mlp"], report["presets"]["cgan"]
    assert [(r["loop"], r["precision"]) for r in mlp["loops"]] == [
        ("tutorial", "fp32"), ("plain", "fp32"), ("project", "fp32")]
    assert [r["loop"] for r in cgan["loops"]] == ["plain", "project"]
    for preset in (mlp, cgan):
        *baselines, project = preset["loops"]
        # 1 warm-up epoch each, then the project's timed epoch with one epoch of each baseline after it
        for baseline in baselines:
            assert len(baseline["epoch_seconds"]) == len(project["epoch_seconds"]) == 1
            assert project[f"{baseline['loop']}_epoch_seconds"] == baseline["epoch_seconds"]
            assert project[f"ratio_vs_{baseline['loop']}"] == pytest.approx(
                baseline["epoch_seconds"][0] / project["epoch_seconds"][0])
            assert baseline["peak_memory_bytes"] > 0
        assert project["flops_per_epoch"] == sum(preset["flops_per_epoch"]["project"].values())
        assert f"{project['ratio_vs_plain']:.2f}x" in run.stdout
        assert preset["rates"]["matmul"]["fp32"] > 0
    assert cgan["rates"]["conv"]["fp32"] > 0 and mlp["rates"]["conv"] == {}
    assert cgan["flops_per_epoch"]["project"]["conv"] > 10 * cgan["flops_per_epoch"]["project"]["matmul"]
    # the floor: matrix products at the matmul rate, convolutions at the conv rate
    work, rates = cgan["flops_per_epoch"]["project"], cgan["rates"]
    assert cgan["loops"][-1]["floor_seconds"] == pytest.approx(
        work["matmul"] / rates["matmul"]["fp32"] / 1e9 + work["conv"] / rates["conv"]["fp32"] / 1e9)
    machine = report["machine"]
    assert f"machine: cpu ({machine['cpu']}, family {machine['cpu_family']}" in run.stdout
    assert "mlp fp32: " in run.stdout and "the tutorial's loop" in run.stdout


def _mlp_report(tutorial_s: float, fp32_s: float, mm: float, onednn: float) -> dict:
    """A bench report of the MLP: 300 GFLOP of matrix products per epoch in 300 steps."""
    return {"model": "mlp", "steps_per_epoch": 300,
            "flops_per_epoch": {"project": flops.Flops(300 * 10**9, 0)},
            "rates": {"matmul": {"fp32": mm, "fp32_onednn": onednn}, "conv": {}},
            "loops": [{"loop": "tutorial", "precision": "fp32", "mean_epoch_seconds": tutorial_s},
                      {"loop": "project", "precision": "fp32", "mean_epoch_seconds": fp32_s,
                       "ratio_vs_tutorial": tutorial_s / fp32_s}]}


@pytest.mark.parametrize("mkl", [True, False])
def test_mlp_verdict_says_in_one_line_whether_the_target_holds_and_what_bounds_it(monkeypatch, mkl):
    import bench

    monkeypatch.setattr(bench, "MKL_FP32", mkl)
    library, rate = ("MKL", 300.0) if mkl else ("oneDNN", 250.0)  # the products: 1.00 s or 1.20 s
    assert bench.mlp_verdict(_mlp_report(8.0, 1.9, mm=300.0, onednn=250.0)) == (
        "mlp fp32: 4.21x the tutorial's loop, target >= 4x met")
    # oneDNN more than 20 % faster than torch.mm: the target is not claimed here
    assert bench.mlp_verdict(_mlp_report(8.0, 2.5, mm=100.0, onednn=250.0)) == (
        "mlp fp32: 3.20x the tutorial's loop; the >= 4x target applies where oneDNN's fp32 rate is within "
        "20 % of torch.mm's, not here (250 vs 100 GFLOP/s)")
    # 4x allows 2.00 s: the products leave 1.00 s (3.3 ms a step) or 0.80 s (2.7 ms); the rest took more
    products = 1.0 if mkl else 1.2
    assert bench.mlp_verdict(_mlp_report(8.0, 2.5, mm=300.0, onednn=250.0)) == (
        f"mlp fp32: 3.20x the tutorial's loop, below the 4x target: the matrix products take "
        f"{products:.2f} s at {library}'s rate ({rate:.0f} GFLOP/s) of the 2.00 s that 4x allows; "
        f"the rest (elementwise work, Adam, autograd, Python, the epoch's evaluation) takes "
        f"{(2.5 - products) / 0.3:.1f} ms per step of the 300, against "
        f"the {(2.0 - products) / 0.3:.1f} ms left")
    # a tutorial epoch so short that the products alone exceed the budget
    assert bench.mlp_verdict(_mlp_report(3.6, 1.8, mm=300.0, onednn=250.0)) == (
        f"mlp fp32: 2.00x the tutorial's loop, below the 4x target: at {library}'s rate ({rate:.0f} GFLOP/s) "
        f"the matrix products alone take {products:.2f} s, more than the 0.90 s that 4x allows")
