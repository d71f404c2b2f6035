"""DVC stage `plot`: PNGs under plots/, also logged to the run's MLflow record."""

import pandas as pd
import torch

from mnist_gan import paths, plotting, store, tracking
from mnist_gan.data import load_images
from mnist_gan.errors import run_stage
from mnist_gan.files import read_json
from mnist_gan.models import load_model
from mnist_gan.params import load_params
from mnist_gan.signals import exit_on_stop_signals
from mnist_gan.training import N_FIXED_NOISE, latents, sample


def main() -> None:
    params = load_params()
    device = torch.device("cpu")  # 16 images: not worth a GPU
    run_id = read_json(paths.TRAIN_METRICS)["mlflow_run_id"]
    store.check_reachable(store.tracking_uri())  # fail before the work, not when logging it
    history = pd.read_csv(paths.HISTORY)
    evaluation = read_json(paths.EVAL_METRICS)
    classes = [evaluation[f"class_{digit}"] for digit in range(10)]
    samples = torch.load(paths.SAMPLES, weights_only=True)
    generator = load_model(paths.GENERATOR, device)
    test_images = load_images(paths.RAW_DIR, train=False, device=device)

    rng = torch.Generator().manual_seed(params.eval.seed)
    real = test_images[torch.randperm(len(test_images), generator=rng)[:N_FIXED_NOISE]]
    fake = sample(generator, *latents(generator, N_FIXED_NOISE, device, rng))

    figures = {
        "d_scores.png": lambda path: plotting.plot_d_scores(history, path),
        "samples.png": lambda path: plotting.plot_sample_grids(samples, path),
        "real_vs_fake.png": lambda path: plotting.plot_real_vs_fake(real, fake, path),
        "class_histogram.png": lambda path: plotting.plot_class_histogram(classes, path),
    }
    with tracking.open_stage_run(run_id, params, str(device)) as tracker:
        for name, draw in figures.items():
            draw(paths.PLOTS / name)
            tracker.log_artifact(paths.PLOTS / name, folder="plots")


if __name__ == "__main__":
    with exit_on_stop_signals():  # SIGTERM ends the MLflow run FAILED, not RUNNING
        run_stage(main)
